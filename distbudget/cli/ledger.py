"""``distbudget ledger``: a scope's ledger (its charges, its descendants', its resets) as JSON lines."""

from __future__ import annotations

import argparse
import sys

from distbudget.cli._common import connect


def parse_since(text: str) -> str | float:
    if "-" in text:
        return text  # a ledger id: <ms>-<seq>
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a ledger id or seconds since the epoch: {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Write the ledger of a scope (its charges, its descendants', its resets) as JSON lines, oldest
    first."""
    mgr = connect(args).manager()
    n = mgr.export_ledger(args.scope, args.out or sys.stdout, since=args.since)
    if args.out:
        print(f"{n} ledger entries of {args.scope!r} written to {args.out}")
    return 0
