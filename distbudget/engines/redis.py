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
from typing import Any

import redis
import redis.asyncio.cluster
import redis.exceptions

from distbudget._core.plan import Plan, parse_admit, parse_charge, parse_summary, script_args
from distbudget._exceptions import BackendError, BatchError
from distbudget.engines import connect as _connect
from distbudget.engines.scripts import OPERATIONS
from distbudget.engines.scripts import source as script_source

_DOING = {
    "announce": "registering the alert stream",
    "registry_names": "listing the registry",
    "ledger_read": "reading the ledger",
}

log = logging.getLogger("distbudget")

# What a redis-py call raises when Redis fails. The Cluster clients raise RedisClusterException (not a
# RedisError) when no node answers, and SlotNotCoveredError (one) when a slot has no node.
ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
# Replies meaning a script did not run and must be sent elsewhere (or later): a Cluster redirection.
_REDIRECTS = (redis.exceptions.AskError, redis.exceptions.TryAgainError)  # MovedError is an AskError
AsyncPipelineCommand: Any = redis.asyncio.cluster.PipelineCommand

Wire = tuple[str, "tuple[str, ...] | list[str]", list[Any], Callable[[Any], Any]]


def _check_url(url: str) -> None:
    _connect.check_url(url)


def connect(url: str, *, lazy: bool = False, **options: Any) -> Any:
    """A redis-py client for any distbudget URL (standalone, Cluster, Sentinel; see ``connect.py``)."""
    return _connect.connect(url, lazy=lazy, **options)


def connect_async(url: str, max_connections: int = 64, *, lazy: bool = False, **options: Any) -> Any:
    """A ``redis.asyncio`` client for any distbudget URL (see ``connect.py``)."""
    return _connect.connect_async(url, max_connections, lazy=lazy, **options)


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
    """A record_many pipeline's replies (each script's, an error reply in place), and how many
    charges its WAIT left under-replicated (all that ran, or none)."""
    acked = raw.pop() if wait is not None else None
    ran = sum(not isinstance(r, Exception) for r in raw)
    if wait is None or not ran:
        return raw, 0
    return raw, _replicated(None, acked, wait) * ran


def _evalsha(sha: str, keys: Any, argv: list[Any]) -> tuple[Any, ...]:
    return ("EVALSHA", sha, len(keys), *keys, *argv)


def _by_node(client: Any, commands: list[tuple[Any, ...]], replies: list[Any]) -> dict[str, tuple[Any, list[int]]]:
    """A Cluster client's commands grouped by the node of their first key (a command whose slot has
    no node gets that error as its reply)."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, command in enumerate(commands):
        try:
            node = client.get_node_from_key(command[3])
        except ERRORS as exc:
            replies[i] = exc
            continue
        groups.setdefault(node.name, (node, []))[1].append(i)
    return groups


def _outcomes(results: list[Any]) -> list[Any]:
    """A record_many batch's parsed answers. When the round trip itself failed (every call has the
    same error) that error is raised; when only some calls failed, a :class:`BatchError` carrying
    each call's answer or error (the failure policy settles them one by one)."""
    failed = [r for r in results if isinstance(r, Exception)]
    if not failed:
        return [parse_charge(r) for r in results]
    first = failed[0]
    if all(r is first for r in results):
        raise first
    per_call: list[Any] = []
    for r in results:
        if isinstance(r, Exception):
            err = BackendError(f"Redis record failed: {r}")
            err.__cause__ = r
            per_call.append(err)
        else:
            per_call.append(parse_charge(r))
    msg = f"Redis record_many: {len(failed)} of {len(results)} charges failed (first: {first})"
    raise BatchError(msg, per_call) from first


_WARNED: set[int] = set()


def warn_if_retrying(client: Any) -> None:
    """A ready client built with redis-py's defaults re-sends a command after a connection error: a
    script whose reply was lost would then charge twice. Say so once per client (URL clients never
    retry; see connect.py)."""
    get = getattr(client, "get_retry", None)
    retry = get() if callable(get) else getattr(client, "retry", None)  # (RedisCluster: no get_retry)
    retries = getattr(retry, "_retries", 0)
    allowed = getattr(client, "ERRORS_ALLOW_RETRY", None)  # a cluster client retries only these
    if allowed is not None and not any(
        issubclass(e, (ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError)) for e in allowed
    ):
        retries = 0
    if isinstance(retries, int) and retries > 0 and id(client) not in _WARNED:
        _WARNED.add(id(client))
        log.warning(
            "distbudget: this redis-py client re-sends a command after a connection error (%d retries): "
            "a charge whose reply was lost may be counted twice; build the client with "
            "retry=Retry(NoBackoff(), 0), or pass a URL",
            retries,
        )


