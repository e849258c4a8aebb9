"""The ``distbudget`` command line: one subcommand per module of this package, wired here."""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

import distbudget
from distbudget._exceptions import DistBudgetError
from distbudget.cli import admin, demo, doctor, install, ledger, prices, servers, status, watch
from distbudget.cli._common import CommandError
from distbudget.engines.codec import ERRORS as REDIS_ERRORS

DESCRIPTION = (
    "Operate distbudget fleets: see the budgets (status), reset them, check a server (doctor), follow "
    "alerts (watch), export the ledger, serve metrics and a dashboard, install the Functions library "
    "and print least-privilege ACLs, or run the demo. Commands that read a fleet take --redis "
    "(default: $DISTBUDGET_REDIS_URL) and --prefix."
)
# In the order `distbudget --help` lists them.
COMMANDS: tuple[ModuleType, ...] = (status, admin, doctor, watch, ledger, servers, install, prices, demo)
# Exit status when the reader of our output went away (`distbudget ledger | head`): as if killed by
# SIGPIPE, like any Unix filter, without a traceback.
BROKEN_PIPE = 141
# What a command reports as one error line (exit status 2), never a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (DistBudgetError, KeyError, ValueError, TypeError, *REDIS_ERRORS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distbudget", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"distbudget {distbudget.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
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
