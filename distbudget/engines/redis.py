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
import inspect
import logging
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
import redis.asyncio.cluster
import redis.exceptions

from distbudget._core import fleet_prices
from distbudget._core.errors import BackendError, InvalidInputError
from distbudget._core.fast import FastCall
from distbudget._core.ops import (
    Announce,
    ChargeResult,
    Commit,
    LedgerRead,
    Operation,
    PricesPush,
    PricesRead,
    Record,
    RecordMany,
    RegistryNames,
)
from distbudget.engines import connect as _connect
from distbudget.engines import functions
from distbudget.engines.codec import (
    ERRORS,
    Codec,
    Replies,
    ScriptCall,
    backend_error,
    charges,
    doing,
    ledger_rows,
    parse_charge,
    plain_charge,
    texts,
    whole_bulk,
)
from distbudget.engines.scripts import OPERATIONS as SCRIPTS
from distbudget.engines.scripts import source as script_source

if sys.version_info >= (3, 11):
    from asyncio import timeout as async_timeout
else:  # pragma: no cover  # redis-py depends on async-timeout there
    from async_timeout import timeout as async_timeout

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


def _noscript(replies: list[Any]) -> list[int]:
    """The commands answered NOSCRIPT (the script was flushed: they did not run)."""
    return [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]


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


# ---- the hand path: charges packed by the codec, sent on kept connections, replies read by hand ------
#
# It relies on redis-py internals, tested with redis-py 8.1 (a test compares the replies read by hand
# with redis-py's own reader): a connection's ``_sock`` (sync) and ``_reader`` / ``_writer`` (asyncio)
# and ``_host_error()``, its parser's ``handle_push_response`` (RESP3 push frames met while reading),
# ``redis._parsers.BaseParser.parse_error`` (the error classes per code). With
# another major version, another connection or pool class (Sentinel's) or a client-side cache,
# the same packed commands go through redis-py's own connection methods (``_Wire.hand`` False): a
# connection taken from the pool per call, each reply read by ``read_response``.

KEEP = 4  # connections kept between calls per pool, whatever the engines on it (never its last one)
_READ = 65536
_SYNC_POOLS = (redis.ConnectionPool, redis.BlockingConnectionPool)
_ASYNC_POOLS = (redis.asyncio.ConnectionPool, redis.asyncio.BlockingConnectionPool)
_HAND_CONNECTIONS = (
    redis.Connection,
    redis.SSLConnection,
    redis.UnixDomainSocketConnection,
    redis.asyncio.Connection,
    redis.asyncio.SSLConnection,
    redis.asyncio.UnixDomainSocketConnection,
)
_TESTED_MAJORS = range(8, 9)


def _hand_ok(pool: Any) -> bool:
    """Whether replies on this pool's connections may be read by hand (see above)."""
    return (
        type(pool) in (*_SYNC_POOLS, *_ASYNC_POOLS)
        and pool.connection_class in _HAND_CONNECTIONS
        and int(redis.__version__.split(".")[0]) in _TESTED_MAJORS
        and hasattr(pool.connection_class, "_host_error")
        and getattr(pool, "cache", None) is None
    )


def _direct_wire(client: Any, wait: tuple[int, int] | None) -> _Wire | None:
    """How a charge is sent by hand (``Codec.packed_charge``), or None to send it through redis-py's
    command path: only a plain standalone (or Sentinel) client without WAIT and without a single
    dedicated connection qualifies."""
    plain = type(client) in (redis.Redis, redis.asyncio.Redis)
    if not plain or wait is not None or getattr(client, "connection", None) is not None:
        return None
    pool = client.connection_pool
    named = inspect.signature(pool.get_connection).parameters.get("command_name")
    if named is not None and named.default is inspect.Parameter.empty:
        return None  # redis-py < 5.3 wants a command name here
    wire = _WIRES.get(pool)
    if wire is None:  # one per pool, shared by the engines on it: KEEP is the pool's
        wire = _WIRES[pool] = _Wire(pool, _hand_ok(pool))
    return wire


