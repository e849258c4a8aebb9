"""``distbudget ledger``: a scope's ledger (its charges, its descendants', its resets) as JSON lines."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from distbudget.cli._common import add_connection, connect


def _since(text: str) -> str | float:
    if "-" in text:
        return text  # a ledger id: <ms>-<seq>
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a ledger id or seconds since the epoch: {text!r}") from None


def add_parser(sub: Any) -> None:
    ledger = sub.add_parser(
        "ledger",
        help="export a scope's ledger (charges and resets) as JSON lines",
        description="Write the ledger of a scope (its charges, its descendants', its resets) as JSON lines, "
        "oldest first.",
    )
    ledger.add_argument("scope", help="a registered scope")
    add_connection(ledger)
    ledger.add_argument("--since", type=_since, help="a ledger id (exclusive) or seconds since the epoch")
    ledger.add_argument("--out", metavar="FILE", help="write to FILE (default: standard output)")
    ledger.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mgr = connect(args).manager()
    n = mgr.export_ledger(args.scope, args.out or sys.stdout, since=args.since)
    if args.out:
        print(f"{n} ledger entries of {args.scope!r} written to {args.out}")
    return 0
