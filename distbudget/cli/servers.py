"""``distbudget exporter`` (Prometheus ``/metrics``) and ``distbudget dashboard`` (one web page):
long-running servers over one prefix."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from distbudget.cli._common import CommandError, add_connection, bounded, connect

TOKEN_ENV = "DISTBUDGET_DASHBOARD_TOKEN"


def add_parser(sub: Any) -> None:
    exporter = sub.add_parser(
        "exporter",
        help="serve Prometheus /metrics for a whole prefix",
        description="Serve Prometheus metrics of every registered scope of a prefix on /metrics: limits, "
        "used, held, refusals, spend per model (no session labels). Each scrape reads the registry and "
        "then every scope's counters in one pipeline. Needs the prometheus extra: "
        "pip install 'distbudget[prometheus]'.",
    )
    add_connection(exporter)
    exporter.add_argument("--port", type=bounded(int, 0, 65535), default=9464, help="port to listen on (default 9464)")
    exporter.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    exporter.set_defaults(func=run_exporter)

    dashboard = sub.add_parser(
        "dashboard",
        help="serve a live web dashboard of a prefix",
        description="Serve one web page: the scope tree with a usage bar per limit (used, held, the alert "
        "thresholds marked), refusals, top sessions, a live alert feed and the ledger tail. Read-only "
        f"unless --allow-writes (then reset from the page). With --token (or ${TOKEN_ENV}) every request "
        "needs it as a bearer token (the page asks for it once).",
    )
    add_connection(dashboard)
    dashboard.add_argument("--port", type=bounded(int, 0, 65535), default=8080, help="port to listen on (default 8080)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dashboard.add_argument("--allow-writes", action="store_true", help="allow reset from the page")
    dashboard.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"require this bearer token (default: ${TOKEN_ENV})"
    )
    dashboard.set_defaults(func=run_dashboard)


def run_exporter(args: argparse.Namespace) -> int:
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
