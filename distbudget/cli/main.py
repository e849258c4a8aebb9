"""The ``distbudget`` command line: :data:`COMMANDS`, the table of every subcommand (the function it
runs, its help line, its arguments), and :func:`main`, which runs one of them and turns its errors
into exit statuses (see docs/cli.md and docs/operate.md)."""

from __future__ import annotations

import argparse
import os
import sys

import distbudget
from distbudget._core.report import FORMATS
from distbudget._exceptions import DistBudgetError
from distbudget.cli import admin, demo, doctor, install, ledger, prices, report, servers, status, watch
from distbudget.cli._common import (
    CONNECTION,
    SCOPE,
    YES,
    CommandError,
    arg,
    bounded,
    colour_option,
    command,
    count_option,
    exclusive,
    listen_options,
)
from distbudget.engines.codec import ERRORS as REDIS_ERRORS

DESCRIPTION = (
    "Operate distbudget fleets: see the budgets (status), reset them, check a server (doctor), follow "
    "alerts (watch), export the ledger, serve metrics and a dashboard, install the Functions library "
    "and print least-privilege ACLs, or run the demo. Commands that read a fleet take --redis "
    "(default: $DISTBUDGET_REDIS_URL) and --prefix."
)
# Every subcommand, in the order `distbudget --help` lists them; each one's --help description is
# the docstring of the function it runs.
COMMANDS = (
    command(
        "status",
        status.run,
        "the scope tree with usage per limit, sorted by %%",
        *CONNECTION,
        arg(
            "--near",
            type=bounded(float, 0.0, 10.0),
            metavar="FRACTION",
            help="only limits at or above this fraction of their value (0.8 = 80 %%)",
        ),
        count_option("--sessions", 0, 100, 3, "top sessions per session limit (3)"),
        arg("--json", action="store_true", help="one JSON document (schema: docs/operate.md)"),
        arg(
            "--watch",
            type=bounded(float, 0.1, 3600.0, " s"),
            nargs="?",
            const=2.0,
            metavar="SECONDS",
            help="redraw in place every SECONDS (default 2) until Ctrl-C",
        ),
        colour_option("colour at the thresholds (auto)"),
        aliases=("scopes",),
    ),
    command(
        "reset",
        admin.run_reset,
        "zero a scope's usage (or one session's)",
        SCOPE,
        *CONNECTION,
        arg("--session", metavar="ID", help="reset only this session's counters"),
        YES,
    ),
    command(
        "update",
        admin.run_update,
        "change some fields of a registered scope",
        SCOPE,
        arg("fields", nargs="+", metavar="FIELD=VALUE", help="e.g. max_cost_per_day_usd=40"),
        *CONNECTION,
        YES,
    ),
    command(
        "report",
        report.run,
        "a scope's spend rolled up by day, model, session",
        SCOPE,
        *CONNECTION,
        arg("--by", default="", type=report.parse_by, help="groups, comma-separated (e.g. day,model)"),
        arg("--since", type=report.parse_time, help="ISO date or time (UTC unless it has an offset), inclusive"),
        arg("--until", type=report.parse_time, help="ISO date or time, exclusive"),
        arg("--tz", help="the time zone of the days (IANA name; default UTC)"),
        arg("--format", choices=FORMATS, default="table", help="output (default: table)"),
    ),
    command(
        "doctor",
        doctor.run,
        "check the server: version, eviction, ACL rights, scripts, clock, sizes",
        *CONNECTION,
        colour_option("colour (auto)"),
    ),
    command(
        "watch",
        watch.run,
        "print (or post to a webhook) every alert of the fleet, once",
        *CONNECTION,
        arg("--scope", action="append", dest="scopes", help="only this scope (repeatable)"),
        arg("--webhook", metavar="URL", help="POST each alert as JSON to URL"),
        arg("--slack", action="store_true", help="post Slack-compatible {'text': ...} bodies"),
        exclusive(  # None: the Python API's default (distbudget.alerts.FROM_START)
            arg("--from-start", dest="from_start", action="store_true", help="replay what the streams hold"),
            arg("--new-only", dest="from_start", action="store_false", help="only alerts raised from now on"),
            from_start=None,
        ),
        arg("--group", metavar="NAME", help="read as a member of consumer group NAME (see docs/alerts.md)"),
        arg("--count", type=int, default=0, metavar="N", help="stop after N alerts (default: run until Ctrl-C)"),
    ),
    command(
        "ledger",
        ledger.run,
        "export a scope's ledger (charges and resets) as JSON lines",
        SCOPE,
        *CONNECTION,
        arg("--since", type=ledger.parse_since, help="a ledger id (exclusive) or seconds since the epoch"),
        arg("--out", metavar="FILE", help="write to FILE (default: standard output)"),
    ),
    command(
        "exporter",
        servers.run_exporter,
        "serve Prometheus /metrics for a whole prefix",
        *CONNECTION,
        *listen_options(9464),
    ),
    command(
        "dashboard",
        servers.run_dashboard,
        "serve a live web dashboard of a prefix",
        *CONNECTION,
        *listen_options(8080),
        arg("--allow-writes", action="store_true", help="allow reset from the page"),
        arg("--token", env=servers.TOKEN_ENV, help=f"require this bearer token (default: ${servers.TOKEN_ENV})"),
    ),
    command(
        "install",
        install.run_install,
        "install the Redis Functions library (admin, once per deploy)",
        *CONNECTION,
        arg("--prune", action="store_true", help="remove the other distbudget library versions"),
    ),
    command(
        "acl",
        install.run_acl,
        "print the ACL rules of a worker and an admin user for a prefix",
        arg("--prefix", default="distbudget", help="the fleet's key prefix (default distbudget)"),
        arg("--user", metavar="STEM", help="user names STEM-worker and STEM-admin (default: the prefix)"),
    ),
    command(
        "prices",
        prices.run,
        "list the built-in model price table",
        actions=(
            command(
                "push",
                prices.run_push,
                "store a LiteLLM price file as the fleet's price book",
                arg("file", help="a LiteLLM price file"),
                arg("--as-of", metavar="DATE", help="the prices' date (default: the file's modification date)"),
                *CONNECTION,
            ),
            command("show", prices.run_show, "the fleet's price of one model", arg("model"), *CONNECTION),
        ),
    ),
    command(
        "demo",
        demo.run,
        "a simulated agent fleet spending against hard caps",
        arg(
            "--redis",
            metavar="URL",
            help="share one Redis (worker processes); default: the embedded engine (worker threads). "
            "Not read from DISTBUDGET_REDIS_URL: the demo writes, so it uses a server only when told.",
        ),
        count_option("--workers", 1, demo.MAX_WORKERS, 4, "agent workers (default 4)"),
        count_option("--calls", 1, 100_000, 50, "calls per worker on each scope (default 50)"),
        count_option("--scopes", 1, demo.MAX_SCOPES, 3, "team scopes team-a, team-b, ... (default 3)"),
        arg(
            "--prefix",
            type=demo.parse_prefix,
            default="distbudget-demo",
            help="key prefix; a unique suffix is added per run (default distbudget-demo)",
        ),
        arg(
            "--exact-prefix",
            action="store_true",
            help="use --prefix as is (it must be unused), so others can watch it: distbudget watch --prefix P",
        ),
        arg("--seed", type=int, default=0, help="seed of the simulated token counts (default 0)"),
        arg(
            "--latency-ms",
            type=bounded(float, 0.0, 1000.0, " ms"),
            default=1.0,
            metavar="MS",
            help="simulated model latency between reserve and commit (default 1)",
        ),
    ),
)
# Exit status when the reader of our output went away (`distbudget ledger | head`): as if killed by
# SIGPIPE, like any Unix filter, without a traceback.
BROKEN_PIPE = 141
# What a command reports as one error line (exit status 2), never a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (DistBudgetError, KeyError, ValueError, TypeError, *REDIS_ERRORS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distbudget", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"distbudget {distbudget.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.add_to(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: report the code, do not exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except CommandError as exc:
        _error(args.command, exc)
        return exc.code
    except USER_ERRORS as exc:  # bad input, an unreachable server, a command Redis refused (NOPERM ...)
        _error(args.command, exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _error(command: str, exc: BaseException) -> None:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError's str() adds quotes
    print(f"distbudget {command}: error: {text}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again (see the
    Python docs on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    finally:
        os.close(devnull)