_WIRES: weakref.WeakKeyDictionary[Any, _Wire] = weakref.WeakKeyDictionary()


class _Wire:
    """A pool's connections as the hand path uses them: with ``hand``, up to ``KEEP`` of them kept
    between calls (never the pool's last one), each checked before it is used again as redis-py's
    pool checks a connection it hands out (anything readable on it, data or the server's close:
    dropped and connected anew); replies read by hand (``Replies``)."""

    def __init__(self, pool: Any, hand: bool) -> None:
        self.pool = pool
        self.hand = hand
        self.sync = not isinstance(pool, _ASYNC_POOLS)
        self.keep = max(0, min(KEEP, int(getattr(pool, "max_connections", 0)) - 1)) if hand else 0
        self.idle: list[tuple[Any, Any, Any]] = []  # (connection, its socket, a poll of it)
        self.polls: dict[int, tuple[Any, Any]] = {}  # id of a sync connection: (its socket, a poll of it)
        self.pid = os.getpid()

    def take(self) -> tuple[Any, bool]:
        """A kept connection (None: take one from the pool) and whether it is fit to send on."""
        if self.pid != os.getpid():  # forked: the parent's sockets are not this process's
            self.idle, self.pid = [], os.getpid()
        if not self.idle:
            return None, True
        conn, sock, poll = self.idle.pop()
        if self.sync:
            return conn, sock is conn._sock and not poll.poll(0)
        reader = conn._reader
        return conn, reader is not None and not reader.at_eof() and not len(getattr(reader, "_buffer", b""))

    def quick(self) -> Any:
        """A kept connection fit to send on (the sync engine's one-command path), else None."""
        if not self.sync or not self.idle:
            return None
        conn, fit = self.take()
        if not fit:
            conn.disconnect()  # connected anew by the send
        return conn

    def kept(self, conn: Any, replies: list[Any]) -> bool:
        """Keep ``conn`` for a next call: after replies all read and none an error (an error may
        mean a failover: redis-py's pool decides what becomes of that connection)."""
        if len(self.idle) >= self.keep or self.pid != os.getpid() or not conn.is_connected:
            return False
        for r in replies:
            if isinstance(r, BaseException):
                return False
        sock, poll = (conn._sock, self.polls.get(id(conn))) if self.sync else (None, None)
        if sock is not None and (poll is None or poll[0] is not sock):  # a poll per socket, made once
            if len(self.polls) > 4 * KEEP:
                self.polls.clear()
            poll = self.polls[id(conn)] = (sock, select.poll())
            poll[1].register(sock, select.POLLIN)
        self.idle.append((conn, sock, poll and poll[1]))
        return True


@dataclass(slots=True)
class _Step:
    """An I/O step the engines' drivers take for ``_exchange``: ``act`` a method of ``_SyncIO`` or
    ``_AsyncIO`` (``None``: done, ``value`` is the replies)."""

    act: Callable[..., Any] | None
    args: tuple[Any, ...] = ()
    value: Any = None


class _Raised:
    """An exception an I/O step raised, handed back to ``_exchange`` (which raises it there)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _ok(got: Any) -> Any:
    if isinstance(got, _Raised):
        raise got.exc
    return got


def _io_error(exc: BaseException, conn: Any) -> redis.RedisError:
    """A read's failure as redis-py's ``read_response`` reports it."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return redis.exceptions.TimeoutError(f"Timeout reading from {conn._host_error()}")
    return redis.exceptions.ConnectionError(f"Error while reading from {conn._host_error()} : {exc.args}")


