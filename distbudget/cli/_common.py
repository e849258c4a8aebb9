"""What every command shares: the connection options (``--redis`` from ``DISTBUDGET_REDIS_URL``,
``--prefix``), the line saying which server and prefix a command reads, number formats, tables and
colour."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from distbudget._core.keys import alert_index_key, check_prefix, registry_key
from distbudget._exceptions import DistBudgetError

REDIS_ENV = "DISTBUDGET_REDIS_URL"
PREFIX_ENV = "DISTBUDGET_PREFIX"
FALLBACK_URL = "redis://127.0.0.1:6379/0"
N = TypeVar("N", int, float)


class CommandError(DistBudgetError):
    """A command cannot do its job: printed as ``distbudget CMD: error: ...``, exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---- formats -------------------------------------------------------------------------------------


def usd(value: float) -> str:
    return f"${value:,.6f}"


def amount(metric: str, value: float) -> str:
    """A limit's amount as people read it: dollars for cost, whole numbers otherwise."""
    return usd(value) if metric == "cost" else f"{int(value):,}"


def pct(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.1%}"


def redact(url: str) -> str:
    """A Redis URL without its credentials (everything before the last '@', however it is
    written: an un-encoded '#', '?' or '/' in a password must not leak either)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    base, qmark, query = rest.partition("?")
    if qmark:  # ?password= / ?sentinel_password= carry credentials too
        pairs = [p.partition("=") for p in query.split("&")]
        query = "&".join(k + eq + ("***" if "password" in k.lower() else v) for k, eq, v in pairs)
    return f"{scheme}://{base}{qmark}{query}"


def table(rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    """Rows as aligned columns (``right``: the right-aligned column indexes)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


# Plain ANSI rather than rich: three colours do not justify a dependency, and the core stays `redis` only.
RED, YELLOW, GREEN, BOLD, DIM, RESET = "\x1b[31m", "\x1b[33m", "\x1b[32m", "\x1b[1m", "\x1b[2m", "\x1b[0m"


def use_colour(stream: Any, choice: str) -> bool:
    """``--color auto``: only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if choice != "auto":
        return choice == "always"
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def level_colour(fraction: float, thresholds: list[float]) -> str:
    """Red at or over the last threshold (the limit), yellow past the first (the warning), else green."""
    if thresholds and fraction >= thresholds[-1]:
        return RED
    if thresholds and fraction >= thresholds[0]:
        return YELLOW
    return GREEN


def bounded(convert: Callable[[str], N], lo: N, hi: N, unit: str = "") -> Callable[[str], N]:
    """An argparse ``type``: ``convert`` (int or float) the text, then check ``lo <= value <= hi``."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            kind = "a whole number" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}{unit}, got {text}")
        return value

    return parse


# ---- connection ------------------------------------------------------------------------------------


def add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get(REDIS_ENV),
        help=f"the fleet's Redis (default: ${REDIS_ENV}, else {FALLBACK_URL})",
    )
    parser.add_argument(
        "--prefix",
        type=_prefix_arg,
        default=os.environ.get(PREFIX_ENV, "distbudget"),
        help=f"the fleet's key prefix (default: ${PREFIX_ENV}, else distbudget)",
    )


def _prefix_arg(text: str) -> str:
    try:
        return check_prefix(text)
    except DistBudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass
class Connection:
    """A command's view of one fleet: the client, the URL it came from and the prefix."""

    url: str
    prefix: str
    client: Any

    @property
    def registry(self) -> str:
        return registry_key(self.prefix)

    def manager(self) -> Any:
        from distbudget.manager import BudgetManager

        return BudgetManager(redis=self.client, prefix=self.prefix)


def connect(args: argparse.Namespace, *, need: str = "registry") -> Connection:
    """Connect to ``--redis``, say on stderr which server and prefix this command reads, and check
    that the prefix holds a registry (``need="alerts"``: a registry or an alert-stream index;
    ``need=""``: nothing)."""
    from distbudget.engines.connect import connect as redis_connect

    url = args.redis or FALLBACK_URL
    print(f"distbudget {args.command}: reading {redact(url)}, prefix {args.prefix!r}", file=sys.stderr, flush=True)
    conn = Connection(url, args.prefix, redis_connect(url))
    if need:
        wanted = [conn.registry] + ([alert_index_key(args.prefix)] if need == "alerts" else [])
        if not _any_exists(conn.client, wanted):
            raise CommandError(
                f"no registry under prefix {args.prefix!r} on {redact(url)}: no scope was registered there "
                "(check --prefix and --redis)"
            )
    return conn


def _any_exists(client: Any, keys: list[str]) -> bool:
    from distbudget._exceptions import BackendError
    from distbudget.engines.codec import ERRORS

    try:
        # HKEYS, not EXISTS: a worker's least-privilege ACL (engines/connect.py) grants only the former;
        # one key at a time: on Redis Cluster the keys may live on different shards
        return any(client.hkeys(key) for key in keys)
    except ERRORS as exc:
        raise BackendError(f"Redis unreachable: {exc}") from exc
