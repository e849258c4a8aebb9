"""``distbudget reset`` and ``distbudget update``: the commands that change a fleet's budgets
(``Budget.reset``, ``BudgetManager.update``; see docs/operate.md and docs/updates.md). Each asks for
confirmation unless ``--yes``."""

from __future__ import annotations

import argparse
import sys

from distbudget._core.update import parse_assignments
from distbudget._fleet import budget_of
from distbudget.cli._common import CommandError, connect


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
    """Zero a scope's counters: its totals (all models), every rolling window and the given session
    (with --session ID: only that session's counters). Ancestors keep their usage. The reset is
    written to the ledger. Asks for confirmation unless --yes."""
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


def run_update(args: argparse.Namespace) -> int:
    """Change only the named fields of a registered scope (BudgetManager.update), keeping the rest:
    FIELD=VALUE pairs, values as JSON (2.5, true, null, [...]); limits as a list of Limit objects,
    rates as {"model": {"input": 3, "output": 15}} in USD per 1M tokens. A cap lowered under current
    usage alerts at once. Workers see the change within their registry_ttl. Asks for confirmation
    unless --yes."""
    changes = parse_assignments(args.fields)  # bad input fails before connecting
    conn = connect(args)
    mgr = conn.manager()
    mgr.get(args.scope)  # an unknown scope fails before the question
    confirm(f"Change {', '.join(sorted(changes))} of scope {args.scope!r} under prefix {args.prefix!r}?", args.yes)
    budget = mgr.update(args.scope, **changes)
    print(f"scope {args.scope!r} updated: {', '.join(sorted(changes))}")
    for alert in budget.alerts:
        print(f"  {alert.level.value.upper()}: {alert.message}")
    return 0
