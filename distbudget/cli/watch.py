"""``distbudget watch``: every alert of the fleet, printed (and posted to a webhook) once."""

from __future__ import annotations

import argparse
from typing import Any

from distbudget._core.types import BudgetAlert
from distbudget.cli._common import add_connection, connect


def add_parser(sub: Any) -> None:
    watch = sub.add_parser(
        "watch",
        help="print (or post to a webhook) every alert of the fleet, once",
        description="Listen to the fleet's alert streams and print each alert once: new alerts only, "
        "or with --from-start every alert the streams still hold first.",
    )
    add_connection(watch)
    watch.add_argument("--scope", action="append", dest="scopes", help="only this scope (repeatable)")
    watch.add_argument("--webhook", metavar="URL", help="POST each alert as JSON to URL")
    watch.add_argument("--slack", action="store_true", help="post Slack-compatible {'text': ...} bodies")
    watch.add_argument("--from-start", action="store_true", help="replay every alert still in the streams")
    watch.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N alerts (default: run until Ctrl-C)"
    )
    watch.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from distbudget.alerts import AlertListener, WebhookSink

    conn = connect(args, need="alerts")
    listener = AlertListener(redis=conn.client, prefix=conn.prefix, scopes=args.scopes, from_start=args.from_start)
    sink = WebhookSink(args.webhook, slack=args.slack) if args.webhook else None
    seen = 0
    try:
        for alert in listener:
            print(f"{alert.alert_id} [{alert.level.value}] {alert.message}{_driver(alert)}", flush=True)
            if sink is not None:
                sink(alert)
            seen += 1
            if args.count and seen >= args.count:
                break
    except KeyboardInterrupt:
        pass
    return 0


def _driver(alert: BudgetAlert) -> str:
    """Which call drove the crossing: its session and model, when the alert carries them."""
    parts = [f"session {alert.session_id}" if alert.session_id else "", f"model {alert.model}" if alert.model else ""]
    shown = ", ".join(p for p in parts if p)
    return f" ({shown})" if shown else ""
