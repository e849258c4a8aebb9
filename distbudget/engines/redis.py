"""The Redis engines: apply a plan with exactly one ``EVALSHA`` of a script from ``lua/``.

:func:`wire` turns an operation into (script, KEYS, ARGV, parser) — the one place that knows the
scripts' calling convention; :class:`RedisEngine` (redis-py) and :class:`AsyncRedisEngine`
(``redis.asyncio``) only send it. Scripts are registered once per client (``register_script``
reloads a script by itself after ``SCRIPT FLUSH``, a restart or a failover: ``NOSCRIPT`` never
reaches the caller). Time is the server's ``TIME`` unless a test injects a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio

from distbudget._core.plan import Plan, parse_admit, parse_charge, parse_summary, script_args
from distbudget._exceptions import BackendError

OPERATIONS = ("record", "commit", "check", "reserve", "release", "summary")
_TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}

_DOING = {"announce": "registering the alert stream", "delete": "reset"}

Wire = tuple[str, "tuple[str, ...] | list[str]", list[Any], Callable[[Any], Any]]


def _lua_dir() -> Path:
    """``lua/`` ships inside the wheel as ``distbudget/lua``; in a source tree it is top level."""
    packaged = resources.files("distbudget") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "lua"


@cache
def script_source(name: str) -> str:
    """A script with ``_common.lua`` prepended (Redis scripts cannot include each other)."""
    base = _lua_dir()
    return (base / "_common.lua").read_text("utf-8") + "\n" + (base / f"{name}.lua").read_text("utf-8")


def _check_url(url: str) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r} (use redis://, rediss:// or unix://)")


def connect(url: str, **options: Any) -> Any:
    """A redis-py client for a ``redis://``, ``rediss://`` or ``unix://`` URL, with timeouts."""
    _check_url(url)
    return redis.Redis.from_url(url, **{**_TIMEOUTS, **options})


def connect_async(url: str, max_connections: int = 64, **options: Any) -> Any:
    """A ``redis.asyncio`` client whose pool makes tasks wait for a free connection (rather than
    fail with "Too many connections") when hundreds of tasks call at once."""
    _check_url(url)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_TIMEOUTS["socket_timeout"], **{**_TIMEOUTS, **options}
    )
    return redis.asyncio.Redis(connection_pool=pool)


def _charge_keys(plan: Plan, request_key: str | None, ttl_ms: int) -> tuple[tuple[str, ...], str | int]:
    """A charge's KEYS: the plan's, the tree's alert stream, then the request key if any."""
    if request_key is None:
        return (*plan.keys, plan.keyspace.alerts), ""
    return (*plan.keys, plan.keyspace.alerts, request_key), ttl_ms


def wire(name: str, args: tuple[Any, ...]) -> Wire:
    """The script call for an engine operation (the same arguments the memory engine takes)."""
    if name == "record":
        plan, now, amt, rkey, ttl_ms = args
        keys, ttl = _charge_keys(plan, rkey, ttl_ms)
        return "record", keys, script_args(plan, now, amt, ttl, "", plan.alert_meta), parse_charge
    if name == "commit":
        plan, now, amt, hold_id, rkey, ttl_ms = args
        keys, ttl = _charge_keys(plan, rkey, ttl_ms)
        return "commit", keys, script_args(plan, now, amt, ttl, hold_id, plan.alert_meta), parse_charge
    if name == "check":
        plan, now, amt = args
        return "check", plan.keys, script_args(plan, now, amt), parse_admit
    if name == "reserve":
        plan, now, amt, hold_id, ttl_us = args
        return "reserve", plan.keys, script_args(plan, now, amt, "", hold_id, ttl_us), parse_admit
    if name == "release":
        plan, hold_id = args
        return "release", plan.keys[:2], ["", 0, 0, 0, "", hold_id, ""], bool
    if name == "summary":
        plan, now = args
        return "summary", plan.keys, script_args(plan, now, (0, 0, 0), plan.totals_key_index), parse_summary
    raise ValueError(f"unknown engine operation {name!r}")


class RedisEngine:
    """Applies plans on one redis-py client (``Redis``, ``RedisCluster``)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}

    def apply(self, name: str, args: tuple[Any, ...]) -> Any:
        try:
            if name == "delete":
                return self.client.delete(*args[0])
            if name == "announce":
                return self.client.hset(args[0], mapping=args[1])
            op, keys, argv, parse = wire(name, args)
            return parse(self.scripts[op](keys=keys, args=argv))
        except redis.RedisError as exc:
            raise BackendError(f"Redis {_DOING.get(name, name)} failed: {exc}") from exc


class AsyncRedisEngine:
    """The same on a ``redis.asyncio`` client: never blocks the event loop."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}

    async def apply(self, name: str, args: tuple[Any, ...]) -> Any:
        try:
            if name == "delete":
                return await self.client.delete(*args[0])
            if name == "announce":
                return await self.client.hset(args[0], mapping=args[1])
            op, keys, argv, parse = wire(name, args)
            return parse(await self.scripts[op](keys=keys, args=argv))
        except redis.RedisError as exc:
            raise BackendError(f"Redis {_DOING.get(name, name)} failed: {exc}") from exc
