"""What every command shares: how a command and its arguments are declared (:func:`command`,
:func:`arg`, :func:`exclusive`; the table is ``main.COMMANDS``), the shared options (``--redis``
from ``DISTBUDGET_REDIS_URL``, ``--prefix``, ...), the line saying which server and prefix a
command reads, number formats and colour. Tables are printed by ``_core.report.aligned``."""

from __future__ import annotations

import argparse
import inspect
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


# ---- declaring commands --------------------------------------------------------------------------

Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call. ``env``: the environment variable whose value, when set, is the
    default instead (read when the parser is built, so each ``main()`` sees the current one)."""

    flags: tuple[str, ...]
    options: dict[str, Any]
    env: str | None = None

    def add_to(self, parser: Any) -> None:
        options = dict(self.options)
        if self.env is not None:
            options["default"] = os.environ.get(self.env, options.get("default"))
        parser.add_argument(*self.flags, **options)


def arg(*flags: str, env: str | None = None, **options: Any) -> Arg:
    """An argument, declared with ``add_argument``'s words."""
    return Arg(flags, options, env)


@dataclass(frozen=True)
class Exclusive:
    """Options of which at most one may be given; ``defaults`` are set on the command."""

    args: tuple[Arg, ...]
    defaults: dict[str, Any]

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        for a in self.args:
            a.add_to(group)
        parser.set_defaults(**self.defaults)


def exclusive(*args: Arg, **defaults: Any) -> Exclusive:
    return Exclusive(args, defaults)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, the function it runs (whose docstring is its ``--help``
    description), its line in ``distbudget --help``, its arguments in the order ``--help`` lists
    them, and its own subcommands (``actions``, as ``ACTION``)."""

    name: str
    run: Run
    help: str
    args: tuple[Arg | Exclusive, ...] = ()
    aliases: tuple[str, ...] = ()
    actions: tuple[Command, ...] = ()

    def add_to(self, sub: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            self.name, aliases=list(self.aliases), help=self.help, description=inspect.getdoc(self.run)
        )
        for a in self.args:
            a.add_to(parser)
        parser.set_defaults(func=self.run)
        if self.actions:
            actions = parser.add_subparsers(dest="action", metavar="ACTION")
            for action in self.actions:
                action.add_to(actions)
        return parser


def command(
    name: str,
    run: Run,
    help: str,
    *args: Arg | Exclusive,
    aliases: tuple[str, ...] = (),
    actions: tuple[Command, ...] = (),
) -> Command:
    """``distbudget NAME``: runs ``run(args)``; see :class:`Command`."""
    return Command(name, run, help, args, aliases, actions)


def _prefix_arg(text: str) -> str:
    try:
        return check_prefix(text)
    except DistBudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The options shared by several commands, declared once.
CONNECTION = (
    arg(
        "--redis", metavar="URL", env=REDIS_ENV, help=f"the fleet's Redis (default: ${REDIS_ENV}, else {FALLBACK_URL})"
    ),
    arg(
        "--prefix",
        type=_prefix_arg,
        env=PREFIX_ENV,
        default="distbudget",
        help=f"the fleet's key prefix (default: ${PREFIX_ENV}, else distbudget)",
    ),
)
SCOPE = arg("scope", help="a registered scope")
YES = arg("--yes", action="store_true", help="do not ask for confirmation")


def count_option(flag: str, lo: int, hi: int, default: int, help: str) -> Arg:
    """A whole number ``N`` from ``lo`` to ``hi``."""
    return arg(flag, type=bounded(int, lo, hi), default=default, metavar="N", help=help)


def colour_option(help: str) -> Arg:
    return arg("--color", choices=("auto", "always", "never"), default="auto", help=help)


def listen_options(port: int) -> tuple[Arg, Arg]:
    """``--port`` (default ``port``) and ``--host`` of a server command."""
    return (
        arg("--port", type=bounded(int, 0, 65535), default=port, help=f"port to listen on (default {port})"),
        arg("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"),
    )


# ---- connection ------------------------------------------------------------------------------------


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
