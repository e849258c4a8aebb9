"""Fleet-wide alerts: listeners that hear every threshold crossing, and a webhook sink.

The atomic step that decides a crossing also appends it to the scope tree's alert stream
(``<prefix>:{<root>}:alerts``, capped at about ``Budget(alert_stream_maxlen=)``, 10,000 by default)
and ``PUBLISH``es it on ``<prefix>:alerts`` (every scope) and ``<prefix>:alerts:<scope>`` (one scope).
Budgets register their tree's stream in the ``<prefix>:alert-streams`` hash, which is how a listener
finds every stream without scanning the keyspace. On Redis Cluster the trees' streams live on
different shards, and one read may name keys of one hash slot only, so a listener reads them slot by
slot (``_ListenerBase._read_slots``).

Two ways to listen, one poll flow (``_ListenerBase._cycle``, sans-I/O: the sync and the async
listener only run its steps):

- a **tail** (``last_ids``): ``XREAD`` from the ids this process holds; ``listener.last_ids`` saved
  after ``stop()`` resumes exactly there. Good for a terminal or a test.
- a **group** (``group="slack-forwarder"``): a Redis consumer group per stream. Redis keeps the
  group's position and its pending (delivered, not yet acknowledged) alerts, so a restarted or crashed
  process resumes where its group left off; several processes in one group share the work. An alert
  is acknowledged (and its id marked handled, so a redelivery is not passed on) only after the
  callback returned; one whose callback failed stays pending, is delivered again with backoff, and
  after ``max_deliveries`` attempts moves to the dead-letter stream ``<stream>:dead:<group>``.

Either way a position moves only after the callback for that alert returned, and no callback starts
after ``stop()`` returned. A listener whose position fell behind what the stream keeps (down longer
than the stream's cap) logs a WARNING with the number of alerts it skipped and calls ``on_gap(skipped)``.

Payload (JSON; the stream entry's field ``alert`` and each pub/sub message)::

    {"id": "1764345600000-0", "stream": "<key>", "scope": "team-a", "level": "warning",
     "limit_type": "day_cost_usd", "metric": "cost", "used": "4000000000", "limit": "5000000000", "pct": 0.8,
     "session_id": "user-1", "model": "gpt-4o", "ts_us": "1764345600000000",
     "requested_by": {"scope": "user-1", "session_id": "user-1", "model": "gpt-4o"}}

``scope`` is the scope whose limit crossed; ``requested_by`` the call that drove it (the requesting
scope, which may be a descendant, its session and model). ``level`` ``"refused"``: the limit's first
refusal in its window (``used`` is then what the refused call would have brought it to).
``used``/``limit`` are integer strings in engine units (nano-USD for ``metric == "cost"``);
:func:`alert_from_payload` turns a payload into a :class:`BudgetAlert` in USD / tokens / requests.
The pub/sub messages carry ``id``; the stream entries get it from the entry id.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, NamedTuple

import redis
import redis.asyncio
import redis.exceptions
from redis.crc import key_slot
from redis.exceptions import ClusterError, RedisClusterException, SlotNotCoveredError

from distbudget._core.keys import alert_group_key, alert_index_key
from distbudget._core.money import nano_to_usd
from distbudget._core.types import AlertLevel, BudgetAlert, RequestedBy, alert_message
from distbudget._exceptions import InvalidInputError
from distbudget.engines.connect import is_cluster_client

log = logging.getLogger("distbudget.alerts")

FROM_START = True
"""Where a new listener starts, for the Python API and ``distbudget watch`` alike: ``True`` replays
what the streams still hold, then follows; ``False`` hears only alerts raised after it started. A
tail resumed with ``last_ids`` and a group that already exists continue from their own position."""

TAIL_BATCH = 100  # entries per stream per read; a tail holds nothing, so it may read ahead
GROUP_BATCH = 10  # a group member takes few at a time: the rest stay for the group's other members
DONE_KEPT = 20_000  # handled ids a group remembers per stream (a redelivery comes soon after, if at all)
DONE_TTL_MS = 7 * 24 * 3600 * 1000
DEAD_CAP = 10_000
MAX_BACKOFF_MS = 60_000


def alert_from_payload(data: dict[str, Any], alert_id: str | None = None) -> BudgetAlert:
    used, limit = int(data["used"]), int(data["limit"])
    level = AlertLevel(data["level"])
    display_used: float = nano_to_usd(used) if data["metric"] == "cost" else used
    display_limit: float = nano_to_usd(limit) if data["metric"] == "cost" else limit
    msg = alert_message(level, data["scope"], data["limit_type"], display_used, display_limit)
    by = data.get("requested_by")
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
        requested_by=RequestedBy(by["scope"], by.get("session_id"), by.get("model") or None) if by else None,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Entry(NamedTuple):
    stream: str
    id: str
    fields: dict[Any, Any]

    def payload(self) -> str:
        return _text(self.fields.get(b"alert", self.fields.get("alert", "{}")))


def _alert(entry: Entry) -> BudgetAlert | None:
    """An entry's alert, or None (logged) for one that is not an alert: it is passed over."""
    try:
        return alert_from_payload(json.loads(entry.payload()), entry.id)
    except (ValueError, KeyError, TypeError):
        log.warning("entry %s of %s is not an alert: passed over", entry.id, entry.stream)
        return None