def _exchange(wire: _Wire, io: Any, commands: list[bytes]) -> Generator[_Step, Any, None]:
    """Packed commands in one round trip on one connection: their replies, an error reply in place
    (the final step's ``value``). When the connection fails, its error is the reply of every command
    not answered (each may have run: the failure policy treats it as a lost reply, as for a call
    alone). The I/O is the driver's (the sync and asyncio engines): this is the logic, written once."""
    conn, fit = wire.take()
    if conn is None:
        conn = _ok((yield _Step(io.get, (wire.pool,))))
    elif not fit:
        _ok((yield _Step(io.disconnect, (conn,))))  # connected anew by the send
    replies = Replies(len(commands))
    try:
        _ok((yield _Step(io.send if wire.hand else io.send_plain, (conn, b"".join(commands)))))
        if wire.hand:
            while not replies.feed(_ok((yield _Step(io.recv, (conn,))))):
                pass
            if replies.pushes:  # a RESP3 server's notifications: redis-py's parser acts on them
                _ok((yield _Step(io.pushed, (conn, replies.pushes))))
        else:
            while len(replies.got) < replies.want:
                replies.got.append(_ok((yield _Step(io.read, (conn,)))))
    except ERRORS as exc:
        _ok((yield _Step(io.disconnect, (conn,))))
        replies.got += [exc] * (replies.want - len(replies.got))
    except BaseException:
        yield _Step(io.disconnect, (conn,))  # cancelled mid-reply: replies left unread on it
        yield _Step(io.release, (wire.pool, conn))
        raise
    if not wire.kept(conn, replies.got):
        _ok((yield _Step(io.release, (wire.pool, conn))))
    yield _Step(None, value=replies.got)


class _SyncIO:
    """``_exchange``'s I/O on a redis-py connection."""

    @staticmethod
    def get(pool: Any) -> Any:
        return pool.get_connection()

    @staticmethod
    def release(pool: Any, conn: Any) -> None:
        pool.release(conn)

    @staticmethod
    def disconnect(conn: Any) -> None:
        conn.disconnect()

    @staticmethod
    def send_plain(conn: Any, data: bytes) -> None:
        conn.send_packed_command([data], check_health=False)

    send = send_plain

    @staticmethod
    def recv(conn: Any) -> bytes:
        sock = conn._sock
        if sock is None:  # disconnected meanwhile (the client closed by another thread)
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        try:
            data = sock.recv(_READ)
        except OSError as exc:  # a timeout too
            conn.disconnect()
            raise _io_error(exc, conn) from exc
        if not data:
            conn.disconnect()
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return cast("bytes", data)

    @staticmethod
    def pushed(conn: Any, pushes: list[Any]) -> None:
        for push in pushes:
            conn._parser.handle_push_response(list(push))

    @staticmethod
    def read(conn: Any) -> Any:
        try:
            return conn.read_response()
        except redis.exceptions.ResponseError as exc:
            return exc


class _AsyncIO:
    """``_exchange``'s I/O on a ``redis.asyncio`` connection."""

    @staticmethod
    async def get(pool: Any) -> Any:
        return await pool.get_connection()

    @staticmethod
    async def release(pool: Any, conn: Any) -> None:
        await pool.release(conn)

    @staticmethod
    async def disconnect(conn: Any) -> None:
        await conn.disconnect(nowait=True)

    @staticmethod
    async def send_plain(conn: Any, data: bytes) -> None:
        await conn.send_packed_command([data], check_health=False)

    @staticmethod
    async def send(conn: Any, data: bytes) -> None:
        """The bytes written on the stream (its flow control awaited only when it is full)."""
        if not conn.is_connected:
            await conn.connect()
        writer = conn._writer
        writer.write(data)
        if writer.transport.get_write_buffer_size():
            await _AsyncIO._bounded(conn, writer.drain())

    @staticmethod
    async def recv(conn: Any) -> bytes:
        data = await _AsyncIO._bounded(conn, conn._reader.read(_READ))
        if not data:
            await conn.disconnect(nowait=True)
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return cast("bytes", data)

    @staticmethod
    async def _bounded(conn: Any, step: Awaitable[Any]) -> Any:
        try:
            if conn.socket_timeout is None:
                return await step
            async with async_timeout(conn.socket_timeout):
                return await step
        except (OSError, asyncio.TimeoutError) as exc:
            await conn.disconnect(nowait=True)
            raise _io_error(exc, conn) from exc

    @staticmethod
    async def pushed(conn: Any, pushes: list[Any]) -> None:
        for push in pushes:
            await conn._parser.handle_push_response(list(push))

    @staticmethod
    async def read(conn: Any) -> Any:
        try:
            return await conn.read_response()
        except redis.exceptions.ResponseError as exc:
            return exc


