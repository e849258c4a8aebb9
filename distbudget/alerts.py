"""Fleet-wide alerts: listeners that hear every threshold crossing exactly once, and a webhook sink.

The atomic step that decides a crossing also appends it to the scope tree's capped alert stream
(``<prefix>:{<root>}:alerts``) and ``PUBLISH``es it on ``<prefix>:alerts`` (every scope) and
``<prefix>:alerts:<scope>`` (one scope). Listeners read the streams (``XREAD BLOCK``), so one that
was down, or lost its connection, resumes from the last id it saw: each alert is delivered once.
On Redis Cluster the trees' streams live on different shards, and one XREAD may name keys of one
hash slot only, so a listener reads them slot by slot (``_ListenerBase._poll_slots``).
Budgets register their tree's stream in the ``<prefix>:alert-streams`` hash, which is how a listener
finds every stream without scanning the keyspace.

Payload (JSON; the stream entry's field ``alert`` and each pub/sub message)::

    {"id": "1764345600000-0", "stream": "<key>", "scope": "team-a", "level": "warning",
     "limit_type": "day_cost_usd", "metric": "cost", "used": "4000000000", "limit": "5000000000", "pct": 0.8,
     "session_id": "user-1", "model": "gpt-4o", "ts_us": "1764345600000000"}

``used``/``limit`` are integer strings in engine units (nano-USD for ``metric == "cost"``);
:func:`alert_from_payload` turns a payload into a :class:`BudgetAlert` in USD / tokens / requests.
The pub/sub messages carry ``id``; the stream entries get it from the entry id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import redis
import redis.asyncio
import redis.exceptions
from redis.crc import key_slot
from redis.exceptions import ClusterError, RedisClusterException, SlotNotCoveredError

from distbudget._core.keys import alert_index_key
from distbudget._core.money import nano_to_usd
from distbudget._core.types import AlertLevel, BudgetAlert, alert_message
from distbudget.engines.connect import is_cluster_client

log = logging.getLogger("distbudget.alerts")


def alert_from_payload(data: dict[str, Any], alert_id: str | None = None) -> BudgetAlert:
    used, limit = int(data["used"]), int(data["limit"])
    level = AlertLevel(data["level"])
    display_used: float = nano_to_usd(used) if data["metric"] == "cost" else used
    display_limit: float = nano_to_usd(limit) if data["metric"] == "cost" else limit
    msg = alert_message(level, data["scope"], data["limit_type"], display_used, display_limit)
    return BudgetAlert(
        scope=data["scope"],
        level=level,
        message=msg,
        used=display_used,
        limit=display_limit,
        timestamp=int(data["ts_us"]) / 1e6,
        limit_type=data["limit_type"],
        session_id=data.get("session_id"),
        model=data.get("model"),
        alert_id=alert_id or data.get("id"),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


Entry = tuple[str, str, dict[Any, Any]]  # stream, entry id, fields
# A client method (or "sleep", or "xread_slots": Cluster, one XREAD per slot group, routed by the shell)
Step = tuple[str, tuple[Any, ...], dict[str, Any]]


# What a listener retries with backoff, as a lost connection: on a Cluster, redis-py's own errors when
# no node answers (it raises RedisClusterException, not a RedisError, when it cannot read the slot map)
# or while the cluster is not serving (CLUSTERDOWN, slots not covered yet, redirections exhausted).
_LOST = (redis.ConnectionError, redis.TimeoutError, RedisClusterException, SlotNotCoveredError, ClusterError)


def _entries(reply: Any) -> list[Entry]:
    """An XREAD reply as (stream, entry id, fields) triples."""
    return [(_text(st), _text(eid), fields) for st, entries in reply or [] for eid, fields in entries]


class _ListenerBase:
    """Everything a listener does except I/O: which streams to read, from which ids, and what an
    entry means. ``_poll`` is one look at the streams as a sans-I/O flow (like the budgets' flows):
    the sync listener runs its steps with plain calls, the async one awaits them."""

    def __init__(
        self, prefix: str, scopes: list[str] | None, last_ids: dict[str, str] | None, block_ms: int, from_start: bool
    ) -> None:
        self.index_key = alert_index_key(prefix)
        self.scopes = None if scopes is None else set(scopes)
        self.last_ids: dict[str, str] = dict(last_ids or {})
        self.block_ms = block_ms
        self.stopped = False
        self.skip_existing = not from_start and not last_ids
        self.backoff = 0.0
        self.cluster = False  # set by the shells: on Redis Cluster, streams are read slot by slot
        self.hot_slot = -1  # the slot of the latest alert: where a cluster listener blocks

    def _streams(self, index: dict[Any, Any]) -> dict[str, str]:
        """{stream key: last id} for every stream of interest (new streams read from the start)."""
        out = {}
        for raw_scope, raw_stream in index.items():
            scope, stream = _text(raw_scope), _text(raw_stream)
            if self.scopes is None or scope in self.scopes:
                out[stream] = self.last_ids.get(stream, "0-0")
        return out

    def _poll(self) -> Generator[Step, Any, list[Entry]]:
        """Read the index (new scope trees appear in it), then block on every stream of interest
        (on Redis Cluster, slot by slot: see ``_poll_slots``)."""
        streams = self._streams((yield "hgetall", (self.index_key,), {}))
        if self.skip_existing:  # from_start=False: begin after each stream's current last entry
            for stream in streams:
                latest = yield "xrevrange", (stream,), {"count": 1}
                if latest:
                    self.last_ids[stream] = _text(latest[0][0])
            self.skip_existing = False
            return []
        if not streams:
            yield "sleep", (self.block_ms / 1000,), {}
            return []
        if self.cluster:
            return (yield from self._poll_slots(self._slots(streams)))
        reply = yield "xread", (streams,), {"count": 500, "block": self.block_ms}
        return _entries(reply)

    @staticmethod
    def _slots(streams: dict[str, str]) -> dict[int, dict[str, str]]:
        """Streams grouped by Cluster hash slot: one XREAD may only name keys of one slot."""
        groups: dict[int, dict[str, str]] = {}
        for stream, last in streams.items():
            groups.setdefault(key_slot(stream.encode()), {})[stream] = last
        return groups

    def _poll_slots(self, groups: dict[int, dict[str, str]]) -> Generator[Step, Any, list[Entry]]:
        """Cluster: one XREAD per slot. With several slots, look at every one without blocking (one
        pipelined round trip per node); if all are quiet, block on the slot of the latest alert for
        ``block_ms``. An alert in that slot arrives at once, one elsewhere at the next look, within
        ``block_ms``."""
        found: list[Entry] = []
        if len(groups) > 1:
            replies = yield "xread_slots", (list(groups.values()),), {"count": 500}
            found = [entry for reply in replies for entry in _entries(reply)]
        if not found:
            hot = self.hot_slot if self.hot_slot in groups else next(iter(groups))
            replies = yield "xread_slots", ([groups[hot]],), {"count": 500, "block": self.block_ms}
            found = _entries(replies[0])
        if found:
            self.hot_slot = key_slot(found[-1][0].encode())
        return found

    def _lost(self, exc: Exception) -> float:
        """Seconds to wait before retrying after a lost connection (exponential, capped at 5 s)."""
        self.backoff = min(max(self.backoff * 2, 0.1), 5.0)
        log.warning("alert listener lost Redis (%s); retrying in %.1fs", exc, self.backoff)
        return self.backoff

    def _accept(self, entry: Entry) -> BudgetAlert | None:
        """The alert of a stream entry (advancing ``last_ids`` as it is delivered)."""
        stream, entry_id, fields = entry
        self.last_ids[stream] = entry_id
        data = json.loads(_text(fields.get(b"alert", fields.get("alert", "{}"))))
        if self.scopes is not None and data.get("scope") not in self.scopes:
            return None
        return alert_from_payload(data, entry_id)


class AlertListener(_ListenerBase):
    """Hears every alert of the fleet (or of ``scopes``) once, from the durable streams.

    ``for alert in listener`` blocks and yields alerts; ``start(callback)`` runs that loop in a
    background thread (callback errors are logged, never stop it); ``stop()`` ends it. Pass
    ``last_ids`` (``listener.last_ids`` from a previous run) to resume exactly where it stopped.
    ``from_start=False`` skips what the streams already hold. Connection loss (on a Cluster, also
    every node unreachable, or the cluster down) is retried with backoff; nothing is skipped, nothing
    delivered twice. A scope tree that appears while the listener runs is picked up within ``block_ms``.
    """

    def __init__(
        self,
        redis: Any = "redis://127.0.0.1:6379/0",
        prefix: str = "distbudget",
        scopes: list[str] | None = None,
        last_ids: dict[str, str] | None = None,
        block_ms: int = 250,
        from_start: bool = True,
    ) -> None:
        super().__init__(prefix, scopes, last_ids, block_ms, from_start)
        self.client = _sync_client(redis)
        self.cluster = is_cluster_client(self.client)
        self._thread: threading.Thread | None = None

    def _run(self, flow: Generator[Step, Any, list[Entry]]) -> list[Entry]:
        try:
            name, args, kwargs = next(flow)
            while True:
                if name == "sleep":
                    time.sleep(*args)
                    answer = None
                elif name == "xread_slots":
                    answer = _xread_slots(self.client, *args, **kwargs)
                else:
                    answer = getattr(self.client, name)(*args, **kwargs)
                name, args, kwargs = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[BudgetAlert]:
        while not self.stopped:
            try:
                entries = self._run(self._poll())
                self.backoff = 0.0
            except _LOST as exc:
                time.sleep(self._lost(exc))
                continue
            for entry in entries:
                alert = self._accept(entry)
                if alert is not None:
                    yield alert

    def start(self, callback: Callable[[BudgetAlert], Any]) -> AlertListener:
        def run() -> None:
            for alert in self:
                try:
                    callback(alert)
                except Exception:
                    log.exception("alert callback %r failed", callback)

        self._thread = threading.Thread(target=run, name="distbudget-alerts", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True
        if self._thread is not None:
            self._thread.join(timeout)


class AsyncAlertListener(_ListenerBase):
    """``async for alert in AsyncAlertListener(redis=...)``; cancel the task (or ``stop()``) to end."""

    def __init__(
        self,
        redis: Any = "redis://127.0.0.1:6379/0",
        prefix: str = "distbudget",
        scopes: list[str] | None = None,
        last_ids: dict[str, str] | None = None,
        block_ms: int = 250,
        from_start: bool = True,
    ) -> None:
        super().__init__(prefix, scopes, last_ids, block_ms, from_start)
        self.client = redis if not isinstance(redis, str) else _async_client(redis)
        self.cluster = is_cluster_client(self.client)

    def stop(self) -> None:
        self.stopped = True

    async def _run(self, flow: Generator[Step, Any, list[Entry]]) -> list[Entry]:
        try:
            name, args, kwargs = next(flow)
            while True:
                if name == "sleep":
                    await asyncio.sleep(*args)
                    answer = None
                elif name == "xread_slots":
                    answer = await _async_xread_slots(self.client, *args, **kwargs)
                else:
                    answer = await getattr(self.client, name)(*args, **kwargs)
                name, args, kwargs = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def __aiter__(self) -> AsyncIterator[BudgetAlert]:
        while not self.stopped:
            try:
                entries = await self._run(self._poll())
                self.backoff = 0.0
            except _LOST as exc:
                await asyncio.sleep(self._lost(exc))
                continue
            for entry in entries:
                alert = self._accept(entry)
                if alert is not None:
                    yield alert


def _xread_args(group: dict[str, str], count: int, block: int | None) -> list[Any]:
    head: list[Any] = ["XREAD", "COUNT", count] + (["BLOCK", block] if block is not None else [])
    return [*head, "STREAMS", *group, *group.values()]


def _xread_slots(client: Any, groups: list[dict[str, str]], count: int, block: int | None = None) -> list[Any]:
    """Cluster: XREAD each group (streams of one slot) on the node that holds it, one pipeline per
    node. Routing here, by the slot map, spares redis-py a ``COMMAND GETKEYS`` round trip per XREAD
    (its cluster client asks a node where a command's keys are when they are not at fixed positions).
    A group whose slot moved meanwhile reads nothing this time; the slot map is refreshed (also when
    a node cannot be reached)."""
    by_node: dict[str, tuple[Any, list[int]]] = {}
    for i, group in enumerate(groups):
        node = client.get_node_from_key(next(iter(group)))
        by_node.setdefault(node.name, (node, []))[1].append(i)
    replies: list[Any] = [None] * len(groups)
    for node, indexes in by_node.values():
        pipe = client.get_redis_connection(node).pipeline(transaction=False)
        for i in indexes:
            pipe.execute_command(*_xread_args(groups[i], count, block))
        try:
            answers = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError):  # the node is gone (a failover?): re-read the
            with contextlib.suppress(redis.RedisError, RedisClusterException):  # slot map before retrying
                client.nodes_manager.initialize()
            raise
        for i, reply in zip(indexes, answers, strict=True):
            replies[i] = _moved(client, reply)
    return replies


async def _async_xread_slots(
    client: Any, groups: list[dict[str, str]], count: int, block: int | None = None
) -> list[Any]:
    """The same on ``redis.asyncio``'s cluster client: the XREADs of all slots at once, each sent to
    its node (``target_nodes``: no ``COMMAND GETKEYS``; redirections are followed)."""

    async def one(group: dict[str, str]) -> Any:
        node = client.get_node_from_key(next(iter(group)))
        return await client.execute_command(*_xread_args(group, count, block), target_nodes=node)

    return list(await asyncio.gather(*(one(group) for group in groups)))


def _moved(client: Any, reply: Any) -> Any:
    if isinstance(reply, (redis.exceptions.MovedError, redis.exceptions.AskError)):
        client.nodes_manager.initialize()
        return None
    if isinstance(reply, Exception):
        raise reply
    return reply


def _sync_client(value: Any) -> Any:
    if isinstance(value, str):
        from distbudget.engines.connect import connect

        return connect(value, socket_timeout=None, health_check_interval=30)
    return value


def _async_client(url: str) -> Any:
    from distbudget.engines.connect import connect_async

    return connect_async(url, socket_timeout=None)


class WebhookSink:
    """POST each alert as JSON to ``url`` (``slack=True``: a Slack-compatible ``{"text": ...}``),
    with a timeout and retries with backoff. Use as a callback: ``listener.start(WebhookSink(url))``."""

    def __init__(
        self, url: str, *, slack: bool = False, timeout: float = 5.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("webhook url must be http:// or https://")
        self.url, self.slack, self.timeout, self.retries, self.backoff = url, slack, timeout, retries, backoff

    def body(self, alert: BudgetAlert) -> dict[str, Any]:
        if self.slack:
            return {"text": f"[{alert.level.value.upper()}] {alert.message}"}
        return {
            "id": alert.alert_id,
            "scope": alert.scope,
            "level": alert.level.value,
            "limit_type": alert.limit_type,
            "used": alert.used,
            "limit": alert.limit,
            "pct": alert.pct,
            "session_id": alert.session_id,
            "model": alert.model,
            "timestamp": alert.timestamp,
            "message": alert.message,
        }

    def __call__(self, alert: BudgetAlert) -> bool:
        data = json.dumps(self.body(alert)).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                self.url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if 200 <= response.status < 300:
                        return True
            except OSError as exc:
                log.warning("webhook %s failed (attempt %d): %s", self.url, attempt + 1, exc)
            time.sleep(self.backoff * 2**attempt)
        log.error("webhook %s gave up on alert %s", self.url, alert.alert_id)
        return False


__all__ = ["AlertListener", "AsyncAlertListener", "WebhookSink", "alert_from_payload"]
