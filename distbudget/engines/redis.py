"""The Redis engines: apply a plan with exactly one ``EVALSHA`` of a script from ``lua/``.

:func:`wire` turns an operation into (script, KEYS, ARGV, parser) — the one place that knows the
scripts' calling convention; :class:`RedisEngine` (redis-py) and :class:`AsyncRedisEngine`
(``redis.asyncio``) only send it. Scripts are registered once per client (``register_script``
reloads a script by itself after ``SCRIPT FLUSH``, a restart or a failover: ``NOSCRIPT`` never
reaches the caller). Time is the server's ``TIME`` unless a test injects a clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import redis
import redis.exceptions

from distbudget._core.plan import Plan, parse_admit, parse_charge, parse_summary, script_args
from distbudget._exceptions import BackendError
from distbudget.engines import connect as _connect

OPERATIONS = ("record", "commit", "check", "reserve", "release", "summary", "reset", "registry")

_DOING = {
    "announce": "registering the alert stream",
    "registry_names": "listing the registry",
    "ledger_read": "reading the ledger",
}

log = logging.getLogger("distbudget")

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
    _connect.check_url(url)


def connect(url: str, **options: Any) -> Any:
    """A redis-py client for any distbudget URL (standalone, Cluster, Sentinel; see ``connect.py``)."""
    return _connect.connect(url, **options)


def connect_async(url: str, max_connections: int = 64, **options: Any) -> Any:
    """A ``redis.asyncio`` client for any distbudget URL (see ``connect.py``)."""
    return _connect.connect_async(url, max_connections, **options)


def _charge_keys(plan: Plan, request_key: str | None, ttl_ms: int, record: bool) -> tuple[Any, str | int]:
    """A charge's KEYS: the plan's (record's without the holds hash and leases), the tree's alert and
    ledger streams, then the request key if any."""
    keys = plan.record_keys if record else plan.charge_keys
    if request_key is None:
        return keys, ""
    return (*keys, request_key), ttl_ms


def _parse_reset(raw: object) -> tuple[tuple[int, int, int], str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    amounts, _, ledger_id = text.partition("|")
    t, c, r = (int(v) for v in amounts.split())
    return (t, c, r), ledger_id


def _texts(raw: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in raw]


def _charge(name: str) -> Callable[[tuple[Any, ...]], Wire]:
    def build(args: tuple[Any, ...]) -> Wire:
        if name == "record":
            plan, now, amt, rkey, ttl_ms, (maxlen, entry) = args
            hold_id = ""
        else:
            plan, now, amt, hold_id, rkey, ttl_ms, (maxlen, entry) = args
        keys, ttl = _charge_keys(plan, rkey, ttl_ms, name == "record")
        return name, keys, script_args(plan, now, amt, ttl, hold_id, plan.alert_meta, maxlen, entry), parse_charge

    return build


def _reset(args: tuple[Any, ...]) -> Wire:
    mode, keys, now, field_prefix, (maxlen, entry) = args
    return "reset", keys, ["" if now is None else now, mode, field_prefix, maxlen, entry], _parse_reset


def _admit(name: str) -> Callable[[tuple[Any, ...]], Wire]:
    def build(args: tuple[Any, ...]) -> Wire:
        if name == "check":
            plan, now, amt = args
            return "check", plan.keys, script_args(plan, now, amt), parse_admit
        plan, now, amt, hold_id, ttl_us = args
        return "reserve", plan.keys, script_args(plan, now, amt, "", hold_id, ttl_us), parse_admit

    return build


_WIRES: dict[str, Callable[[tuple[Any, ...]], Wire]] = {
    "record": _charge("record"),
    "commit": _charge("commit"),
    "check": _admit("check"),
    "reserve": _admit("reserve"),
    "release": lambda a: ("release", a[0].keys[:2], ["", 0, 0, 0, "", a[1], ""], bool),
    "summary": lambda a: (
        "summary",
        a[0].keys,
        script_args(a[0], a[1], (0, 0, 0), a[0].totals_key_index),
        parse_summary,
    ),
    "reset": _reset,
    "registry": lambda a: ("registry", [a[0]], list(a[1:]), _texts),
}


def wire(name: str, args: tuple[Any, ...]) -> Wire:
    """The script call for an engine operation (the same arguments the memory engine takes)."""
    build = _WIRES.get(name)
    if build is None:
        raise ValueError(f"unknown engine operation {name!r}")
    return build(args)


# With wait=(replicas, timeout ms): the scripts that charge or hold are followed by WAIT (see connect.py).
WAIT_OPS = frozenset({"record", "commit", "reserve"})


def _check_wait(client: Any, wait: tuple[int, int] | None) -> tuple[int, int] | None:
    if wait is None or not wait[0]:
        return None
    if _connect.is_cluster_client(client):
        raise ValueError("wait_replicas is not supported on Redis Cluster clients")
    replicas, timeout_ms = wait
    if replicas < 0 or timeout_ms < 0:
        raise ValueError("wait needs (replicas >= 0, timeout_ms >= 0)")
    return replicas, timeout_ms


def _replicated(result: Any, acked: Any, wait: tuple[int, int]) -> int:
    """Raise the script's error; else 1 if fewer replicas than asked acknowledged the write."""
    if isinstance(result, Exception):
        raise result
    if isinstance(acked, Exception) or int(acked) < wait[0]:
        log.warning("a charge is on the master but only on %s of %d replicas after %d ms", acked, *wait)
        return 1
    return 0


def _many_results(raw: list[Any], wait: tuple[int, int] | None) -> tuple[list[Any], int]:
    """A record_many pipeline's replies: the scripts' (NoScriptError left in place for a retry),
    and how many charges its WAIT left under-replicated (all that ran, or none). Any other error
    is raised."""
    acked = raw.pop() if wait is not None else None
    for r in raw:
        if isinstance(r, Exception) and not isinstance(r, redis.exceptions.NoScriptError):
            raise r
    ran = sum(not isinstance(r, Exception) for r in raw)
    if wait is None or not ran:
        return raw, 0
    return raw, _replicated(None, acked, wait) * ran


class RedisEngine:
    """Applies plans on one redis-py client (``Redis``, ``RedisCluster``)."""

    def __init__(self, client: Any, wait: tuple[int, int] | None = None) -> None:
        self.client = client
        self.scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}
        self.wait = _check_wait(client, wait)
        self.under_replicated = 0  # charges WAIT returned on before enough replicas acknowledged

    def _run(self, op: str, keys: Any, argv: list[Any]) -> Any:
        """One script call; with ``wait``, a charge and ``WAIT`` in one pipeline (one round trip)."""
        script = self.scripts[op]
        if self.wait is None or op not in WAIT_OPS:
            return script(keys=keys, args=argv)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *argv)
            pipe.execute_command("WAIT", *self.wait)
            result, acked = pipe.execute(raise_on_error=False)
            if not isinstance(result, redis.exceptions.NoScriptError):
                break
            script.sha = self.client.script_load(script.script)  # SCRIPT FLUSH, restart, failover
        self.under_replicated += _replicated(result, acked, self.wait)
        return result

    def _record_many(self, batch: tuple[tuple[Any, ...], ...]) -> list[Any]:
        """Every record of the batch in one pipeline (one round trip; each its own script), then
        WAIT when configured. A NOSCRIPT reply (SCRIPT FLUSH, restart, failover) means that charge
        did not run: the script is loaded and those charges alone are sent again."""
        script = self.scripts["record"]
        calls = [wire("record", args)[1:3] for args in batch]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                keys, argv = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *argv)
            if self.wait is not None:
                pipe.execute_command("WAIT", *self.wait)
            raw, under = _many_results(pipe.execute(raise_on_error=False), self.wait)
            self.under_replicated += under
            for i, r in zip(todo, raw, strict=True):
                results[i] = r
            todo = [i for i in todo if isinstance(results[i], redis.exceptions.NoScriptError)]
            if not todo:
                break
            if attempt == 0:
                script.sha = self.client.script_load(script.script)
        if todo:
            raise results[todo[0]]
        return [parse_charge(r) for r in results]

    def apply(self, name: str, args: tuple[Any, ...]) -> Any:
        try:
            if name == "announce":
                return self.client.hset(args[0], mapping=args[1])
            if name == "registry_names":
                return _texts(self.client.hkeys(args[0]))
            if name == "ledger_read":
                key, start, count = args
                return self.client.xrange(key, start, "+", count)
            if name == "record_many":
                return self._record_many(args[0])
            op, keys, argv, parse = wire(name, args)
            return parse(self._run(op, keys, argv))
        except redis.RedisError as exc:
            raise BackendError(f"Redis {_DOING.get(name, name)} failed: {exc}") from exc