class Command(NamedTuple):
    """One Redis command of a step: ``key`` routes it (the stream it touches), ``options`` go to
    redis-py's reply parser."""

    key: str
    args: tuple[Any, ...]
    options: dict[str, Any] = {}  # noqa: RUF012  (never mutated)


# The steps of the poll flow, answered by the shells:
#   ("run", [Command])  -> their replies in order (error replies as exception objects), pipelined per node
#   ("sleep", seconds)  -> None
#   ("deliver", alert)  -> whether the callback handled it (False: it raised or returned False)
Step = tuple[str, Any]
Flow = Generator[Step, Any, Any]


# What a listener retries with backoff, as a lost connection: on a Cluster, redis-py's own errors when
# no node answers (it raises RedisClusterException, not a RedisError, when it cannot read the slot map)
# or while the cluster is not serving (CLUSTERDOWN, slots not covered yet, redirections exhausted).
_LOST = (redis.ConnectionError, redis.TimeoutError, RedisClusterException, SlotNotCoveredError, ClusterError)


NOT_CALLED = object()  # a shell's answer to "deliver" once stopped: the callback was not called


class _Lost(NamedTuple):
    """A shell's answer to a step whose connection was lost."""

    error: Exception


def _next(flow: Flow, answer: Any) -> Step | None:
    """The flow's next step (None: it ended)."""
    try:
        return flow.send(answer)
    except StopIteration:
        return None


def _entries(reply: Any) -> list[Entry]:
    """An XREAD / XREADGROUP reply (RESP2 list or RESP3 map) as entries."""
    pairs = reply.items() if isinstance(reply, dict) else reply or []
    out = []
    for stream, entries in pairs:
        for item in entries[0] if isinstance(reply, dict) and entries and isinstance(entries[0], list) else entries:
            entry_id, fields = item
            out.append(Entry(_text(stream), _text(entry_id), fields or {}))
    return out


