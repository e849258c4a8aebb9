"""The Redis engines: apply each operation with exactly one ``EVALSHA`` of a script from ``lua/``
(or, for reads and the alert-stream index, one plain command).

The codec (``codec.py``) turns an operation into a script call and the reply into its result, and
classifies redis-py's errors; :class:`RedisEngine` (redis-py) and :class:`AsyncRedisEngine`
(``redis.asyncio``) only send what it builds: twins kept thin, the I/O alone. Scripts are
registered once per client (``register_script`` reloads a script by itself after ``SCRIPT FLUSH``, a
restart or a failover: ``NOSCRIPT`` never reaches the caller). Time is the server's ``TIME`` unless a
test injects a clock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar, cast

import redis
import redis.asyncio.cluster
import redis.exceptions

from distbudget._core.ops import Announce, LedgerRead, Operation, RecordMany, RegistryNames
from distbudget.engines import connect as _connect
from distbudget.engines.codec import ERRORS, Codec, ScriptCall, backend_error, charges, doing, ledger_rows, texts
from distbudget.engines.scripts import OPERATIONS as SCRIPTS
from distbudget.engines.scripts import source as script_source

R = TypeVar("R")

log = logging.getLogger("distbudget")

# Replies meaning a script did not run and must be sent elsewhere (or later): a Cluster redirection.
_REDIRECTS = (redis.exceptions.AskError, redis.exceptions.TryAgainError)  # MovedError is an AskError
AsyncPipelineCommand: Any = redis.asyncio.cluster.PipelineCommand


def _check_url(url: str) -> None:
    _connect.check_url(url)


def connect(url: str, *, lazy: bool = False, **options: Any) -> Any:
    """A redis-py client for any distbudget URL (standalone, Cluster, Sentinel; see ``connect.py``)."""
    return _connect.connect(url, lazy=lazy, **options)


def connect_async(url: str, max_connections: int = 64, *, lazy: bool = False, **options: Any) -> Any:
    """A ``redis.asyncio`` client for any distbudget URL (see ``connect.py``)."""
    return _connect.connect_async(url, max_connections, lazy=lazy, **options)


# With wait=(replicas, timeout ms): the scripts that charge or hold are followed by WAIT (see connect.py).


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


def _noscript(replies: list[Any]) -> list[int]:
    """The commands answered NOSCRIPT (the script was flushed: they did not run)."""
    return [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]


def _with_sha(command: tuple[Any, ...], sha: str) -> tuple[Any, ...]:
    return (command[0], sha, *command[2:])


def _put(replies: list[Any], indexes: list[int], answers: list[Any]) -> None:
    for i, answer in zip(indexes, answers, strict=True):
        replies[i] = answer


def _redirected(replies: list[Any]) -> list[int]:
    """Commands a Cluster redirected (MOVED, ASK, TRYAGAIN: not run), to send alone."""
    return [i for i, r in enumerate(replies) if isinstance(r, _REDIRECTS)]


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


class _Base:
    """What both engines keep: the client, its scripts, the codec, the WAIT setting."""

    def __init__(self, client: Any, wait: tuple[int, int] | None) -> None:
        warn_if_retrying(client)
        self.wait = _check_wait(client, wait)
        self.under_replicated = 0  # charges WAIT returned on before enough replicas acknowledged
        self.codec = Codec()
        self.client: Any = client
        self.scripts: dict[str, Any] = {}

    def _register(self, client: Any) -> None:
        self.scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}

    def _encode_many(self, op: RecordMany) -> list[tuple[Any, ...]]:
        """A batch's record scripts as raw ``EVALSHA`` commands (for a pipeline)."""
        sha = self.scripts["record"].sha
        return [_evalsha(sha, c.keys, c.argv) for c in map(self.codec.encode, op.records)]