class AsyncRedisEngine:
    """The same on a ``redis.asyncio`` client: never blocks the event loop."""

    def __init__(self, client: Any, wait: tuple[int, int] | None = None) -> None:
        self.client = client
        self.scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}
        self.wait = _check_wait(client, wait)
        self.under_replicated = 0
        # redis.asyncio's RedisCluster breaks connections when many tasks make its first calls at once
        # (they all wait on its slot-map initialisation, then race): initialise once, first.
        self._cluster_init: asyncio.Lock | None = asyncio.Lock() if _connect.is_cluster_client(client) else None

    async def _initialise(self) -> None:
        assert self._cluster_init is not None
        async with self._cluster_init:
            if self._cluster_init is not None:
                await self.client.initialize()
                self._cluster_init = None

    async def _run(self, op: str, keys: Any, argv: list[Any]) -> Any:
        script = self.scripts[op]
        if self.wait is None or op not in WAIT_OPS:
            return await script(keys=keys, args=argv)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *argv)
            pipe.execute_command("WAIT", *self.wait)
            result, acked = await pipe.execute(raise_on_error=False)
            if not isinstance(result, redis.exceptions.NoScriptError):
                break
            script.sha = await self.client.script_load(script.script)
        self.under_replicated += _replicated(result, acked, self.wait)
        return result

    async def _record_many(self, batch: tuple[tuple[Any, ...], ...]) -> list[Any]:
        """See :meth:`RedisEngine._record_many`."""
        script = self.scripts["record"]
        calls = [wire("record", args)[1:3] for args in batch]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                keys, argv = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *argv)
            if self.wait is not None:
                pipe.execute_command("WAIT", *self.wait)
            raw, under = _many_results(await pipe.execute(raise_on_error=False), self.wait)
            self.under_replicated += under
            for i, r in zip(todo, raw, strict=True):
                results[i] = r
            todo = [i for i in todo if isinstance(results[i], redis.exceptions.NoScriptError)]
            if not todo:
                break
            if attempt == 0:
                script.sha = await self.client.script_load(script.script)
        if todo:
            raise results[todo[0]]
        return [parse_charge(r) for r in results]

    async def apply(self, name: str, args: tuple[Any, ...]) -> Any:
        try:
            if self._cluster_init is not None:
                await self._initialise()
            if name == "announce":
                return await self.client.hset(args[0], mapping=args[1])
            if name == "registry_names":
                return _texts(await self.client.hkeys(args[0]))
            if name == "ledger_read":
                key, start, count = args
                return await self.client.xrange(key, start, "+", count)
            if name == "record_many":
                return await self._record_many(args[0])
            op, keys, argv, parse = wire(name, args)
            return parse(await self._run(op, keys, argv))
        except redis.RedisError as exc:
            raise BackendError(f"Redis {_DOING.get(name, name)} failed: {exc}") from exc