def _mapping(reply: Any) -> dict[str, Any]:
    """An XINFO reply (already a dict, or a flat list of names and values) with text keys."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    items = list(reply or [])
    return {_text(k): v for k, v in zip(items[::2], items[1::2], strict=True)}


def _error(reply: Any, code: str) -> bool:
    return isinstance(reply, redis.exceptions.ResponseError) and code in str(reply)


class StreamInfo(NamedTuple):
    """What ``XINFO STREAM`` says of a stream (all zero for one that does not exist yet)."""

    added: int  # entries ever added
    length: int  # entries kept
    first: tuple[int, int] | None  # the oldest entry kept
    last: str  # the newest id ever given

    @classmethod
    def of(cls, reply: Any) -> StreamInfo:
        if _error(reply, "no such key"):
            return cls(0, 0, None, "0-0")
        info = _mapping(_raise(reply))
        first = info.get("first-entry")
        first_id = _id(_text(first[0])) if first and first[0] is not None else None
        return cls(int(info["entries-added"]), int(info["length"]), first_id, _text(info["last-generated-id"]))


def _group_missing(group: dict[str, Any], info: StreamInfo) -> int | None:
    """How many entries the stream ever had that a group has not read (Redis counts its reads;
    ``None``: the group's counter is unknown, or it is behind within what the stream keeps)."""
    read, delivered = group.get("entries-read"), _text(group.get("last-delivered-id", "0-0"))
    if read is None:
        return None
    if info.first is not None and _id(delivered) < info.first:
        return info.added - info.length - int(read)
    return info.added - int(read) if delivered == info.last else None


def _raise(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


class _ListenerBase:
    """Everything a listener does except I/O: which streams to read, from where, what an entry
    means, when a position moves. ``_cycle`` is one look at the streams; the shells run its steps."""

    def __init__(
        self,
        redis: Any = "redis://127.0.0.1:6379/0",
        prefix: str = "distbudget",
        scopes: list[str] | None = None,
        last_ids: dict[str, str] | None = None,
        block_ms: int = 250,
        from_start: bool = FROM_START,
        *,
        group: str | None = None,
        consumer: str | None = None,
        on_gap: Callable[[int | None], Any] | None = None,
        max_deliveries: int = 5,
        retry_ms: int = 1000,
        claim_idle_ms: int = 60_000,
    ) -> None:
        if group is not None and (not isinstance(group, str) or not group or len(group) > 200):
            raise InvalidInputError("group must be a non-empty str of at most 200 characters")
        if group is not None and last_ids:
            raise InvalidInputError("a group keeps its own position in Redis: pass group or last_ids, not both")
        if min(max_deliveries, retry_ms, claim_idle_ms, block_ms) < 1:
            raise InvalidInputError("max_deliveries, retry_ms, claim_idle_ms and block_ms must be positive")
        self.index_key = alert_index_key(prefix)
        self.scopes = None if scopes is None else set(scopes)
        self.last_ids: dict[str, str] = dict(last_ids or {})
        self.block_ms = block_ms
        self.from_start = from_start
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_gap = on_gap
        self.max_deliveries = max_deliveries
        self.retry_ms = retry_ms
        self.claim_idle_ms = claim_idle_ms
        self.stopped = False
        self.backoff = 0.0
        self.client = self._connect(redis)
        self.cluster = is_cluster_client(self.client)  # on Redis Cluster, streams are read slot by slot
        self.hot_slot = -1  # the slot of the latest alert: where a cluster listener blocks
        self.known: set[str] = set()  # streams this listener has set up (group created, position known)
        self.due: set[str] = set()  # streams to look at for a gap before the next read
        self.counts: dict[str, int] = {}  # tails: how many entries the stream had up to our position
        self.started = False  # the first look is over: streams found later are read from their start
        self.next_claim = 0.0
        self.skipped = 0  # alerts this listener knows it missed (trimmed before it read them)

    def _connect(self, redis: Any) -> Any:
        """The shell's client for ``redis`` (a URL or a ready client)."""
        raise NotImplementedError

    def _session(self) -> Flow:
        """Look after look until stopped. The shells answer each step; a connection they lost comes
        back as a :class:`_Lost` answer, and is retried with backoff. A ``deliver`` step's answer
        is whether the alert was handled: False only if the callback said so (or raised);
        ``NOT_CALLED`` once stopped, and the look ends there (see ``_deliver``)."""
        while not self.stopped:
            cycle = self._cycle()
            answer: Any = None
            try:
                while True:
                    kind, arg = cycle.send(answer)
                    if kind == "deliver" and self.stopped:
                        answer = NOT_CALLED  # no callback starts after stop()
                        continue
                    answer = yield kind, arg
                    if isinstance(answer, _Lost):
                        raise answer.error
                    if kind == "deliver" and answer is not NOT_CALLED:
                        answer = answer is not False
            except StopIteration:
                self.backoff = 0.0
            except _LOST as exc:
                yield "sleep", self._lost(exc)
            finally:
                cycle.close()

    # ---- one look at the streams ----------------------------------------------------------------

    def _cycle(self) -> Flow:
        """Read the index (new scope trees appear in it), set up new streams, look for gaps where one
        may have opened, take back a group's pending alerts that are due again, read, deliver."""
        (index,) = yield "run", [Command(self.index_key, ("HGETALL", self.index_key))]
        index = _raise(index)
        streams = self._streams(index)
        if not streams:
            self.started = True
            yield "sleep", self.block_ms / 1000
            return
        fresh = [s for s in streams if s not in self.known]
        if fresh:
            yield from self._begin(fresh)
        self.started = True
        due = [s for s in streams if s in self.due]
        if due:
            yield from self._check(due)
        entries: list[Entry] = []
        if self.group is not None and time.monotonic() >= self.next_claim:
            entries = yield from self._claim(streams)
        if not entries:
            entries = yield from self._read(streams)
        yield from self._deliver(entries, time.monotonic())

    def _streams(self, index: dict[Any, Any]) -> list[str]:
        """Every stream of interest (a tree's stream carries the alerts of all its scopes)."""
        out = []
        for raw_scope, raw_stream in index.items():
            scope, stream = _text(raw_scope), _text(raw_stream)
            if (self.scopes is None or scope in self.scopes) and stream not in out:
                out.append(stream)
        return out

    def _begin(self, streams: list[str]) -> Flow:
        """A new tail starts at the oldest entry kept, or (new-only, first look) after the newest.
        A group is created there unless it exists, told how many entries lie before its position
        (``ENTRIESREAD``): from then on Redis counts the entries the group read, which is how a gap
        is counted. Either way the stream is looked at for a gap before it is read."""
        new_only = not (self.from_start or self.started)
        if self.group is None:
            for s in streams:
                self.last_ids.setdefault(s, "$" if new_only else "0-0")
        else:
            infos = [StreamInfo.of(r) for r in (yield "run", [Command(s, ("XINFO STREAM", s)) for s in streams])]
            cmds = []
            for s, info in zip(streams, infos, strict=True):
                start, read = (info.last, info.added) if new_only else ("0", info.added - info.length)
                cmds.append(Command(s, ("XGROUP CREATE", s, self.group, start, "MKSTREAM", "ENTRIESREAD", read)))
            created = []
            for s, reply in zip(streams, (yield "run", cmds), strict=True):
                if not _error(reply, "BUSYGROUP"):  # BUSYGROUP: the group exists, keep its position
                    _raise(reply)
                    created.append(Command(s, ("DEL", self._group_key(s, "gaps"))))  # a new group missed nothing
            if created:
                yield "run", created
        self.known.update(streams)
        self.due.update(streams)

    def _check(self, streams: list[str]) -> Flow:
        """Look for a gap: entries the stream dropped before this listener read them. The stream
        counts the entries ever added (``XINFO STREAM``); a group counts the entries it read (Redis,
        ``XINFO GROUPS``), a tail for itself (``counts``). Positioned before the oldest entry kept,
        or at the newest, the difference is what was skipped (so far: a group stores the number it
        reported, ``<stream>:gaps:<group>``). Done before a read that follows a non-empty one."""
        cmds = [Command(s, ("XINFO STREAM", s)) for s in streams]
        if self.group is not None:
            cmds += [Command(s, ("XINFO GROUPS", s)) for s in streams]
            cmds += [Command(s, ("GET", self._group_key(s, "gaps"))) for s in streams]
        replies = yield "run", cmds
        n = len(streams)
        for i, stream in enumerate(streams):
            self.due.discard(stream)
            info = StreamInfo.of(replies[i])
            if self.group is None:
                self._gap(stream, self._tail_missing(stream, info))
                continue
            groups = [] if _error(replies[n + i], "no such key") else _raise(replies[n + i]) or []
            mine = next((g for g in map(_mapping, groups) if _text(g.get("name")) == self.group), None)
            if mine is None:  # the stream was deleted with its group: set it up again
                self.known.discard(stream)
                continue
            missing = _group_missing(mine, info)
            reported = int(_raise(replies[2 * n + i]) or 0)
            if missing is not None and missing > reported:
                self._gap(stream, missing - reported)
                yield "run", [Command(stream, ("SET", self._group_key(stream, "gaps"), missing))]

    def _tail_missing(self, stream: str, info: StreamInfo) -> int | None:
        """How many entries a tail skipped since it last looked (0: none; None: some, not counted)."""
        position, known = self.last_ids[stream], self.counts.get(stream)
        if position == "$":  # a new-only tail's first look: after the newest entry
            self.last_ids[stream], position, known = info.last, info.last, info.added
        elif known is None and position == "0-0":  # a new tail: from the oldest entry kept
            known = info.added - info.length
        if info.first is not None and _id(position) < info.first:  # trimmed past its position
            self.counts[stream] = info.added - info.length
            return None if known is None else info.added - info.length - known
        if position == info.last:
            self.counts[stream] = info.added
            return None if known is None else info.added - known
        if known is not None:
            self.counts[stream] = known
        return 0

    def _gap(self, stream: str, skipped: int | None) -> None:
        if skipped is not None and skipped <= 0:
            return
        self.skipped += skipped or 0
        count = "an unknown number of" if skipped is None else str(skipped)
        log.warning(
            "alert listener%s skipped %s alerts of %s: the stream dropped them before they were read "
            "(it keeps the newest alert_stream_maxlen, 10,000 by default)",
            f" group {self.group!r}" if self.group else "",
            count,
            stream,
        )
        if self.on_gap is not None:
            try:
                self.on_gap(skipped)
            except Exception:
                log.exception("on_gap callback %r failed", self.on_gap)

    # ---- reading --------------------------------------------------------------------------------

    def _read_command(self, positions: dict[str, str], block: int | None) -> Command:
        wait = [] if block is None else ["BLOCK", block]
        if self.group is None:
            head: tuple[Any, ...] = ("XREAD", "COUNT", TAIL_BATCH, *wait)
        else:  # COUNT is per stream: a member takes about GROUP_BATCH in all, the rest stay for the others
            count = max(1, GROUP_BATCH // len(positions))
            head = ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, *wait)
        return Command(next(iter(positions)), (*head, "STREAMS", *positions, *positions.values()))

    def _read(self, streams: list[str]) -> Flow:
        positions = {s: ">" if self.group is not None else self.last_ids.get(s, "0-0") for s in streams}
        if self.cluster:
            entries = yield from self._read_slots(self._slots(positions))
        else:
            entries = _entries(self._answer((yield "run", [self._read_command(positions, self.block_ms)]))[0])
        self.due.update(e.stream for e in entries)  # before the next read of these: a gap may open
        return entries

    @staticmethod
    def _slots(positions: dict[str, str]) -> dict[int, dict[str, str]]:
        """Streams grouped by Cluster hash slot: one read may only name keys of one slot."""
        groups: dict[int, dict[str, str]] = {}
        for stream, last in positions.items():
            groups.setdefault(key_slot(stream.encode()), {})[stream] = last
        return groups

    def _read_slots(self, groups: dict[int, dict[str, str]]) -> Flow:
        """Cluster: one read per slot. With several slots, look at every one without blocking (one
        pipelined round trip per node); if all are quiet, block on the slot of the latest alert for
        ``block_ms``. An alert in that slot arrives at once, one elsewhere at the next look, within
        ``block_ms``."""
        found: list[Entry] = []
        if len(groups) > 1:
            replies = self._answer((yield "run", [self._read_command(g, None) for g in groups.values()]))
            found = [entry for reply in replies for entry in _entries(reply)]
        if not found:
            hot = self.hot_slot if self.hot_slot in groups else next(iter(groups))
            found = _entries(self._answer((yield "run", [self._read_command(groups[hot], self.block_ms)]))[0])
        if found:
            self.hot_slot = key_slot(found[-1].stream.encode())
        return found

    def _answer(self, replies: list[Any]) -> list[Any]:
        """Read replies: a stream whose group vanished (the key was deleted) is set up again."""
        if any(_error(reply, "NOGROUP") for reply in replies):
            self.known.clear()
        return [None if _error(reply, "NOGROUP") else _raise(reply) for reply in replies]

    # ---- a group's pending alerts ----------------------------------------------------------------

    def _claim(self, streams: list[str]) -> Flow:
        """Take the group's pending alerts that are due again: this member's own after a failed
        callback (with backoff: ``retry_ms`` doubling per delivery), any member's once idle for
        ``claim_idle_ms`` (its process died, or hangs). Those delivered ``max_deliveries`` times
        go to the dead-letter stream."""
        self.next_claim = time.monotonic() + self.retry_ms / 1000
        cmds = [
            Command(s, ("XPENDING", s, self.group, "IDLE", self.retry_ms, "-", "+", 100), {"parse_detail": True})
            for s in streams
        ]
        claims: list[Command] = []
        dead: dict[tuple[str, str], int] = {}  # (stream, id): deliveries (entry ids repeat across streams)
        for stream, pending in zip(streams, (yield "run", cmds), strict=True):
            due = []
            for p in _raise(pending) or []:
                deliveries, idle = int(p["times_delivered"]), int(p["time_since_delivered"])
                if idle < min(self.retry_ms * 2 ** (deliveries - 1), MAX_BACKOFF_MS):
                    continue
                if _text(p["consumer"]) != self.consumer and idle < self.claim_idle_ms:
                    continue
                due.append(_text(p["message_id"]))
                if deliveries >= self.max_deliveries:
                    dead[stream, _text(p["message_id"])] = deliveries
            if due:
                claims.append(Command(stream, ("XCLAIM", stream, self.group, self.consumer, self.retry_ms, *due)))
        if not claims:
            return []
        replies = yield "run", claims
        entries = [
            Entry(c.key, _text(i), f)
            for c, r in zip(claims, replies, strict=True)
            for i, f in _raise(r)
            if i is not None
        ]
        if dead:
            yield from self._bury([e for e in entries if (e.stream, e.id) in dead], dead)
        return [e for e in entries if (e.stream, e.id) not in dead]

    def _bury(self, entries: list[Entry], deliveries: dict[tuple[str, str], int]) -> Flow:
        cmds = []
        for e in entries:
            dead_key = self._group_key(e.stream, "dead")
            fields = ("alert", e.payload(), "id", e.id, "deliveries", deliveries[e.stream, e.id])
            cmds.append(Command(e.stream, ("XADD", dead_key, "MAXLEN", "~", DEAD_CAP, "*", *fields)))
            cmds.append(Command(e.stream, ("XACK", e.stream, self.group, e.id)))
            log.error(
                "alert %s of %s moved to %s after %d failed deliveries to group %r",
                e.id,
                e.stream,
                dead_key,
                deliveries[e.stream, e.id],
                self.group,
            )
        for reply in (yield "run", cmds):
            _raise(reply)

    # ---- delivering -----------------------------------------------------------------------------

    def _deliver(self, entries: list[Entry], since: float) -> Flow:
        """Each entry to the callback (``deliver``), then its position moves: a tail's last id, a
        group's acknowledgement with the id marked handled (first the mark, then the ack: a member
        that dies between the two leaves a pending alert that the next one acknowledges unseen).
        ``since``: when the entries were read (monotonic seconds)."""
        for i, entry in enumerate(entries):
            alert = _alert(entry)
            wanted = alert is not None and (self.scopes is None or alert.scope in self.scopes)
            if self.group is None:
                if wanted and (yield "deliver", alert) is NOT_CALLED:
                    return  # stopped: the position stays before this alert
                self.last_ids[entry.stream] = entry.id  # a tail moves on whatever the callback said
                if entry.stream in self.counts:
                    self.counts[entry.stream] += 1
                continue
            fresh = wanted and (yield from self._hold(entry, since))
            if fresh is None:
                continue  # another member took the alert over: it delivers it
            handled = (yield "deliver", alert) if fresh else True
            if handled is NOT_CALLED:  # stopped: hand the rest back to the group at once
                held_ms = int((time.monotonic() - since) * 1000)
                yield "run", self._release([entry], 0) + self._release(entries[i + 1 :], held_ms)
                return
            if handled:
                yield from self._ack(entry, mark=fresh)
            else:
                log.warning("alert %s not handled by group %r: delivered again later", entry.id, self.group)

    def _release(self, entries: list[Entry], min_idle_ms: int) -> list[Command]:
        """Alerts this member read but will not deliver (it stops), marked idle for ``claim_idle_ms``:
        another member (or this one, restarted) takes them over at its next look. ``min_idle_ms``:
        how long this member has held them (0: it just claimed them), so one that another member
        took meanwhile stays with it."""
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.id)
        idle = ["IDLE", self.claim_idle_ms, "JUSTID"]
        return [
            Command(s, ("XCLAIM", s, self.group, self.consumer, min_idle_ms, *ids, *idle), {"parse_justid": True})
            for s, ids in by_stream.items()
        ]

    def _hold(self, entry: Entry, since: float) -> Flow:
        """Just before a group's callback: is the alert still this member's, and not handled yet?
        ``XCLAIM`` with the time it has been ours as the minimum idle time succeeds only if no other
        member claimed it meanwhile, and restarts its idle time, so none takes it over while its
        callback runs (unless that takes ``claim_idle_ms``). True: deliver it; False: acknowledge it
        unseen (handled before, by a member that died before its ack); None: not ours any more."""
        held_ms = int((time.monotonic() - since) * 1000)
        claim = ("XCLAIM", entry.stream, self.group, self.consumer, held_ms, entry.id, "JUSTID")
        done, mine = yield (
            "run",
            [
                Command(entry.stream, ("ZSCORE", self._group_key(entry.stream, "done"), entry.id)),
                Command(entry.stream, claim, {"parse_justid": True}),
            ],
        )
        if not _raise(mine):
            return None
        return _raise(done) is None

    def _group_key(self, stream: str, kind: str) -> str:
        return alert_group_key(stream, self.group or "", kind)

    def _ack(self, entry: Entry, mark: bool) -> Flow:
        done = self._group_key(entry.stream, "done")
        cmds = []
        if mark:
            cmds = [
                Command(entry.stream, ("ZADD", done, _id(entry.id)[0], entry.id)),
                Command(entry.stream, ("ZREMRANGEBYRANK", done, 0, -DONE_KEPT - 1)),
                Command(entry.stream, ("PEXPIRE", done, DONE_TTL_MS)),
            ]
        cmds.append(Command(entry.stream, ("XACK", entry.stream, self.group, entry.id)))
        for reply in (yield "run", cmds):
            _raise(reply)

    def _lost(self, exc: Exception) -> float:
        """Seconds to wait before retrying after a lost connection (exponential, capped at 5 s); then
        every stream is looked at again (for a gap, or a group the server lost)."""
        self.backoff = min(max(self.backoff * 2, 0.1), 5.0)
        self.due |= self.known
        log.warning("alert listener lost Redis (%s); retrying in %.1fs", exc, self.backoff)
        return self.backoff


def _handled(alert: BudgetAlert, callback: Callable[[BudgetAlert], Any]) -> Any:
    """Call ``callback``; False when it raised (logged) or returned False (e.g. a WebhookSink that
    gave up), so a group delivers the alert again."""
    try:
        return callback(alert)
    except Exception:
        log.exception("alert callback %r failed on %s", callback, alert.alert_id)
        return False


class AlertListener(_ListenerBase):
    """Hears every alert of the fleet (or of ``scopes``), from the durable streams.

    ``start(callback)`` runs it in a background thread (callback errors are logged; in a group the
    alert is delivered again); ``stop()`` ends it: it waits for a callback in progress to return, and
    no callback starts after it returned. ``for alert in listener`` yields alerts instead (an alert
    counts as handled when the loop asks for the next one).

    - ``group``: a Redis consumer group (see the module doc): resumes across restarts, shares the work
      between the processes of the group, each alert handled once per group; ``consumer`` names this
      member (default: host, pid and a random suffix); ``max_deliveries``, ``retry_ms`` (first
      backoff, doubling) and ``claim_idle_ms`` (when another member's alert is taken over).
    - ``last_ids``: a tail resumed from ``listener.last_ids`` of a previous run (after ``stop()``).
    - ``from_start``: see :data:`FROM_START`. ``on_gap(skipped)``: called after the WARNING when
      alerts were trimmed unread (``skipped`` is ``None`` for a resumed tail, which cannot count them).

    Connection loss (on a Cluster, also every node unreachable, or the cluster down) is retried with
    backoff. A scope tree that appears while the listener runs is picked up within ``block_ms``.
    """

    _thread: threading.Thread | None = None

    def _connect(self, redis: Any) -> Any:
        self._calling = threading.RLock()  # held while a callback runs: stop() waits on it
        return _sync_client(redis)

    def _alerts(self) -> Generator[BudgetAlert, Any, None]:
        """Each alert; the answer sent back (None from a ``for`` loop) says whether it was handled."""
        flow, answer = self._session(), None
        while (step := _next(flow, answer)) is not None:
            answer = (yield step[1]) if step[0] == "deliver" else self._io(*step)

    def _io(self, kind: str, arg: Any) -> Any:
        try:
            return time.sleep(arg) if kind == "sleep" else _run_sync(self.client, arg, self.cluster)
        except _LOST as exc:
            return _Lost(exc)

    def __iter__(self) -> Generator[BudgetAlert, Any, None]:
        """``for alert in listener``; ``send(False)`` instead of ``next()`` says it was not handled."""
        return self._alerts()

    def start(self, callback: Callable[[BudgetAlert], Any]) -> AlertListener:
        def run() -> None:
            alerts = self._alerts()
            try:
                alert = next(alerts)
                while True:
                    with self._calling:
                        handled = NOT_CALLED if self.stopped else _handled(alert, callback)
                    alert = alerts.send(handled)
            except StopIteration:
                pass
            finally:
                alerts.close()

        self._thread = threading.Thread(target=run, name="distbudget-alerts", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: wait for a callback in progress to return (no callback starts afterwards), then up
        to ``timeout`` seconds for the thread's read to end."""
        with self._calling:
            self.stopped = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class AsyncAlertListener(_ListenerBase):
    """The asyncio twin: ``await listener.run(callback)`` (or ``async for alert in listener``); end
    it with ``await listener.aclose()`` (waits for a callback in progress; none starts afterwards),
    ``stop()`` (no callback starts after it), or by cancelling the task. Same options as
    :class:`AlertListener`; ``callback`` may be a coroutine function."""

    _idle: asyncio.Event | None = None  # clear while run()'s callback runs (made by run(): it binds to a loop)
    _runner: asyncio.Task[Any] | None = None

    def _connect(self, redis: Any) -> Any:
        return redis if not isinstance(redis, str) else _async_client(redis)

    def stop(self) -> None:
        self.stopped = True

    async def aclose(self) -> None:
        """Stop, and return once a callback in progress has returned (at once from the callback)."""
        self.stopped = True
        if self._idle is not None and asyncio.current_task() is not self._runner:
            await self._idle.wait()

    async def _alerts(self) -> AsyncGenerator[BudgetAlert, Any]:
        flow, answer = self._session(), None
        while (step := _next(flow, answer)) is not None:
            answer = (yield step[1]) if step[0] == "deliver" else await self._io(*step)

    async def _io(self, kind: str, arg: Any) -> Any:
        try:
            return await (asyncio.sleep(arg) if kind == "sleep" else _run_async(self.client, arg, self.cluster))
        except _LOST as exc:
            return _Lost(exc)

    def __aiter__(self) -> AsyncGenerator[BudgetAlert, Any]:
        return self._alerts()

    async def run(self, callback: Callable[[BudgetAlert], Any]) -> None:
        """Hand each alert to ``callback`` until stopped or cancelled."""
        idle = self._idle = asyncio.Event()
        idle.set()
        self._runner = asyncio.current_task()
        alerts = self._alerts()
        try:
            alert = await alerts.__anext__()
            while True:
                idle.clear()
                try:
                    handled = NOT_CALLED if self.stopped else _handled(alert, callback)
                    if inspect.isawaitable(handled):
                        handled = await handled
                except Exception:
                    log.exception("alert callback %r failed on %s", callback, alert.alert_id)
                    handled = False
                finally:
                    idle.set()
                alert = await alerts.asend(handled)
        except StopAsyncIteration:
            pass
        finally:
            await alerts.aclose()


# ---- the shells' I/O: commands pipelined per node ---------------------------------------------------


def _run_sync(client: Any, commands: list[Command], cluster: bool) -> list[Any]:
    """The commands' replies in order, error replies as exception objects. On a Cluster, each node's
    commands go in one pipeline on that node (routed by the slot map: no ``COMMAND GETKEYS`` round
    trip for a read whose keys are not at fixed positions). A command whose slot moved meanwhile
    answers ``None`` this time; the slot map is refreshed (also when a node cannot be reached)."""
    if not cluster:
        pipe = client.pipeline(transaction=False)
        for c in commands:
            pipe.execute_command(*c.args, **c.options)
        return list(pipe.execute(raise_on_error=False))
    by_node: dict[str, tuple[Any, list[int]]] = {}
    for i, c in enumerate(commands):
        node = client.get_node_from_key(c.key)
        by_node.setdefault(node.name, (node, []))[1].append(i)
    replies: list[Any] = [None] * len(commands)
    for node, indexes in by_node.values():
        pipe = client.get_redis_connection(node).pipeline(transaction=False)
        for i in indexes:
            pipe.execute_command(*commands[i].args, **commands[i].options)
        try:
            answers = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError):  # the node is gone (a failover?): re-read the
            with contextlib.suppress(redis.RedisError, RedisClusterException):  # slot map before retrying
                client.nodes_manager.initialize()
            raise
        for i, reply in zip(indexes, answers, strict=True):
            replies[i] = _moved(client, reply)
    return replies


async def _run_async(client: Any, commands: list[Command], cluster: bool) -> list[Any]:
    """The same on ``redis.asyncio``: one pipeline, or on a Cluster each command sent to its node
    (``target_nodes``), all at once; redirections are followed."""
    if not cluster:
        pipe = client.pipeline(transaction=False)
        for c in commands:
            pipe.execute_command(*c.args, **c.options)
        return list(await pipe.execute(raise_on_error=False))

    await client.initialize()  # reads the slot map the first time; later a no-op unless redis-py asked for a refresh

    async def one(c: Command) -> Any:
        try:
            return await client.execute_command(*c.args, target_nodes=client.get_node_from_key(c.key), **c.options)
        except redis.exceptions.ResponseError as exc:
            return exc

    return list(await asyncio.gather(*(one(c) for c in commands)))


def _moved(client: Any, reply: Any) -> Any:
    if isinstance(reply, (redis.exceptions.MovedError, redis.exceptions.AskError)):
        client.nodes_manager.initialize()
        return None
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
    with a timeout and ``retries`` quick retries with backoff. Use as a callback:
    ``listener.start(WebhookSink(url))``. It returns False when every try failed: in a listener
    ``group`` the alert then stays pending, is delivered again with backoff and, after the listener's
    ``max_deliveries``, moves to the group's dead-letter stream (there, ``retries=0`` leaves the
    spacing of the tries to the group)."""

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
            "requested_by": alert.requested_by._asdict() if alert.requested_by else None,
            "timestamp": alert.timestamp,
            "message": alert.message,
        }

    def __call__(self, alert: BudgetAlert) -> bool:
        data = json.dumps(self.body(alert)).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if 200 <= response.status < 300:
                        return True
            except OSError as exc:
                log.warning("webhook %s failed (attempt %d): %s", self.url, attempt + 1, exc)
        log.error("webhook %s gave up on alert %s after %d tries", self.url, alert.alert_id, self.retries + 1)
        return False


__all__ = ["FROM_START", "AlertListener", "AsyncAlertListener", "WebhookSink", "alert_from_payload"]