def _drive(steps: Generator[_Step, Any, None]) -> Any:
    """Take a generator's steps (``_exchange``, ``_direct_steps``) synchronously: its final value."""
    step = next(steps)
    while step.act is not None:
        try:
            got = step.act(*step.args)
        except BaseException as exc:
            got = _Raised(exc)
        step = steps.send(got)
    return step.value


async def _outcome(step: _Step) -> Any:
    """One step taken on the event loop: its result, or what it raised (for the generator)."""
    try:
        return await step.act(*step.args)  # type: ignore[misc]  # a step to take
    except BaseException as exc:
        return _Raised(exc)


def _one(replies: list[Any]) -> Any:
    """The reply of a command sent alone (its error reply raised)."""
    if isinstance(replies[0], BaseException):
        raise replies[0]
    return replies[0]


def _target(script: Any) -> tuple[bytes, str]:
    """How a script is called on the hand path: ``FCALL`` of the library's function, or
    ``EVALSHA`` of the script (the library's was not found: its fallback)."""
    if isinstance(script, functions.Function) and not script.lost:
        return b"FCALL", script.name
    return b"EVALSHA", script.sha


def _packing(codec: Codec, op: Operation[R]) -> tuple[str, Callable[[bytes, str], bytes], Callable[[Any], R]]:
    """How an operation goes out packed by hand: its script, its bytes given how the script is
    called (``_target``), its reply's parser."""
    if isinstance(op, (Record, Commit)):
        charge = op
        name = "commit" if isinstance(op, Commit) else "record"
        return (
            name,
            lambda verb, target: codec.packed_charge(charge, verb, target),
            cast("Callable[[Any], R]", parse_charge),
        )
    call = codec.encode(op)
    return call.script, lambda verb, target: codec.packed_call(call, verb, target), call.parse


class _Slot:
    __slots__ = ("data", "done", "reply")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reply: Any = None
        self.done = threading.Event()


class Coalescer:
    """Concurrent calls of one process's threads, sent together (``batch_window_us``): the first
    caller of a batch waits the window, then, once the previous batch is answered, sends every call
    queued meanwhile in one pipelined round trip (each still its own script); each caller gets its
    own reply or error reply, and raises it as a call alone would."""

    def __init__(self, send_all: Callable[[list[bytes]], list[Any]], window_us: int) -> None:
        self._send_all = send_all
        self._window = window_us / 1e6
        self._lock = threading.Lock()  # guards the queue
        self._sending = threading.Lock()  # one batch in flight at a time
        self._queue: list[_Slot] = []

    def submit(self, data: bytes) -> Any:
        slot = _Slot(data)
        with self._lock:
            self._queue.append(slot)
            lead = len(self._queue) == 1
        if lead:
            if self._window:
                time.sleep(self._window)
            with self._sending:
                with self._lock:
                    batch, self._queue = self._queue, []
                try:
                    replies = self._send_all([s.data for s in batch])
                except BaseException as exc:  # every caller of the batch gets it
                    replies = [exc] * len(batch)
                for s, reply in zip(batch, replies, strict=True):
                    s.reply = reply
                    s.done.set()
        else:
            slot.done.wait()
        if isinstance(slot.reply, BaseException):
            raise slot.reply
        return slot.reply


