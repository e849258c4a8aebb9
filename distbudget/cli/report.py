"""``distbudget report``: a scope's ledger rolled up into rows (``BudgetManager.report``)."""

from __future__ import annotations

import argparse
import datetime as dt

from distbudget._core.report import check_by, render, total_of
from distbudget.cli._common import connect


def parse_by(text: str) -> tuple[str, ...]:
    try:
        return check_by(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def run(args: argparse.Namespace) -> int:
    """Roll a scope's ledger (its own and its descendants' charges) up into rows: requests, tokens
    by kind, cost and refusals where recorded, grouped by any of day, model, session, scope. Reads
    the ledger page by page."""
    mgr = connect(args).manager()
    rows = mgr.report(args.scope, since=args.since, until=args.until, by=args.by, tz=args.tz)
    print(render(rows, args.by, args.format, total_of(rows) if args.format == "table" else None))
    return 0
