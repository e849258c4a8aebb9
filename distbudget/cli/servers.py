"""``distbudget exporter`` (Prometheus ``/metrics``) and ``distbudget dashboard`` (one web page):
long-running servers over one prefix."""

from __future__ import annotations

import argparse
import sys
import time

from distbudget.cli._common import CommandError, connect

TOKEN_ENV = "DISTBUDGET_DASHBOARD_TOKEN"


def run_exporter(args: argparse.Namespace) -> int:
    """Serve Prometheus metrics of every registered scope of a prefix on /metrics: limits, used,
    held, refusals, spend per model (no session labels). Each scrape reads the registry and then
    every scope's counters in one pipeline. Needs the prometheus extra: pip install
    'distbudget[prometheus]'."""
    try:
        from distbudget import exporter
    except ImportError as exc:
        raise CommandError(
            f"the exporter needs prometheus_client: pip install 'distbudget[prometheus]' ({exc})"
        ) from exc
    conn = connect(args)
    server = exporter.serve(conn.manager(), args.port, args.host)
    host, port = server.server_address[:2]
    print(f"distbudget exporter: serving http://{host}:{port}/metrics", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    """Serve one web page: the scope tree with a usage bar per limit (used, held, the alert
    thresholds marked), refusals, top sessions, a live alert feed and the ledger tail. Read-only
    unless --allow-writes (then reset from the page). With --token (or $DISTBUDGET_DASHBOARD_TOKEN)
    every request needs it as a bearer token (the page asks for it once)."""
    from distbudget.dashboard import Dashboard

    board = Dashboard(connect(args).manager(), allow_writes=args.allow_writes, token=args.token)
    server = board.serve(args.port, args.host)
    host, port = server.server_address[:2]
    host = host.decode() if isinstance(host, bytes) else host
    print(f"distbudget dashboard: serving http://{host}:{port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        board.close()
        server.server_close()
    return 0
