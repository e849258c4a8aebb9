"""``distbudget watch``: every alert of the fleet, printed (and posted to a webhook) once."""

from __future__ import annotations

import argparse
import contextlib

from distbudget._core.types import BudgetAlert
from distbudget.cli._common import connect


def run(args: argparse.Namespace) -> int:
    """Listen to the fleet's alert streams and print each alert once: first what the streams still
    hold (--new-only: skip it), then live; --group resumes where a consumer group left off."""
    from distbudget.alerts import FROM_START, AlertListener, WebhookSink

    conn = connect(args, need="alerts")
    from_start = FROM_START if args.from_start is None else args.from_start
    listener = AlertListener(
        redis=conn.client, prefix=conn.prefix, scopes=args.scopes, from_start=from_start, group=args.group
    )
    sink = WebhookSink(args.webhook, slack=args.slack) if args.webhook else None
    alerts = iter(listener)
    try:
        alert, seen = next(alerts), 0
        while True:
            print(f"{alert.alert_id} [{alert.level.value}] {alert.message}{_driver(alert)}", flush=True)
            # In a --group, an alert the webhook did not take stays pending (delivered again, then dead-lettered).
            handled = sink(alert) if sink is not None else True
            seen += 1
            if args.count and seen >= args.count:
                listener.stop()  # the last alert is acknowledged (or not), nothing more is read
                with contextlib.suppress(StopIteration):
                    alerts.send(handled)
                return 0
            alert = alerts.send(handled)  # False: not delivered (a group delivers it again)
    except KeyboardInterrupt:
        pass
    return 0


def _driver(alert: BudgetAlert) -> str:
    """Which call drove the alert: its scope (when the limit is an ancestor's), session and model."""
    by = alert.requested_by
    parts = [f"by {by.scope}" if by is not None and by.scope != alert.scope else ""]
    parts += [f"session {alert.session_id}" if alert.session_id else "", f"model {alert.model}" if alert.model else ""]
    shown = ", ".join(p for p in parts if p)
    return f" ({shown})" if shown else ""
