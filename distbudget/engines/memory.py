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
from typing import Any

from distbudget._core.plan import AdmitResult, ChargeResult, Counter, Plan, SummaryResult

_METRIC_SUFFIX = ("t", "c", "r")


class _Window:
    __slots__ = ("buckets", "newest", "oldest")

    def __init__(self) -> None:
        self.buckets: dict[int, list[int]] = {}
        self.oldest = 0
        self.newest = 0


class _Tree:
    __slots__ = ("held", "holds", "leases")

    def __init__(self) -> None:
        self.holds: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {}
        self.held: dict[str, list[int]] = {}
        self.leases: dict[str, int] = {}


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
        self._sweep_at = 0

    # ---- state helpers (mirroring lua/_common.lua) ---------------------------------------------

    def _hash(self, key: str, now: int) -> dict[Any, Any]:
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

    def _counter(self, c: Counter, now: int) -> tuple[dict[Any, Any], list[int]]:
        """The counter's running totals, aged (created empty if absent, as HMGET sees them)."""
        h = self._hash(c.hash_key, now)
        tot = h.get(c.prefix)
        if tot is None:
            return h, [0, 0, 0]
        if c.zset_key is not None:
            w = self._windows.get(c.zset_key)
            if w is not None and w.buckets:
                lo = (now - c.window_us) // c.bucket_us
                if w.oldest < lo:
                    for b in [b for b in w.buckets if b < lo]:
                        amounts = w.buckets.pop(b)
                        tot[0] -= amounts[0]
                        tot[1] -= amounts[1]
                        tot[2] -= amounts[2]
                    w.oldest = min(w.buckets, default=0)
        return h, tot

    def _charge(self, c: Counter, now: int, amt: tuple[int, int, int]) -> tuple[dict[Any, Any], list[int]]:
        h, tot = self._counter(c, now)
        if c.prefix not in h:
            h[c.prefix] = tot
        tot[0] += amt[0]
        tot[1] += amt[1]
        tot[2] += amt[2]
        if c.zset_key is not None:
            w = self._windows.get(c.zset_key)
            if w is None:
                w = self._windows[c.zset_key] = _Window()
            b = max(now // c.bucket_us, w.newest)  # a clock that stepped back charges the newest bucket
            w.newest = b
            bucket = w.buckets.get(b)
            if bucket is None:
                if not w.buckets or b < w.oldest:
                    w.oldest = b
                bucket = w.buckets[b] = [0, 0, 0]
            bucket[0] += amt[0]
            bucket[1] += amt[1]
            bucket[2] += amt[2]
        elif c.ttl_ms:
            self._expires[c.hash_key] = now + c.ttl_ms * 1000
        return h, tot

    @staticmethod
    def _alerts(
        plan: Plan, totals: list[list[int]], hashes: list[dict[Any, Any]], amt: tuple[int, int, int]
    ) -> tuple[tuple[int, int], ...]:
        out: list[tuple[int, int]] = []
        for i, lim in enumerate(plan.limits):
            after = totals[lim.counter][lim.metric]
            h = hashes[lim.counter]
            field = ("a", plan.counters[lim.counter].prefix, lim.limit_type)
            st = h.get(field, 0)
            if not st and after < (lim.warn_at if lim.warn_at >= 0 else lim.crit_at):
                continue  # nothing fired, nothing to re-arm (the scripts' fast path)
            before = after - amt[lim.metric]
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
        tree = self._tree(plan)
        self._reap(tree, now)
        totals: list[int] = []
        held: list[int] = []
        for c in plan.counters:
            totals.extend(self._counter(c, now)[1])
            held.extend(tree.held.get(c.id, (0, 0, 0)))
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

    def record(
        self,
        plan: Plan,
        now_us: int | None,
        amt: tuple[int, int, int],
        request_key: str | None = None,
        request_ttl_ms: int = 0,
    ) -> ChargeResult:
        with self._lock:
            now = _server_now() if now_us is None else now_us
            return self._charge_plan(plan, now, amt, request_key, request_ttl_ms, False)

    def commit(
        self,
        plan: Plan,
        now_us: int | None,
        amt: tuple[int, int, int],
        hold_id: str,
        request_key: str | None = None,
        request_ttl_ms: int = 0,
    ) -> ChargeResult:
        with self._lock:
            now = _server_now() if now_us is None else now_us
            tree = self._tree(plan)
            if self._seen(request_key, now) is not None:
                self._drop_hold(tree, hold_id)
            found = self._drop_hold(tree, hold_id)
            return self._charge_plan(plan, now, amt, request_key, request_ttl_ms, found)

    def _seen(self, request_key: str | None, now: int) -> tuple[int, int, int] | None:
        if request_key is None:
            return None
        entry = self._requests.get(request_key)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def _charge_plan(
        self, plan: Plan, now: int, amt: tuple[int, int, int], request_key: str | None, request_ttl_ms: int, found: bool
    ) -> ChargeResult:
        self._sweep(now)
        original = self._seen(request_key, now)
        if original is not None:
            return ChargeResult(now, (), (), original, False)
        hashes, rows = [], []
        for c in plan.counters:
            h, row = self._charge(c, now, amt)
            hashes.append(h)
            rows.append(row)
        fired = self._alerts(plan, rows, hashes, amt)
        if request_key is not None:
            self._requests[request_key] = (now + request_ttl_ms * 1000, (now, amt[0], amt[1]))
        totals = tuple(chain.from_iterable(rows))
        return ChargeResult(now, totals, fired, None, found)

    def check(self, plan: Plan, now_us: int | None, amt: tuple[int, int, int]) -> AdmitResult:
        with self._lock:
            now = _server_now() if now_us is None else now_us
            totals, held = self._read(plan, now)
            refused, retry = self._admit(plan, totals, held, amt, now)
            return AdmitResult(now, totals, held, refused, retry)

    def reserve(
        self, plan: Plan, now_us: int | None, amt: tuple[int, int, int], hold_id: str, ttl_us: int
    ) -> AdmitResult:
        with self._lock:
            now = _server_now() if now_us is None else now_us
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
                tree.holds[hold_id] = (amt, cids)
                tree.leases[hold_id] = now + ttl_us
            return AdmitResult(now, totals, held, refused, retry)

    def release(self, plan: Plan, hold_id: str) -> bool:
        with self._lock:
            return self._drop_hold(self._tree(plan), hold_id)

    def summary(self, plan: Plan, now_us: int | None) -> SummaryResult:
        with self._lock:
            now = _server_now() if now_us is None else now_us
            totals, held = self._read(plan, now)
            fields: dict[str, int] = {}
            for k, v in self._hash(plan.keys[plan.totals_key_index - 1], now).items():
                if isinstance(k, tuple):
                    fields[f"{k[1]}a:{k[2]}"] = v
                else:
                    for m, suffix in enumerate(_METRIC_SUFFIX):
                        fields[f"{k}{suffix}"] = v[m]
            return SummaryResult(now, totals, held, fields)

    def delete(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._hashes.pop(key, None)
                self._expires.pop(key, None)
                self._windows.pop(key, None)

    def announce(self, index_key: str, streams: dict[str, str]) -> None:
        """Alert streams are a Redis feature: nothing to register in-process."""

    def apply(self, name: str, args: tuple[Any, ...]) -> Any:
        """Run one operation by name (what the budget shells call)."""
        return getattr(self, name)(*args)


class AsyncMemoryEngine:
    """The embedded engine for asyncio budgets: each operation is a short in-process step under a
    lock held for microseconds, so it runs inline on the event loop."""

    def __init__(self, engine: MemoryEngine | None = None) -> None:
        self.engine = engine or MemoryEngine()

    async def apply(self, name: str, args: tuple[Any, ...]) -> Any:
        return self.engine.apply(name, args)
