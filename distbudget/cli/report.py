"""``distbudget report``: a scope's ledger rolled up into rows (``BudgetManager.report``)."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from distbudget._core.report import FORMATS, GROUPS, check_by, render, total_of
from distbudget.cli._common import add_connection, connect


def add_parser(sub: Any) -> None:
    report = sub.add_parser(
        "report",
        help="a scope's spend rolled up by day, model, session",
        description="Roll a scope's ledger (its own and its descendants' charges) up into rows: requests, "
        "tokens by kind, cost and refusals where recorded, grouped by any of "
        f"{', '.join(GROUPS)}. Reads the ledger page by page.",
    )
    report.add_argument("scope", help="a registered scope")
    add_connection(report)
    report.add_argument("--by", default="", type=_by, help="groups, comma-separated (e.g. day,model)")
    report.add_argument("--since", type=_time, help="ISO date or time (UTC unless it has an offset), inclusive")
    report.add_argument("--until", type=_time, help="ISO date or time, exclusive")
    report.add_argument("--tz", help="the time zone of the days (IANA name; default UTC)")
    report.add_argument("--format", choices=FORMATS, default="table", help="output (default: table)")
    report.set_defaults(func=run)


def _by(text: str) -> tuple[str, ...]:
    try:
        return check_by(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def run(args: argparse.Namespace) -> int:
    mgr = connect(args).manager()
    rows = mgr.report(args.scope, since=args.since, until=args.until, by=args.by, tz=args.tz)
    print(render(rows, args.by, args.format, total_of(rows) if args.format == "table" else None))
    return 0