class RedisEngine:
    """Applies plans on one redis-py client (``Redis``, ``RedisCluster``)."""

    def __init__(self, client: Any, wait: tuple[int, int] | None = None) -> None:
        warn_if_retrying(client)
        self.wait = _check_wait(client, wait)
        self.under_replicated = 0  # charges WAIT returned on before enough replicas acknowledged
        # A Cluster client that could not be built (no node answered; see connect(lazy=True)) is
        # built at the first call instead: until then ``client`` is that PendingClient.
        self.client: Any = client
        self.scripts: dict[str, Any] = {}
        self._pending = client if isinstance(client, _connect.PendingClient) else None
        if self._pending is None:
            self.scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}

    def _ready(self) -> None:
        pending = self._pending
        if pending is not None:
            client = pending.get()  # raises while no node answers
            self.scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}
            self.client = client
            self._pending = None

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
        did not run: the script is loaded and those charges alone are sent again. Nothing else is
        ever sent twice. Each call's outcome is its own (see :func:`_outcomes`)."""
        script = self.scripts["record"]
        calls = [wire("record", args)[1:3] for args in batch]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            try:
                if attempt:
                    script.sha = self.client.script_load(script.script)
                raw = self._send_many([_evalsha(script.sha, *calls[i]) for i in todo])
            except ERRORS as exc:  # loading the script failed: those charges did not run
                raw = [exc] * len(todo)
            for i, r in zip(todo, raw, strict=True):
                results[i] = r
            todo = [i for i in todo if isinstance(results[i], redis.exceptions.NoScriptError)]
            if not todo:
                break
        return _outcomes(results)

    def _send_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands in one round trip: their replies, an error reply in place of its command's. When
        the round trip itself fails, its error is every command's (each may have run)."""
        if _connect.is_cluster_client(self.client):
            return self._send_cluster(commands)
        pipe = self.client.pipeline(transaction=False)  # our clients never re-send (connect.py)
        for command in commands:
            pipe.execute_command(*command)
        if self.wait is not None:
            pipe.execute_command("WAIT", *self.wait)
        try:
            raw, under = _many_results(pipe.execute(raise_on_error=False), self.wait)
        except ERRORS as exc:
            return [exc] * len(commands)
        self.under_replicated += under
        return raw

    def _send_cluster(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """On a Cluster, each node's commands in one pipeline of that node's own client, which never
        re-sends (redis-py's ClusterPipeline sends a node's commands again one by one after a timeout
        or a lost connection, though the scripts may have run). A redirection (MOVED, ASK, TRYAGAIN:
        the script did not run) is followed by sending that command alone through the Cluster client."""
        replies: list[Any] = [None] * len(commands)
        for node, indexes in _by_node(self.client, commands, replies).values():
            pipe = self.client.get_redis_connection(node).pipeline(transaction=False)
            for i in indexes:
                pipe.execute_command(*commands[i])
            try:
                raw = pipe.execute(raise_on_error=False)
            except ERRORS as exc:
                raw = [exc] * len(indexes)
            for i, r in zip(indexes, raw, strict=True):
                replies[i] = r
        for i, r in enumerate(replies):
            if isinstance(r, _REDIRECTS):
                try:
                    replies[i] = self.client.execute_command(*commands[i])
                except ERRORS as exc:
                    replies[i] = exc
        return replies

    def apply(self, name: str, args: tuple[Any, ...]) -> Any:
        try:
            if self._pending is not None:
                self._ready()
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
        except ERRORS as exc:
            raise BackendError(f"Redis {_DOING.get(name, name)} failed: {exc}") from exc


class AsyncRedisEngine:
    """The same on a ``redis.asyncio`` client: never blocks the event loop."""

    def __init__(self, client: Any, wait: tuple[int, int] | None = None) -> None:
        warn_if_retrying(client)
        self.client = client
        self.scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}
        self.wait = _check_wait(client, wait)
        self.under_replicated = 0
        # redis.asyncio's RedisCluster breaks connections when many tasks make its first calls at once
        # (they all wait on its slot-map initialisation, then race): initialise once, first.
        self._cluster = _connect.is_cluster_client(client)
        self._cluster_init: asyncio.Lock | None = asyncio.Lock() if self._cluster else None

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
            try:
                if attempt:
                    script.sha = await self.client.script_load(script.script)
                raw = await self._send_many([_evalsha(script.sha, *calls[i]) for i in todo])
            except ERRORS as exc:
                raw = [exc] * len(todo)
            for i, r in zip(todo, raw, strict=True):
                results[i] = r
            todo = [i for i in todo if isinstance(results[i], redis.exceptions.NoScriptError)]
            if not todo:
                break
        return _outcomes(results)

    async def _send_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """See :meth:`RedisEngine._send_many`."""
        if self._cluster:
            return await self._send_cluster(commands)
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        if self.wait is not None:
            pipe.execute_command("WAIT", *self.wait)
        try:
            raw, under = _many_results(await pipe.execute(raise_on_error=False), self.wait)
        except ERRORS as exc:
            return [exc] * len(commands)
        self.under_replicated += under
        return raw

    async def _send_cluster(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """See :meth:`RedisEngine._send_cluster`: each node's commands in one pipeline on one of
        that node's connections (``redis.asyncio``'s ClusterPipeline sends the whole batch again
        when writing it failed, though part of it may have reached the node)."""
        await self.client.initialize()  # a no-op unless redis-py asked for a slot-map refresh
        replies: list[Any] = [None] * len(commands)

        async def send(node: Any, indexes: list[int]) -> None:
            staged = [AsyncPipelineCommand(i, *commands[i]) for i in indexes]
            try:
                await node.execute_pipeline(staged)  # each reply (or error reply) in .result
                raw = [c.result for c in staged]
            except ERRORS as exc:
                raw = [exc] * len(indexes)
            for i, r in zip(indexes, raw, strict=True):
                replies[i] = r

        groups = _by_node(self.client, commands, replies)
        await asyncio.gather(*(send(node, indexes) for node, indexes in groups.values()))
        for i, r in enumerate(replies):
            if isinstance(r, _REDIRECTS):
                try:
                    replies[i] = await self.client.execute_command(*commands[i])
                except ERRORS as exc:
                    replies[i] = exc
        return replies

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
        except ERRORS as exc:
            raise BackendError(f"Redis {_DOING.get(name, name)} failed: {exc}") from exc
