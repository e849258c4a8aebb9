"""``distbudget reset`` (and ``update`` once ``BudgetManager.update`` exists): the commands that
change a fleet's budgets. Each asks for confirmation unless ``--yes``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from distbudget._fleet import budget_of
from distbudget.cli._common import CommandError, add_connection, connect


def add_parser(sub: Any) -> None:
    reset = sub.add_parser(
        "reset",
        help="zero a scope's usage (or one session's)",
        description="Zero a scope's counters: its totals (all models), every rolling window and the given "
        "session (with --session ID: only that session's counters). Ancestors keep their usage. The "
        "reset is written to the ledger. Asks for confirmation unless --yes.",
    )
    reset.add_argument("scope", help="a registered scope")
    add_connection(reset)
    reset.add_argument("--session", metavar="ID", help="reset only this session's counters")
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.set_defaults(func=run_reset)


def confirm(question: str, yes: bool) -> None:
    """Ask on the terminal; without one, only ``--yes`` proceeds."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CommandError("refusing to change budgets without confirmation: pass --yes (stdin is not a terminal)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CommandError("cancelled, nothing changed")


def run_reset(args: argparse.Namespace) -> int:
    conn = connect(args)
    mgr = conn.manager()
    budget = budget_of(mgr, args.scope)
    if args.session is None:
        confirm(f"Reset scope {args.scope!r} (totals, every window) under prefix {args.prefix!r}?", args.yes)
        budget.reset()
        print(f"scope {args.scope!r} reset")
    else:
        confirm(f"Reset session {args.session!r} of scope {args.scope!r} under prefix {args.prefix!r}?", args.yes)
        budget.reset_session(args.session)
        print(f"session {args.session!r} of scope {args.scope!r} reset")
    return 0
