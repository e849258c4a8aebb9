"""The embedded engine: applies plans in-process, under one lock, with the same semantics as the
Lua scripts (``lua/``) step for step. A differential test holds the two to identical results.

State mirrors the Redis layout: a hash per key (counter totals under their field prefix, alert
state beside them), bucket amounts per window, holds and per-counter held amounts per tree.
Sessions and request ids expire by the engine's clock like their Redis TTLs; windows stay (a
scope's windows are few and bounded by their bucket count).
"""

from __future__ import annotations

import threading
import time
from itertools import chain
from typing import Any, Literal, TypeVar

from distbudget._core import ledger, ops, registry, update
from distbudget._core.bounds import check_after
from distbudget._core.errors import InvalidInputError
from distbudget._core.fast import FastCall
from distbudget._core.ledger import op_ids, plain_charge
from distbudget._core.plan import Counter, Plan

R = TypeVar("R")

_METRIC_SUFFIX = ("t", "c", "r")
_METRIC_NAMES = ("tokens", "nano-USD", "requests")
_HALF = 2**52


class _Window:
    __slots__ = ("buckets", "newest", "oldest")

    def __init__(self) -> None:
        self.buckets: dict[int, list[int]] = {}
        self.oldest = 0
        self.newest = 0


class _Stream:
    """A capped stream, as XADD MAXLEN / XRANGE see it (ids: server milliseconds - sequence). Its
    entries lie flat in one list, ``W`` cells each: (id ms, id sequence, clock µs, tokens, nano-USD,
    then either the JSON, None and requests (``add``) or, for a fast-path charge
    (``MemoryEngine.fast_record``), the plan's ledger head, its op id ("" until first read) and the
    input and output tokens: its JSON is made only when read, by ``_core/ledger.plain_charge``).
    Appending makes no object the garbage collector tracks; the entries beyond ``maxlen`` are
    skipped (``start``) and dropped once they are as many as the live ones."""

    __slots__ = ("cap", "cells", "end", "maxlen", "ms", "seq", "start")

    W = 9

    def __init__(self, maxlen: int) -> None:
        self.cells: list[Any] = []
        self.start = 0  # the first live cell
        self.maxlen = maxlen
        self.cap = maxlen * self.W  # live cells at most
        self.end = self.cap  # trim() is due once the cells pass this
        self.ms = 0
        self.seq = 0

    def next_id(self, ms: int) -> tuple[int, int]:
        if ms > self.ms:
            self.ms, self.seq = ms, 0
        else:
            self.seq += 1
        return self.ms, self.seq

    def add(self, entry: str, now: int, amt: tuple[int, int, int]) -> str:
        ms, seq = self.next_id(time.time_ns() // 1_000_000)
        self.cells.extend((ms, seq, now, amt[0], amt[1], entry, None, amt[2], 0))
        if len(self.cells) > self.end:
            self.trim()
        return f"{ms}-{seq}"

    def trim(self) -> None:
        """Skip the entries beyond ``maxlen``, oldest first; drop the skipped ones once they are as
        many as the live ones (amortized: each cell is moved at most once per ``maxlen`` appends)."""
        cells = self.cells
        self.start = max(self.start, len(cells) - self.cap)
        if self.start * 2 >= len(cells):
            del cells[: self.start]
            self.start = 0
        self.end = self.start + self.cap

    def resize(self, maxlen: int) -> None:
        self.maxlen, self.cap = maxlen, maxlen * self.W
        self.trim()

    def read(self, start: str, count: int) -> list[tuple[str, dict[str, str]]]:
        if start == "-":
            lo, exclusive = (0, 0), False
        else:
            exclusive = start.startswith("(")
            lo_ms, _, lo_seq = start.lstrip("(").partition("-")
            lo = (int(lo_ms), int(lo_seq) if lo_seq else 0)
        out = []
        cells, width = self.cells, self.W
        for k in range(self.start, len(cells), width):
            ms, seq, now, tokens, cost, text, op, x, y = cells[k : k + width]
            eid = (ms, seq)
            if eid > lo or (eid == lo and not exclusive):
                if op is None:
                    fields = {"d": text, "ts": str(now), "t": str(tokens), "c": str(cost), "r": str(x)}
                else:
                    if not op:  # a fast-path charge read for the first time: its op id now
                        op = cells[k + 6] = op_ids.next()
                    entry = plain_charge(text, op, x, y)
                    fields = {"d": entry, "ts": str(now), "t": str(tokens), "c": str(cost), "r": "1"}
                out.append((f"{ms}-{seq}", fields))
                if len(out) >= count:
                    break
        return out


class _Tree:
    __slots__ = ("held", "holds", "leases")

    def __init__(self) -> None:
        self.holds: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {}
        self.held: dict[str, list[int]] = {}
        self.leases: dict[str, int] = {}


class FastPlan(FastCall):
    """A plan compiled for :meth:`MemoryEngine.fast_record` (one per budget, session and model): the
    counters it charges held as plain references while it is the engine's *active* plan, how far its
    charges may still go (``r0``, ``r1``, ``r2``: tokens, nano-USD, requests, strictly below every
    alert threshold not yet fired, every limit and 2**52) and until when (``lo`` <= now < ``hi``: no
    bucket, window edge, session TTL refresh or sweep due) without an alert, an error or any change
    of the state's shape. What was charged since, not yet in the counters, is the room used (``left``
    minus ``r``): anything else adds it first (``_settle``).
    The budget's side (``_accounting.py``) fills the constant part (``FastCall``)."""

    __slots__ = ("buckets", "hi", "left", "lo", "r0", "r1", "r2", "stream", "tots")

    def __init__(self, plan: Plan, maxlen: int, i_rate: int, o_rate: int, record_fields: dict[str, Any]) -> None:
        super().__init__(plan, maxlen, i_rate, o_rate, record_fields)
        self.tots: list[list[int]] = []
        self.buckets: list[list[int]] = []
        self.stream: _Stream | None = None
        self.r0 = self.r1 = self.r2 = 0  # the room left (tokens, nano-USD, requests)
        self.left: tuple[int, int, int] = (0, 0, 0)  # the room when made active: pending = left - r
        self.lo = self.hi = 0


def _expire(w: _Window, tot: list[int], lo: int) -> None:
    """Subtract and drop the buckets that have wholly left the window (those below ``lo``); the
    callers check ``w.oldest < lo`` first, so the common charge pays no call."""
    for b in [b for b in w.buckets if b < lo]:
        amounts = w.buckets.pop(b)
        tot[0] -= amounts[0]
        tot[1] -= amounts[1]
        tot[2] -= amounts[2]
    w.oldest = min(w.buckets, default=0)


def _server_now() -> int:
    return time.time_ns() // 1000


class MemoryEngine:
    """In-process engine. Thread-safe; one instance may serve many budgets (a manager's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes: dict[str, dict[Any, Any]] = {}
        self._expires: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}
        self._trees: dict[str, _Tree] = {}
        self._requests: dict[str, tuple[int, tuple[int, int, int]]] = {}
        self._streams: dict[str, _Stream] = {}
        self._registries: dict[str, dict[str, str]] = {}
        self._prices: dict[str, tuple[int, str | None]] = {}  # the fleet price book: revision, JSON
        self._sweep_at = 0
        self._high = False  # some counter has reached 2**52 (see _check_room)
        self._active: FastPlan | None = None  # the fast plan whose pending amounts are not settled yet
        self._handlers: dict[type[Any], Any] = {
            ops.Record: self._record,
            ops.RecordMany: self._record_many,
            ops.Commit: self._commit,
            ops.Check: self._check,
            ops.Reserve: self._reserve,
            ops.Release: self._release,
            ops.Extend: self._extend,
            ops.Summary: self._summary,
            ops.Reset: self._reset,
            ops.RegistryPut: self._registry_put,
            ops.RegistryChain: self._registry_chain,
            ops.RegistryRemove: self._registry_remove,
            ops.RegistrySwap: self._registry_swap,
            ops.RegistryNames: self._registry_names,
            ops.LedgerRead: self._ledger_read,
            ops.Announce: self._announce,
            ops.PricesRead: self._prices_read,
            ops.PricesPush: self._prices_push,
        }

    # ---- state helpers (mirroring lua/include/scan.lua) ----------------------------------------

    def _lookup(self, key: str, now: int) -> dict[Any, Any] | None:
        """The hash at ``key`` as a read sees it (HMGET, HGETALL): None when absent or expired.
        Reads create nothing: only charges do (``_hash``), so that reads of sessions never charged
        (each a new key) leave no state behind."""
        h = self._hashes.get(key)
        if h is not None:
            exp = self._expires.get(key)
            if exp is not None and exp <= now:
                del self._expires[key]
                del self._hashes[key]
                return None
        return h

    def _hash(self, key: str, now: int) -> dict[Any, Any]:
        """The hash at ``key`` for a write: created (empty) when absent or expired."""
        exp = self._expires.get(key)
        if exp is not None and exp <= now:
            del self._expires[key]
            self._hashes.pop(key, None)
        h = self._hashes.get(key)
        if h is None:
            h = self._hashes[key] = {}
        return h

    def _sweep(self, now: int) -> None:
        """Drop idle sessions and old request ids now and then, so memory stays bounded."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + 60_000_000
        for key in [k for k, exp in self._expires.items() if exp <= now]:
            del self._expires[key]
            self._hashes.pop(key, None)
        for key in [k for k, (exp, _) in self._requests.items() if exp <= now]:
            del self._requests[key]

    def _counter(self, c: Counter, now: int) -> list[int]:
        """The counter's running totals, aged (zeros if absent, as HMGET sees them; nothing created)."""
        h = self._lookup(c.hash_key, now)
        tot: list[int] | None = None if h is None else h.get(c.prefix)
        if tot is None:
            return [0, 0, 0]
        if c.zset_key is not None:
            w = self._windows.get(c.zset_key)
            if w is not None and w.buckets:
                lo = (now - c.window_us) // c.bucket_us
                if w.oldest < lo:
                    _expire(w, tot, lo)
        return tot

    def _refresh(self, h: dict[Any, Any], c: Counter, now: int) -> None:
        """An idle-TTL hash (a session) charged: refresh its TTL when due, as lua/include/scan.lua does
        (when the last refresh, kept under the key None, is older than the slack: min(ttl / 16, 60 s);
        the hash then lives ttl + slack)."""
        last = h.get(None)
        slack = min(c.ttl_ms // 16, 60_000) * 1000
        if last is None or now - last >= slack or now < last:
            h[None] = now
            self._expires[c.hash_key] = now + c.ttl_ms * 1000 + slack

    @staticmethod
    def _alerts(
        plan: Plan, totals: list[list[int]], hashes: list[dict[Any, Any]], amt: tuple[int, int, int]
    ) -> tuple[tuple[int, int], ...]:
        out: list[tuple[int, int]] = []
        fields = plan.alert_fields
        for i, (ci, metric, _value, first) in enumerate(plan.checks):
            after = totals[ci][metric]
            h = hashes[ci]
            field = fields[i]
            st = h.get(field, 0)
            if not st and after < first:
                continue  # nothing fired, nothing to re-arm (the scripts' fast path)
            lim = plan.limits[i]
            before = after - amt[metric]
            ns = st
            if ns & 1 and before < lim.warn_rearm:
                ns -= 1
            if ns & 2 and before < lim.crit_rearm:
                ns -= 2
            if lim.warn_at >= 0 and not ns & 1 and after >= lim.warn_at:
                ns += 1
                out.append((i, 1))
            if not ns & 2 and after >= lim.crit_at:
                ns += 2
                out.append((i, 2))
            if ns != st:
                if ns:
                    h[field] = ns
                else:
                    del h[field]
        return tuple(out)

    def _tree(self, plan: Plan) -> _Tree:
        t = self._trees.get(plan.keys[0])
        if t is None:
            t = self._trees[plan.keys[0]] = _Tree()
        return t

    @staticmethod
    def _drop_hold(tree: _Tree, hold_id: str) -> bool:
        entry = tree.holds.pop(hold_id, None)
        if entry is None:
            return False
        amt, cids = entry
        for cid in cids:
            held = tree.held.get(cid)
            if held is not None:
                held[0] -= amt[0]
                held[1] -= amt[1]
                held[2] -= amt[2]
                if held[0] <= 0 and held[1] <= 0 and held[2] <= 0:
                    del tree.held[cid]
        tree.leases.pop(hold_id, None)
        return True

    def _reap(self, tree: _Tree, now: int) -> None:
        if tree.leases:
            for hold_id in [h for h, exp in tree.leases.items() if exp <= now]:
                self._drop_hold(tree, hold_id)

    def _read(self, plan: Plan, now: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The plan's counters and holds as a check, a reservation or a summary reads them (under
        the lock; fast-path amounts settled first)."""
        if self._active is not None:
            self._settle()
        tree = self._trees.get(plan.keys[0])  # a read creates no state (see _lookup)
        if tree is not None:
            self._reap(tree, now)
        in_tree = {} if tree is None else tree.held
        totals: list[int] = []
        held: list[int] = []
        for c in plan.counters:
            totals.extend(self._counter(c, now))
            held.extend(in_tree.get(c.id, (0, 0, 0)))
        return tuple(totals), tuple(held)

    def _admit(
        self, plan: Plan, totals: tuple[int, ...], held: tuple[int, ...], amt: tuple[int, int, int], now: int
    ) -> tuple[int, int]:
        for i, lim in enumerate(plan.limits):
            k = 3 * lim.counter + lim.metric
            this = amt[lim.metric]
            need = totals[k] + held[k] + this - lim.value
            if need > 0:
                retry = -1
                c = plan.counters[lim.counter]
                w = self._windows.get(c.zset_key) if c.zset_key else None
                if w is not None and held[k] + this <= lim.value:
                    freed = 0
                    for b in sorted(w.buckets):
                        freed += w.buckets[b][lim.metric]
                        if freed >= need:
                            retry = (b + 1) * c.bucket_us + c.window_us - now
                            break
                return i, retry
        return -1, -1

    # ---- operations (one lock hold each: the in-process "atomic step") --------------------------

    def execute(self, op: ops.Operation[R]) -> R:
        """Apply one operation (see ``engines/base.py``)."""
        return self._handlers[type(op)](op)  # type: ignore[no-any-return]  # each handler matches its type

    def fast_record(
        self, fp: FastPlan, tokens: int, cost: int, now: int, ms: int, i: int, o: int
    ) -> str | Literal[False] | None:
        """``record()``'s fast path: charge (tokens, cost, 1 request) at ``now`` (µs: the caller's
        clock, else the server's, as ``time.time_ns() // 1000`` read just before) through ``fp``'s
        compiled plan, its ledger entry (``i`` input and ``o`` output tokens) at the server's ``ms``
        milliseconds (``time.time_ns() // 1_000_000``). Its ledger id (None without a ledger), or False
        when the charge is not a plain one (it would fire an alert, pass a limit, reach a new bucket
        ...: the caller then records it the usual way, ``ops.Record``). Exactly what ``_record``
        would do, but the counters see the amounts when ``_settle`` adds them, before any other
        operation of this engine."""
        lock = self._lock
        lock.acquire()
        try:
            # only the active plan has a time span (_settle closes it): a plan not active is made so
            if not fp.lo <= now < fp.hi and not self._activate(fp, now, tokens, cost):
                return False
            r0, r1, r2 = fp.r0 - tokens, fp.r1 - cost, fp.r2 - 1
            if r0 <= 0 or r1 <= 0 or r2 <= 0:
                return False
            fp.r0, fp.r1, fp.r2 = r0, r1, r2
            stream = fp.stream
            if stream is None:
                return None
            if ms > stream.ms:
                stream.ms = ms
                seq = stream.seq = 0
            else:
                ms = stream.ms
                seq = stream.seq = stream.seq + 1
            cells = stream.cells
            cells += (ms, seq, now, tokens, cost, fp.ledger_head, "", i, o)
            if len(cells) > stream.end:
                stream.trim()
            return f"{ms}-{seq}"
        finally:
            lock.release()

    def _activate(self, fp: FastPlan, now: int, tokens: int, cost: int) -> bool:
        """Make ``fp`` the active plan at ``now``: settle the active one, prepare its counters as a
        charge does (the session's hash and TTL, the windows aged, the current bucket) and work out
        its room and its time span. False (nothing changed) when the fast path cannot apply."""
        if self._active is not None:
            self._settle()
        plan = fp.plan
        if self._high or tokens >= _HALF or cost >= _HALF or plan.valid_until_us:
            return False
        if now >= self._sweep_at:
            self._sweep(now)
        hi = self._sweep_at
        all_hashes, windows = self._hashes, self._windows
        tots, buckets, hashes = [], [], []
        for c in plan.counters:
            zkey = c.zset_key
            h: dict[Any, Any] | None
            if zkey is None and c.ttl_ms:
                h = self._hash(c.hash_key, now)
                self._refresh(h, c, now)
                hi = min(hi, h[None] + min(c.ttl_ms // 16, 60_000) * 1000)
            else:
                h = all_hashes.get(c.hash_key)
                if h is None:
                    h = all_hashes[c.hash_key] = {}
            tot = h.get(c.prefix)
            if tot is None:
                tot = h[c.prefix] = [0, 0, 0]
            if zkey is not None:
                w = windows.get(zkey)
                if w is None:
                    w = windows[zkey] = _Window()
                if w.buckets:
                    lo = (now - c.window_us) // c.bucket_us
                    if w.oldest < lo:
                        _expire(w, tot, lo)
                b = max(now // c.bucket_us, w.newest)
                w.newest = b
                bucket = w.buckets.get(b)
                if bucket is None:
                    if not w.buckets or b < w.oldest:
                        w.oldest = b
                    bucket = w.buckets[b] = [0, 0, 0]
                # until the next bucket, and until the oldest bucket leaves the window
                hi = min(hi, (b + 1) * c.bucket_us, (w.oldest + 1) * c.bucket_us + c.window_us)
                buckets.append(bucket)
            tots.append(tot)
            hashes.append(h)
        room = [_HALF - max(t[m] for t in tots) for m in (0, 1, 2)]
        for lim, field in zip(plan.limits, plan.alert_fields, strict=True):
            m = lim.metric
            now_at = tots[lim.counter][m]
            st = hashes[lim.counter].get(field, 0)
            r = lim.value - now_at + 1  # beyond: over the limit (an error or a warning)
            if st & 1:
                if now_at < lim.warn_rearm:
                    r = 0  # it would re-arm
            elif lim.warn_at >= 0:
                r = min(r, lim.warn_at - now_at)
            if st & 2:
                if now_at < lim.crit_rearm:
                    r = 0
            else:
                r = min(r, lim.crit_at - now_at)
            room[m] = min(room[m], r)
        fp.r0, fp.r1, fp.r2 = fp.left = (room[0], room[1], room[2])
        fp.tots, fp.buckets = tots, buckets
        fp.lo, fp.hi = now, hi
        fp.stream = self._stream(plan.keyspace.ledger, fp.maxlen) if fp.maxlen else None
        self._active = fp
        return True

    def _settle(self) -> None:
        """Add the active fast plan's pending amounts to its counters (every operation but the fast
        path's own does this first, under the lock, so it sees the exact state)."""
        fp = self._active
        assert fp is not None
        self._active = None
        fp.hi = fp.lo  # no time span: fast_record makes it active again first
        p0, p1, p2 = fp.left[0] - fp.r0, fp.left[1] - fp.r1, fp.left[2] - fp.r2  # the pending amounts
        if p2:
            for row in chain(fp.tots, fp.buckets):
                row[0] += p0
                row[1] += p1
                row[2] += p2
            fp.left = (fp.r0, fp.r1, fp.r2)

    def _record(self, op: ops.Record) -> ops.ChargeResult:
        with self._lock:
            if self._active is not None:
                self._settle()
            now = _server_now() if op.now_us is None else op.now_us
            if self._seen(op.request_key, now) is None:
                self._check_room(op.plan, now, op.amounts)
            return self._charge_plan(op, now, False)

    def _record_many(self, op: ops.RecordMany) -> list[ops.ChargeResult | InvalidInputError]:
        """Each record in order, under one lock hold (each its own step). A charge refused for a
        counter it would push past 2**53 - 1 gets its error in its place; the others stand."""
        out: list[ops.ChargeResult | InvalidInputError] = []
        with self._lock:
            if self._active is not None:
                self._settle()
            for r in op.records:
                now = _server_now() if r.now_us is None else r.now_us
                if self._seen(r.request_key, now) is None:
                    try:
                        self._check_room(r.plan, now, r.amounts)
                    except InvalidInputError as err:  # refused, nothing written
                        out.append(err)
                        continue
                out.append(self._charge_plan(r, now, False))
        return out

    def _commit(self, op: ops.Commit) -> ops.ChargeResult:
        with self._lock:
            if self._active is not None:
                self._settle()
            now = _server_now() if op.now_us is None else op.now_us
            tree = self._tree(op.plan)
            if self._seen(op.request_key, now) is not None:
                self._drop_hold(tree, op.hold_id)
                return self._charge_plan(op, now, False)
            self._check_room(op.plan, now, op.amounts)  # before anything changes (as lua/commit.lua)
            live = tree.leases.get(op.hold_id, now) > now  # a lapsed lease not yet reaped is not found
            found = self._drop_hold(tree, op.hold_id) and live
            return self._charge_plan(op, now, found)

    def _check_room(self, plan: Plan, now: int, amt: ops.Amounts) -> None:
        """Refuse a charge that would push a counter past what it holds exactly (2**53 - 1), before
        anything is written (as the scripts do); counters are read as a charge sees them (expired
        buckets aged out). Only looked at once a counter or the amount reaches 2**52: below that no
        charge can overflow (requests grow by one per call: never near)."""
        if not self._high and amt[0] < _HALF and amt[1] < _HALF:
            return
        for c in plan.counters:
            total = self._counter(c, now)
            for m in (0, 1, 2):
                check_after(total[m], amt[m], f"counter {c.hash_key!r} ({_METRIC_NAMES[m]})")

    def _append(self, key: str, maxlen: int, entry: str, now: int, amt: ops.Amounts) -> str:
        if not entry:
            return ""
        return self._stream(key, maxlen).add(entry, now, amt)

    def _stream(self, key: str, maxlen: int) -> _Stream:
        """The stream at ``key``, made (or its cap changed to ``maxlen``, keeping its entries) as needed."""
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(maxlen)
        elif stream.maxlen != maxlen:
            stream.resize(maxlen)
        return stream

    def _seen(self, request_key: str | None, now: int) -> tuple[int, int, int] | None:
        if request_key is None:
            return None
        entry = self._requests.get(request_key)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def _charge_plan(self, op: ops.Record | ops.Commit, now: int, found: bool) -> ops.ChargeResult:
        if now >= self._sweep_at:
            self._sweep(now)
        plan, amt, request_key = op.plan, op.amounts, op.request_key
        if request_key is not None:
            original = self._seen(request_key, now)
            if original is not None:
                return ops.ChargeResult(now, (), (), original, False)
        # _charge() for every counter, inlined: this loop is the whole embedded record()
        a0, a1, a2 = amt
        all_hashes, windows = self._hashes, self._windows
        hashes, rows = [], []
        for c in plan.counters:
            zkey = c.zset_key
            h: dict[Any, Any] | None
            if zkey is None and c.ttl_ms:
                h = self._hash(c.hash_key, now)  # it may have expired
                self._refresh(h, c, now)
            else:
                h = all_hashes.get(c.hash_key)  # windows and totals never expire here
                if h is None:
                    h = all_hashes[c.hash_key] = {}
            tot = h.get(c.prefix)
            if tot is None:
                tot = h[c.prefix] = [a0, a1, a2]
            else:
                if zkey is not None:
                    w = windows.get(zkey)
                    if w is not None and w.buckets:
                        lo = (now - c.window_us) // c.bucket_us
                        if w.oldest < lo:
                            _expire(w, tot, lo)
                tot[0] += a0
                tot[1] += a1
                tot[2] += a2
            if zkey is not None:
                w = windows.get(zkey)
                if w is None:
                    w = windows[zkey] = _Window()
                b = max(now // c.bucket_us, w.newest)  # a clock that stepped back charges the newest bucket
                w.newest = b
                bucket = w.buckets.get(b)
                if bucket is None:
                    if not w.buckets or b < w.oldest:
                        w.oldest = b
                    w.buckets[b] = [a0, a1, a2]
                else:
                    bucket[0] += a0
                    bucket[1] += a1
                    bucket[2] += a2
            if tot[0] >= _HALF or tot[1] >= _HALF:
                self._high = True  # from now on every charge looks before it writes (_check_room)
            hashes.append(h)
            rows.append(tot)
        fired = self._alerts(plan, rows, hashes, amt)
        if request_key is not None:
            self._requests[request_key] = (now + op.request_ttl_ms * 1000, (now, amt[0], amt[1]))
        totals = tuple(chain.from_iterable(rows))
        ledger_id = self._append(plan.keyspace.ledger, op.ledger_maxlen, op.ledger_entry, now, amt)
        return ops.ChargeResult(now, totals, fired, None, found, (), ledger_id)

    def _refuse(self, op: ops.Check | ops.Reserve, i: int, now: int) -> bool:
        """``lua/include/refusal.lua``: count the refusal by limit ``i`` in its scope's totals hash, fire
        its REFUSED alert if it is the first in the limit's window (True), append it to the ledger."""
        if not op.count:
            return False
        plan = op.plan
        lim = plan.limits[i]
        c = plan.counters[lim.counter]
        counts = self._hash(plan.keyspace.totals(lim.scope), now)
        counts["n", "", lim.limit_type] = counts.get(("n", "", lim.limit_type), 0) + 1
        h = self._hash(c.hash_key, now)
        field = ("f", c.prefix, lim.limit_type)
        fired = h.get(field)
        alerted = fired is None or (c.zset_key is not None and now - fired >= c.window_us)
        if alerted:
            h[field] = now
            if c.ttl_ms and c.zset_key is None and c.hash_key not in self._expires:  # made by this field
                self._expires[c.hash_key] = now + c.ttl_ms * 1000
        if op.ledger_entry:  # charging nothing: amounts 0 (the tokens asked for are in its JSON)
            entry = op.ledger_entry + ledger.refusal_end(lim.scope, lim.limit_type)
            self._append(plan.keyspace.ledger, op.ledger_maxlen, entry, now, (0, 0, 0))
        return alerted

    def _check(self, op: ops.Check) -> ops.AdmitResult:
        with self._lock:
            now = _server_now() if op.now_us is None else op.now_us
            totals, held = self._read(op.plan, now)
            refused, retry = self._admit(op.plan, totals, held, op.amounts, now)
            alerted = refused >= 0 and self._refuse(op, refused, now)
            return ops.AdmitResult(now, totals, held, refused, retry, alerted)

    def _reserve(self, op: ops.Reserve) -> ops.AdmitResult:
        plan, amt = op.plan, op.amounts
        with self._lock:
            now = _server_now() if op.now_us is None else op.now_us
            totals, held = self._read(plan, now)
            refused, retry = self._admit(plan, totals, held, amt, now)
            if refused < 0:
                tree = self._tree(plan)
                cids = tuple(c.id for c in plan.counters)
                for cid in cids:
                    row = tree.held.get(cid)
                    if row is None:
                        row = tree.held[cid] = [0, 0, 0]
                    row[0] += amt[0]
                    row[1] += amt[1]
                    row[2] += amt[2]
                tree.holds[op.hold_id] = (amt, cids)
                tree.leases[op.hold_id] = now + op.ttl_us
                return ops.AdmitResult(now, totals, held, refused, retry)
            return ops.AdmitResult(now, totals, held, refused, retry, self._refuse(op, refused, now))

    def _release(self, op: ops.Release) -> bool:
        """Free a hold; with a ledger entry (a hold left uncommitted), append it in the same step."""
        with self._lock:
            if self._active is not None:
                self._settle()  # its append may change the stream's cap: the fast plan takes it up again
            tree = self._trees.get(op.plan.keys[0])
            found = tree is not None and self._drop_hold(tree, op.hold_id)
            if op.ledger_entry:
                now = _server_now() if op.now_us is None else op.now_us
                self._append(op.plan.keyspace.ledger, op.ledger_maxlen, op.ledger_entry, now, op.amounts)
            return found

    def _extend(self, op: ops.Extend) -> bool:
        """``lua/extend.lua``: a live hold's lease now ends ``ttl_us`` from now; False if it lapsed."""
        with self._lock:
            now = _server_now() if op.now_us is None else op.now_us
            tree = self._trees.get(op.plan.keys[0])
            if tree is None or tree.leases.get(op.hold_id, now) <= now:
                return False
            tree.leases[op.hold_id] = now + op.ttl_us
            return True

    def _summary(self, op: ops.Summary) -> ops.SummaryResult:
        plan = op.plan
        with self._lock:
            now = _server_now() if op.now_us is None else op.now_us
            totals, held = self._read(plan, now)
            fields: dict[str, int] = {}
            for k, v in (self._lookup(plan.keys[plan.totals_key_index - 1], now) or {}).items():
                if isinstance(k, tuple):  # an alert state, a refusal count ("n"), a REFUSED alert's time
                    fields[f"{k[1]}{k[0]}:{k[2]}"] = v
                else:
                    for m, suffix in enumerate(_METRIC_SUFFIX):
                        fields[f"{k}{suffix}"] = v[m]
            refusals = tuple(
                (self._lookup(plan.keyspace.totals(lim.scope), now) or {}).get(("n", "", lim.limit_type), 0)
                for lim in plan.limits
            )
            return ops.SummaryResult(now, totals, held, fields, refusals)

    def _reset(self, op: ops.Reset) -> ops.ResetResult:
        """``lua/reset.lua``: zero the counters, report what the first one held, append the reset."""
        keys = op.keys
        with self._lock:
            if self._active is not None:
                self._settle()
            now = _server_now() if op.now_us is None else op.now_us
            h = self._lookup(keys[1], now) or {}  # nothing to zero creates nothing
            if op.what == "model":
                amt = tuple(h.pop(op.field_prefix, (0, 0, 0)))
                for k in [k for k in h if isinstance(k, tuple) and k[1] == op.field_prefix]:
                    del h[k]
                doomed = keys[2:]
            else:
                amt = tuple(h.get("", (0, 0, 0)))
                doomed = keys[1:]
            for key in doomed:
                self._hashes.pop(key, None)
                self._expires.pop(key, None)
                self._windows.pop(key, None)
            amounts = (int(amt[0]), int(amt[1]), int(amt[2]))
            return ops.ResetResult(amounts, self._append(keys[0], op.ledger_maxlen, op.ledger_entry, now, amounts))

    def _registry(self, key: str) -> dict[str, str]:
        return self._registries.setdefault(key, {})

    def _registry_put(self, op: ops.RegistryPut) -> list[str]:
        with self._lock:
            return registry.put(self._registry(op.key), op.triples)

    def _registry_chain(self, op: ops.RegistryChain) -> list[str]:
        with self._lock:
            return registry.chain(self._registries.get(op.key, {}), op.name)

    def _registry_remove(self, op: ops.RegistryRemove) -> list[str]:
        with self._lock:
            return registry.remove(self._registries.get(op.key, {}), op.name)

    def _registry_swap(self, op: ops.RegistrySwap) -> list[str]:
        with self._lock:
            return update.swap(self._registries.get(op.key, {}), op.name, op.old, op.new)

    def _registry_names(self, op: ops.RegistryNames) -> list[str]:
        with self._lock:
            return list(self._registries.get(op.key, {}))

    def _ledger_read(self, op: ops.LedgerRead) -> list[ops.LedgerRow]:
        with self._lock:
            stream = self._streams.get(op.key)
            return [] if stream is None else stream.read(op.start, op.count)

    def _announce(self, op: ops.Announce) -> None:
        """Alert streams are a Redis feature: nothing to register in-process."""

    def _prices_read(self, op: ops.PricesRead) -> tuple[int, str | None]:
        with self._lock:
            rev, book = self._prices.get(op.key, (0, None))
            return (rev, None) if rev == op.known else (rev, book)

    def _prices_push(self, op: ops.PricesPush) -> int:
        with self._lock:
            rev = self._prices.get(op.key, (0, None))[0] + 1
            self._prices[op.key] = (rev, op.book)
            return rev


class AsyncMemoryEngine:
    """The embedded engine for asyncio budgets: each operation is a short in-process step under a
    lock held for microseconds, so it runs inline on the event loop."""

    def __init__(self, engine: MemoryEngine | None = None) -> None:
        self.engine = engine or MemoryEngine()

    async def execute(self, op: ops.Operation[R]) -> R:
        return self.engine.execute(op)