class AsyncCoalescer:
    """The same for the tasks of one event loop: the batch is sent by a task of its own, so that a
    caller cancelled meanwhile cancels neither the batch nor the others' calls."""

    def __init__(self, send_all: Callable[[list[bytes]], Awaitable[list[Any]]], window_us: int) -> None:
        self._send_all = send_all
        self._window = window_us / 1e6
        self._sending: asyncio.Lock | None = None
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, data: bytes) -> asyncio.Future[Any]:
        """The reply of ``data``, to await (a future, not a coroutine: one frame less per call)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((data, future))
        if len(self._queue) == 1:
            task = asyncio.ensure_future(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    async def _flush(self) -> None:
        if self._window:
            await asyncio.sleep(self._window)
        if self._sending is None:
            self._sending = asyncio.Lock()
        async with self._sending:
            batch, self._queue = self._queue, []
            try:
                replies = await self._send_all([data for data, _ in batch])
            except BaseException as exc:  # every caller of the batch gets it
                replies = [exc] * len(batch)
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(reply, BaseException):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)


class _Base:
    """What both engines keep: the client, its scripts, the codec, the WAIT setting."""

    COALESCER: Any = None  # the engine's coalescer class

    def __init__(
        self,
        client: Any,
        wait: tuple[int, int] | None = None,
        batch_window_us: int | None = None,
        allow_eviction: bool = False,
    ) -> None:
        if batch_window_us is not None and (
            isinstance(batch_window_us, bool) or not isinstance(batch_window_us, int) or batch_window_us < 0
        ):
            raise InvalidInputError(
                f"batch_window_us must be an int >= 0 (None: no coalescing), got {batch_window_us!r}"
            )
        warn_if_retrying(client)
        self.wait = _check_wait(client, wait)
        self.under_replicated = 0  # charges WAIT returned on before enough replicas acknowledged
        self.codec = Codec()
        self.client: Any = client
        self.scripts: dict[str, Any] = {}
        self._direct = _direct_wire(client, self.wait)
        self._batch: Any = None
        # "functions" (FCALL) or "scripts" (EVALSHA), decided by the checks on connect (functions.py),
        # made at the first call and again after an error (a reconnect, a failover); None until then
        self.path: str | None = None
        self.allow_eviction = allow_eviction
        # Coalescing needs the hand-packed path (a plain standalone client without WAIT): elsewhere
        # every call goes alone.
        if batch_window_us is not None and self._direct is not None:
            self._batch = self.COALESCER(self._send_all, batch_window_us)
        self._setup(client)

    def _setup(self, client: Any) -> None:
        """What an engine sets up of its own once the settings are checked."""
        raise NotImplementedError

    def _send_all(self, commands: list[bytes]) -> Any:
        raise NotImplementedError

    def _register(self, client: Any) -> None:
        self.scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}

    def _use(self, path: str) -> None:
        """Call the library's functions or the scripts."""
        self.scripts = functions.callables(self.client, path)
        self.path = path

    def _encode_many(self, op: RecordMany, indexes: list[int] | None = None) -> list[Any]:
        """A batch's record scripts (or those at ``indexes``), packed by the codec when sent by hand,
        else as raw commands for a redis-py pipeline."""
        records = op.records if indexes is None else [op.records[i] for i in indexes]
        script = self.scripts["record"]
        if self._direct is not None:
            return [self.codec.packed_charge(r, *_target(script)) for r in records]
        return [functions.command(script, c.keys, c.argv) for c in map(self.codec.encode, records)]

    # record()'s fast path (``Accounting.fast_charging``): the I/O-free parts, shared by the engines

    def fast_recorder(self) -> Callable[..., Any] | None:
        """``record_fast`` when this engine packs its charges by hand (a plain standalone client
        without WAIT), else None."""
        return self.record_fast if self._direct is not None else None

    def record_fast(self, fp: FastCall, now_us: int | None, tokens: int, cost: int, entry: str) -> Any:
        raise NotImplementedError

    def _fast_packed(self, fp: FastCall, now_us: int | None, tokens: int, cost: int, entry: str) -> bytes | None:
        """A fast plan's record call packed (its ``RecordWire``, compiled at its first use and again
        when the script it calls changed), or None when the call must go the usual way now (the
        server not checked yet: the first call, or the first after an error)."""
        if self.path is None:
            return None
        verb, target = _target(self.scripts["record"])
        wire = fp.wire
        if wire is None or wire.target != target:
            wire = fp.wire = self.codec.record_wire(fp.plan, verb, target, fp.maxlen)
        return cast("bytes", wire.pack(now_us, tokens, cost, entry))

    def _fast_failed(self, exc: Exception) -> BackendError | None:
        """A fast call's error: None when the script did not run and the usual path is to send it
        (NOSCRIPT: it loads the script; the library's function not found: it calls the script),
        else the error classified, as ``execute`` raises it (never sent again: a script refused
        midway, NOPERM on a command it calls, may have written part of its charge)."""
        script = self.scripts["record"]
        library = isinstance(script, functions.Function)
        if isinstance(exc, redis.exceptions.NoScriptError) or (
            library and isinstance(exc, redis.exceptions.ResponseError) and script._lost(exc)
        ):
            return None
        if library and script.lost and isinstance(exc, redis.exceptions.NoPermissionError):
            exc = script._refused(exc)  # the library lost and no script allowed: as _direct_steps says
        self.path = None  # check again at the next call (a reconnect, a failover)
        return backend_error("record", exc)

    @staticmethod
    def _fast_answer(fp: FastCall, raw: Any) -> tuple[int, str] | ChargeResult:
        """A fast call's answer: a plain charge's (now µs, ledger id), else its ``ChargeResult``
        (``parse_charge``; it raises for a charge refused at 2**53 - 1, as ``execute`` does)."""
        plain = plain_charge(raw, fp.checks) if type(raw) is bytes else None
        return plain if plain is not None else parse_charge(raw)

    def _direct_steps(self, op: Operation[R], send: Callable[[bytes], Any], load: Callable[[str], Any]) -> Any:
        """The steps of an operation sent by hand (``_drive``): packed by the codec, sent alone
        (``send``) or through the coalescer. When the script did not run — ``NOSCRIPT`` (loaded with
        ``load``, then sent again) or the library's function not found (its script called instead,
        as :class:`functions.Function` does) — it is sent once more, alone."""
        name, pack, parse = _packing(self.codec, op)
        script = self.scripts[name]
        sender = send if self._batch is None else self._batch.submit
        for attempt in range(3):
            try:
                reply = _ok((yield _Step(sender, (pack(*_target(script)),))))
            except redis.exceptions.NoPermissionError as exc:
                if isinstance(script, functions.Function) and script.lost:
                    raise script._refused(exc) from exc
                raise
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                try:
                    script.sha = _ok((yield _Step(load, (script.script,))))
                except redis.exceptions.NoPermissionError as exc:
                    if isinstance(script, functions.Function):
                        raise script._refused(exc) from exc
                    raise
            except redis.exceptions.ResponseError as exc:
                if attempt == 2 or not (isinstance(script, functions.Function) and script._lost(exc)):
                    raise
            else:
                yield _Step(None, value=parse(reply))
                return
            sender = send