class RedisEngine(_Base):
    """Applies operations on one redis-py client (``Redis``, ``RedisCluster``)."""

    def __init__(self, client: Any, wait: tuple[int, int] | None = None) -> None:
        super().__init__(client, wait)
        # A Cluster client that could not be built (no node answered; see connect(lazy=True)) is
        # built at the first call instead: until then ``client`` is that PendingClient.
        self._pending = client if isinstance(client, _connect.PendingClient) else None
        if self._pending is None:
            self._register(client)

    def execute(self, op: Operation[R]) -> R:
        """Apply one operation (see ``engines/base.py``)."""
        try:
            if self._pending is not None:
                self.client = self._pending.get()  # raises while no node answers
                self._register(self.client)
                self._pending = None
            if isinstance(op, RecordMany):
                return cast("R", self._record_many(op))
            if isinstance(op, (LedgerRead, RegistryNames, Announce)):
                return cast("R", self._command(op))
            call = self.codec.encode(op)
            return call.parse(self._run(call))
        except ERRORS as exc:
            raise backend_error(doing(op), exc) from exc

    def _command(self, op: LedgerRead | RegistryNames | Announce) -> object:
        if isinstance(op, LedgerRead):
            return ledger_rows(self.client.xrange(op.key, op.start, "+", op.count))
        if isinstance(op, RegistryNames):
            return texts(self.client.hkeys(op.key))
        self.client.hset(op.index_key, mapping=op.streams)
        return None

    def _run(self, call: ScriptCall[Any]) -> Any:
        """One script call; with ``wait``, a charge and ``WAIT`` in one pipeline (one round trip)."""
        script = self.scripts[call.script]
        if self.wait is None or not call.writes:
            return script(keys=call.keys, args=call.argv)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.argv)
            pipe.execute_command("WAIT", *self.wait)
            result, acked = pipe.execute(raise_on_error=False)
            if not isinstance(result, redis.exceptions.NoScriptError):
                break
            script.sha = self.client.script_load(script.script)  # SCRIPT FLUSH, restart, failover
        self.under_replicated += _replicated(result, acked, self.wait)
        return result

    def _record_many(self, op: RecordMany) -> list[Any]:
        """Every record of the batch in one pipeline (one round trip; each its own script), then
        WAIT when configured. A NOSCRIPT reply (SCRIPT FLUSH, restart, failover) means that charge
        did not run: the script is loaded and those charges alone are sent again. Nothing else is
        ever sent twice. Each call's outcome is its own (see ``codec.charges``)."""
        commands = self._encode_many(op)
        replies = self._send_many(commands)
        again = _noscript(replies)
        if again:
            try:
                sha = self.scripts["record"].sha = self.client.script_load(self.scripts["record"].script)
                resent = self._send_many([_with_sha(commands[i], sha) for i in again])
            except ERRORS as exc:  # loading the script failed: those charges did not run
                resent = [exc] * len(again)
            _put(replies, again, resent)
        return charges(replies)

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
        for i in _redirected(replies):
            try:
                replies[i] = self.client.execute_command(*commands[i])
            except ERRORS as exc:
                replies[i] = exc
        return replies


class AsyncRedisEngine(_Base):
    """The same on a ``redis.asyncio`` client: never blocks the event loop."""

    def __init__(self, client: Any, wait: tuple[int, int] | None = None) -> None:
        super().__init__(client, wait)
        self._register(client)
        # redis.asyncio's RedisCluster breaks connections when many tasks make its first calls at once
        # (they all wait on its slot-map initialisation, then race): initialise once, first.
        self._cluster = _connect.is_cluster_client(client)
        self._cluster_init: asyncio.Lock | None = asyncio.Lock() if self._cluster else None

    async def execute(self, op: Operation[R]) -> R:
        """Apply one operation (see ``engines/base.py``)."""
        try:
            if self._cluster_init is not None:
                async with self._cluster_init:
                    if self._cluster_init is not None:
                        await self.client.initialize()
                        self._cluster_init = None
            if isinstance(op, RecordMany):
                return cast("R", await self._record_many(op))
            if isinstance(op, (LedgerRead, RegistryNames, Announce)):
                return cast("R", await self._command(op))
            call = self.codec.encode(op)
            return call.parse(await self._run(call))
        except ERRORS as exc:
            raise backend_error(doing(op), exc) from exc

    async def _command(self, op: LedgerRead | RegistryNames | Announce) -> object:
        if isinstance(op, LedgerRead):
            return ledger_rows(await self.client.xrange(op.key, op.start, "+", op.count))
        if isinstance(op, RegistryNames):
            return texts(await self.client.hkeys(op.key))
        await self.client.hset(op.index_key, mapping=op.streams)
        return None

    async def _run(self, call: ScriptCall[Any]) -> Any:
        script = self.scripts[call.script]
        if self.wait is None or not call.writes:
            return await script(keys=call.keys, args=call.argv)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.argv)
            pipe.execute_command("WAIT", *self.wait)
            result, acked = await pipe.execute(raise_on_error=False)
            if not isinstance(result, redis.exceptions.NoScriptError):
                break
            script.sha = await self.client.script_load(script.script)
        self.under_replicated += _replicated(result, acked, self.wait)
        return result

    async def _record_many(self, op: RecordMany) -> list[Any]:
        """See :meth:`RedisEngine._record_many`."""
        commands = self._encode_many(op)
        replies = await self._send_many(commands)
        again = _noscript(replies)
        if again:
            try:
                sha = self.scripts["record"].sha = await self.client.script_load(self.scripts["record"].script)
                resent = await self._send_many([_with_sha(commands[i], sha) for i in again])
            except ERRORS as exc:
                resent = [exc] * len(again)
            _put(replies, again, resent)
        return charges(replies)

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
        for i in _redirected(replies):
            try:
                replies[i] = await self.client.execute_command(*commands[i])
            except ERRORS as exc:
                replies[i] = exc
        return replies