class RedisEngine(_Base):
    """Applies operations on one redis-py client (``Redis``, ``RedisCluster``)."""

    COALESCER = Coalescer

    def _setup(self, client: Any) -> None:
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
            if self.path is None:
                self._use(functions.check_server(self.client, self.allow_eviction).path)
            if isinstance(op, RecordMany):
                return cast("R", self._record_many(op))
            if isinstance(op, (LedgerRead, RegistryNames, Announce, PricesRead, PricesPush)):
                return cast("R", self._command(op))
            if self._direct is not None:
                return self._direct_call(op)
            call = self.codec.encode(op)
            return call.parse(self._run(call))
        except ERRORS as exc:
            self.path = None  # check again at the next call (a reconnect, a failover)
            raise backend_error(doing(op), exc) from exc

    def _direct_call(self, op: Operation[R]) -> R:
        """The operation's script call packed by the codec and sent on a connection of the pool (one
        round trip, as redis-py would, without its per-call packing; see ``_direct_steps``)."""
        return cast("R", _drive(self._direct_steps(op, self._send_packed, self.client.script_load)))

    def record_fast(self, fp: FastCall, now_us: int | None, tokens: int, cost: int, entry: str) -> Any:
        """record()'s fast path: a plain charge of ``fp``'s plan (see ``Accounting.fast_charging``),
        sent alone or through the coalescer. Its answer (``_fast_answer``), its error classified
        (a ``BackendError``, returned), or None: not sent, or not run (``_fast_failed``)."""
        data = self._fast_packed(fp, now_us, tokens, cost, entry)
        if data is None:
            return None
        try:
            raw = self._send_packed(data) if self._batch is None else self._batch.submit(data)
        except ERRORS as exc:
            return self._fast_failed(exc)
        return self._fast_answer(fp, raw)

    def _send_packed(self, data: bytes) -> Any:
        """One command: on a kept connection fit to send on, sent and read here (``_exchange``'s
        work without its steps: a command alone raises its error), else by ``_exchange``."""
        wire = cast("_Wire", self._direct)
        conn = wire.quick()
        if conn is None:
            return _one(self._send_all([data]))
        try:
            conn.send_packed_command([data], check_health=False)
            got = _SyncIO.recv(conn)
            reply = whole_bulk(got)  # the usual answer, all in one read
            if reply is None:
                replies = Replies(1)
                while not replies.feed(got):
                    got = _SyncIO.recv(conn)
                reply = replies.got[0]
        except BaseException:
            conn.disconnect()  # replies may be left unread on it
            wire.pool.release(conn)
            raise
        if not wire.kept(conn, [reply]):
            wire.pool.release(conn)
        return _one([reply])

    def _send_all(self, commands: list[bytes]) -> list[Any]:
        """See ``_exchange``."""
        return cast("list[Any]", _drive(_exchange(cast("_Wire", self._direct), _SyncIO, commands)))

    def _command(self, op: LedgerRead | RegistryNames | Announce | PricesRead | PricesPush) -> object:
        if isinstance(op, LedgerRead):
            return ledger_rows(self.client.xrange(op.key, op.start, "+", op.count))
        if isinstance(op, RegistryNames):
            return texts(self.client.hkeys(op.key))
        if isinstance(op, PricesRead):  # the revision; the book only when it is not the one known
            rev = fleet_prices.parse_rev(self.client.hget(op.key, fleet_prices.REV_FIELD))
            if rev == op.known:
                return rev, None
            return fleet_prices.read_reply(self.client.hmget(op.key, *fleet_prices.FIELDS))
        if isinstance(op, PricesPush):
            pipe = self.client.pipeline(transaction=False)  # one round trip, in this order:
            pipe.hset(op.key, fleet_prices.BOOK_FIELD, op.book)  # a new revision names a stored book
            pipe.hincrby(op.key, fleet_prices.REV_FIELD, 1)
            return int((pipe.execute())[1])
        self.client.hset(op.index_key, mapping=op.streams)
        return None

    def _run(self, call: ScriptCall[Any]) -> Any:
        """One script call; with ``wait``, a charge and ``WAIT`` in one pipeline (one round trip)."""
        script = self.scripts[call.script]
        if self.wait is None or not call.writes:
            return script(keys=call.keys, args=call.argv)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command(*functions.command(script, call.keys, call.argv))
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
        script = self.scripts["record"]
        send = self._send_all if self._direct is not None else self._send_many
        replies = send(self._encode_many(op))
        again = _noscript(replies)
        if again:
            try:
                script.sha = self.client.script_load(script.script)
                resent = send(self._encode_many(op, again))
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

    COALESCER = AsyncCoalescer

    def _setup(self, client: Any) -> None:
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
            if self.path is None:
                self._use((await functions.check_server_async(self.client, self.allow_eviction)).path)
            if isinstance(op, RecordMany):
                return cast("R", await self._record_many(op))
            if isinstance(op, (LedgerRead, RegistryNames, Announce, PricesRead, PricesPush)):
                return cast("R", await self._command(op))
            if self._direct is not None:
                return await self._direct_call(op)
            call = self.codec.encode(op)
            return call.parse(await self._run(call))
        except ERRORS as exc:
            self.path = None  # check again at the next call (a reconnect, a failover)
            raise backend_error(doing(op), exc) from exc

    async def _direct_call(self, op: Operation[R]) -> R:
        """See :meth:`RedisEngine._direct_call`."""
        steps = self._direct_steps(op, self._send_packed, self.client.script_load)
        step = next(steps)
        while step.act is not None:
            step = steps.send(await _outcome(step))
        return cast("R", step.value)

    async def _send_packed(self, data: bytes) -> Any:
        return _one(await self._send_all([data]))

    async def record_fast(self, fp: FastCall, now_us: int | None, tokens: int, cost: int, entry: str) -> Any:
        """See :meth:`RedisEngine.record_fast`."""
        data = self._fast_packed(fp, now_us, tokens, cost, entry)
        if data is None:
            return None
        try:
            raw = await (self._send_packed(data) if self._batch is None else self._batch.submit(data))
        except ERRORS as exc:
            return self._fast_failed(exc)
        return self._fast_answer(fp, raw)

    async def _send_all(self, commands: list[bytes]) -> list[Any]:
        """See ``_exchange``."""
        steps = _exchange(cast("_Wire", self._direct), _AsyncIO, commands)
        step = next(steps)
        while step.act is not None:
            step = steps.send(await _outcome(step))
        return cast("list[Any]", step.value)

    async def _command(self, op: LedgerRead | RegistryNames | Announce | PricesRead | PricesPush) -> object:
        if isinstance(op, LedgerRead):
            return ledger_rows(await self.client.xrange(op.key, op.start, "+", op.count))
        if isinstance(op, RegistryNames):
            return texts(await self.client.hkeys(op.key))
        if isinstance(op, PricesRead):  # the revision; the book only when it is not the one known
            rev = fleet_prices.parse_rev(await self.client.hget(op.key, fleet_prices.REV_FIELD))
            if rev == op.known:
                return rev, None
            return fleet_prices.read_reply(await self.client.hmget(op.key, *fleet_prices.FIELDS))
        if isinstance(op, PricesPush):
            pipe = self.client.pipeline(transaction=False)  # one round trip, in this order:
            pipe.hset(op.key, fleet_prices.BOOK_FIELD, op.book)  # a new revision names a stored book
            pipe.hincrby(op.key, fleet_prices.REV_FIELD, 1)
            return int((await pipe.execute())[1])
        await self.client.hset(op.index_key, mapping=op.streams)
        return None

    async def _run(self, call: ScriptCall[Any]) -> Any:
        script = self.scripts[call.script]
        if self.wait is None or not call.writes:
            return await script(keys=call.keys, args=call.argv)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command(*functions.command(script, call.keys, call.argv))
            pipe.execute_command("WAIT", *self.wait)
            result, acked = await pipe.execute(raise_on_error=False)
            if not isinstance(result, redis.exceptions.NoScriptError):
                break
            script.sha = await self.client.script_load(script.script)
        self.under_replicated += _replicated(result, acked, self.wait)
        return result

    async def _record_many(self, op: RecordMany) -> list[Any]:
        """See :meth:`RedisEngine._record_many`."""
        script = self.scripts["record"]
        send = self._send_all if self._direct is not None else self._send_many
        replies = await send(self._encode_many(op))
        again = _noscript(replies)
        if again:
            try:
                script.sha = await self.client.script_load(script.script)
                resent = await send(self._encode_many(op, again))
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
