"""``Budget`` and ``AsyncBudget``: thin shells over the flows of :class:`BudgetCore`.

A shell only drives a flow: it hands each engine call the flow yields to its engine (a plain call,
or an ``await``) and sends the answer back. Validation, plans, pricing, alerts and errors all live
in ``_budget_base.py``, once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from typing import Any

from distbudget import _degraded as D
from distbudget._budget_base import (
    BudgetCore,
    ExportTarget,
    Flow,
    Hold,
    LedgerSince,
    RecordCall,
    ReservationBase,
    T,
    write_jsonl,
)
from distbudget._core.ledger import LedgerEntry
from distbudget._core.scope import BudgetScope
from distbudget._core.types import UsageRecord
from distbudget._exceptions import BackendError
from distbudget.engines.memory import AsyncMemoryEngine, MemoryEngine
from distbudget.pricing import ModelRates


def make_engine(redis: Any, options: dict[str, Any] | None = None, allow_eviction: bool = False) -> Any:
    """``None`` -> embedded; a URL or a redis-py client -> Redis (``options``: for a URL's client)."""
    if redis is None:
        return MemoryEngine()
    from distbudget.engines.connect import parse
    from distbudget.engines.redis import RedisEngine, connect

    if isinstance(redis, str):  # redis://, rediss://, unix://, redis+cluster://, redis+sentinel://
        return RedisEngine(connect(redis, **(options or {})), parse(redis).wait, allow_eviction)
    if hasattr(redis, "register_script") and not inspect.iscoroutinefunction(getattr(redis, "execute_command", None)):
        return RedisEngine(redis, allow_eviction=allow_eviction)
    raise TypeError("redis must be None, a Redis URL or a (sync) redis-py client (Redis, RedisCluster)")


def make_async_engine(redis: Any, options: dict[str, Any] | None = None, allow_eviction: bool = False) -> Any:
    """``None`` -> embedded; a URL or a ``redis.asyncio`` client -> Redis (``options``: for a URL's client)."""
    if redis is None:
        return AsyncMemoryEngine()
    from distbudget.engines.connect import parse
    from distbudget.engines.redis import AsyncRedisEngine, connect_async

    if isinstance(redis, str):
        return AsyncRedisEngine(connect_async(redis, **(options or {})), parse(redis).wait, allow_eviction)
    if hasattr(redis, "register_script") and inspect.iscoroutinefunction(getattr(redis, "execute_command", None)):
        return AsyncRedisEngine(redis, allow_eviction=allow_eviction)
    raise TypeError("redis must be None, a Redis URL or a redis.asyncio client (Redis, RedisCluster)")


class Budget(BudgetCore):
    """A budget for one scope, enforced on the embedded engine or on Redis.

    ``redis``: ``None`` (embedded, in-process), a ``redis://`` / ``rediss://`` URL, or a redis-py
    client. ``clock``: a testing hook returning seconds; ``None`` uses the server's time.
    """

    def __init__(
        self,
        scope: BudgetScope,
        rates: Mapping[str, ModelRates] | None = None,
        *,
        redis: Any = None,
        _engine: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(scope, rates, **options)
        self.engine = (
            _engine if _engine is not None else make_engine(redis, D.connect_options(options), self.allow_eviction)
        )
        self._guard.bind(self.engine)

    def _call(self, name: str, args: tuple[Any, ...]) -> Any:
        """One engine call, under the failure policy when Redis is (or was just) unavailable."""
        guard = self._guard
        if guard.state.busy:
            local = guard.before(name, args)
            if local is not D.TRY:
                return local
        try:
            answer = self.engine.apply(name, args)
        except BackendError as err:
            return guard.failed(name, args, err)
        if guard.state.busy:
            guard.after(name, args)
        return answer

    def _drive(self, flow: Flow[T], settle: bool = False) -> T:
        """Run a flow. ``settle`` (a reservation's commit or release) skips the registry refresh:
        it carries its plan, and must settle even if the scope was removed meanwhile."""
        if self._guard.state.busy:  # degraded, or journaled charges to replay first
            replay = self._guard.recovery_flow()
            if replay is not None:
                D.run_sync(self.engine, replay)
        refresh = None if settle else self.refresh_call()
        if refresh is not None:
            chain = self._call(*refresh)
            if chain is not D.KEEP:  # KEEP: Redis unavailable, the policy keeps the cached config
                self.refreshed(chain)
        first = self.announcement()
        if first is not None and self._call(*first) is not D.KEEP:
            self._announced = True
        try:
            name, args = next(flow)
            while True:
                if name == "sleep":
                    (self.sleep or time.sleep)(*args)
                    answer = None
                else:
                    answer = self._call(name, args)
                name, args = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def flush_journal(self) -> int:
        """Replay now the charges journaled while Redis was unavailable (shared by every budget on
        this engine), oldest first, each exactly once; returns how many were settled. Raises
        ``BackendError`` if Redis is still unavailable (they stay journaled)."""
        return D.flush_sync(self.engine)

    def check(self, model: str, input_tokens: int, output_tokens: int = 0, session_id: str | None = None) -> bool:
        """Would this call fit now? Records nothing. Advisory under concurrency: use ``reserve``."""
        return self._drive(self.check_flow(model, input_tokens, output_tokens, session_id))

    def record(
        self,
        session_id: str | None,
        model: str,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> UsageRecord:
        """Charge actual usage (always persisted), then raise if ``hard_stop`` and over a limit."""
        return self._drive(
            self.record_flow(
                session_id,
                model,
                input_tokens,
                output_tokens,
                metadata,
                request_id,
                cached_input_tokens,
                cache_write_tokens,
                reasoning_tokens,
            )
        )

    def reserve(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> Reservation:
        """Hold the worst case against every limit atomically, or raise having held nothing."""
        hold = self._drive(self.reserve_flow(model, input_tokens, max_output_tokens, session_id, request_id, ttl))
        return Reservation(self, hold)

    def acquire(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        *,
        timeout: float = 60.0,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> Reservation:
        """``reserve``, waiting on rolling windows (sleeping ``retry_after``) for up to ``timeout``
        seconds. Raises at once when no window will free room by itself (the budget is spent)."""
        hold = self._drive(
            self.acquire_flow(model, input_tokens, max_output_tokens, timeout, session_id, request_id, ttl)
        )
        return Reservation(self, hold)

    def summary(self, session_id: str | None = None) -> dict[str, Any]:
        """Usage of the current (or given) session, the rolling day, totals, per model, per limit."""
        return self._drive(self.summary_flow(session_id))

    def reset_session(self, session_id: str | None = None) -> None:
        """Clear this scope's counters of the current (or given) session (atomic; in the ledger)."""
        self._drive(self.reset_session_flow(session_id))

    def reset_model(self, model: str) -> None:
        """Clear this scope's counters of one model (atomic; in the ledger)."""
        self._drive(self.reset_model_flow(model))

    def reset(self, session_id: str | None = None) -> None:
        """Clear the whole scope: totals, every rolling window and the current (or given) session
        (atomic; in the ledger). Ancestors keep their usage."""
        self._drive(self.reset_flow(session_id))

    def ledger(self, since: LedgerSince = None, limit: int | None = None) -> list[LedgerEntry]:
        """The shared ledger of this scope (charges counting against it, its resets), oldest first.
        ``since``: a ledger id (exclusive), or seconds since the epoch (server time)."""
        return self._drive(self.ledger_flow(since, limit))

    def export_ledger(self, target: ExportTarget, since: LedgerSince = None) -> int:
        """Write the ledger as JSON lines to a path or a text file; returns the number of lines."""
        return write_jsonl(self.ledger(since), target)

    def record_many(self, calls: Iterable[RecordCall]) -> list[UsageRecord]:
        """``record()`` for many calls at once, for bulk recorders: each call a tuple of record()'s
        positional arguments or a dict of its arguments. On Redis the charges go in one pipelined
        round trip (each still its own atomic script); every call is validated before anything is
        charged, every charge is persisted, and with ``hard_stop`` the first charge left over a
        limit raises afterwards (``err.record``; ``records`` has them all)."""
        return self._drive(self.record_many_flow(calls))


class Reservation(ReservationBase):
    """A hold from :meth:`Budget.reserve`. ``commit`` the actual usage or ``release``; as a context
    manager, leaving the block without a commit (an exception, a return) releases it."""

    budget: Budget

    def commit(
        self,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None = None,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> UsageRecord:
        """Free the hold and charge the actual usage in one step (charged even above the hold)."""
        try:
            return self.budget._drive(
                self.budget.commit_flow(
                    self.hold,
                    input_tokens,
                    output_tokens,
                    metadata,
                    cached_input_tokens,
                    cache_write_tokens,
                    reasoning_tokens,
                ),
                settle=True,
            )
        except BaseException as exc:
            self.commit_failed(exc)
            raise

    def release(self) -> bool:
        """Free the hold; True if it was still live."""
        return self.budget._drive(self.budget.release_flow(self.hold), settle=True)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AsyncBudget(BudgetCore):
    """The asyncio twin of :class:`Budget`: the same methods as coroutines (``estimate`` stays
    sync: it does no I/O). ``redis``: ``None``, a URL, or a ``redis.asyncio`` client."""

    def __init__(
        self,
        scope: BudgetScope,
        rates: Mapping[str, ModelRates] | None = None,
        *,
        redis: Any = None,
        _engine: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(scope, rates, **options)
        self.engine = (
            _engine
            if _engine is not None
            else make_async_engine(redis, D.connect_options(options), self.allow_eviction)
        )
        self._guard.bind(self.engine)

    async def _call(self, name: str, args: tuple[Any, ...]) -> Any:
        guard = self._guard
        if guard.state.busy:
            local = guard.before(name, args)
            if local is not D.TRY:
                return local
        try:
            answer = await self.engine.apply(name, args)
        except BackendError as err:
            return guard.failed(name, args, err)
        if guard.state.busy:
            guard.after(name, args)
        return answer

    async def _drive(self, flow: Flow[T], settle: bool = False) -> T:
        if self._guard.state.busy:  # degraded, or journaled charges to replay first
            replay = self._guard.recovery_flow()
            if replay is not None:
                await D.run_async(self.engine, replay)
        refresh = None if settle else self.refresh_call()
        if refresh is not None:
            chain = await self._call(*refresh)
            if chain is not D.KEEP:
                self.refreshed(chain)
        first = self.announcement()
        if first is not None and await self._call(*first) is not D.KEEP:
            self._announced = True
        try:
            name, args = next(flow)
            while True:
                if name == "sleep":
                    slept = (self.sleep or asyncio.sleep)(*args)
                    if inspect.isawaitable(slept):
                        await slept
                    answer = None
                else:
                    answer = await self._call(name, args)
                name, args = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def flush_journal(self) -> int:
        """Replay now the charges journaled while Redis was unavailable (see ``Budget.flush_journal``)."""
        return await D.flush_async(self.engine)

    async def check(self, model: str, input_tokens: int, output_tokens: int = 0, session_id: str | None = None) -> bool:
        return await self._drive(self.check_flow(model, input_tokens, output_tokens, session_id))

    async def record(
        self,
        session_id: str | None,
        model: str,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> UsageRecord:
        return await self._drive(
            self.record_flow(
                session_id,
                model,
                input_tokens,
                output_tokens,
                metadata,
                request_id,
                cached_input_tokens,
                cache_write_tokens,
                reasoning_tokens,
            )
        )

    def reserve(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> PendingReservation:
        """``r = await budget.reserve(...)`` or ``async with budget.reserve(...) as r:``."""

        async def start() -> tuple[AsyncBudget, Flow[Hold]]:
            return self, self.reserve_flow(model, input_tokens, max_output_tokens, session_id, request_id, ttl)

        return PendingReservation(start)

    def acquire(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        *,
        timeout: float = 60.0,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> PendingReservation:
        """``reserve``, waiting on rolling windows; awaitable and an async context manager."""

        async def start() -> tuple[AsyncBudget, Flow[Hold]]:
            flow = self.acquire_flow(model, input_tokens, max_output_tokens, timeout, session_id, request_id, ttl)
            return self, flow

        return PendingReservation(start)

    async def summary(self, session_id: str | None = None) -> dict[str, Any]:
        return await self._drive(self.summary_flow(session_id))

    async def reset_session(self, session_id: str | None = None) -> None:
        await self._drive(self.reset_session_flow(session_id))

    async def reset_model(self, model: str) -> None:
        await self._drive(self.reset_model_flow(model))

    async def reset(self, session_id: str | None = None) -> None:
        await self._drive(self.reset_flow(session_id))

    async def ledger(self, since: LedgerSince = None, limit: int | None = None) -> list[LedgerEntry]:
        return await self._drive(self.ledger_flow(since, limit))

    async def export_ledger(self, target: ExportTarget, since: LedgerSince = None) -> int:
        return write_jsonl(await self.ledger(since), target)

    async def record_many(self, calls: Iterable[RecordCall]) -> list[UsageRecord]:
        """See :meth:`Budget.record_many`."""
        return await self._drive(self.record_many_flow(calls))


class AsyncReservation(ReservationBase):
    """A hold from :meth:`AsyncBudget.reserve`; ``await r.commit(...)`` or ``await r.release()``."""

    budget: AsyncBudget

    async def commit(
        self,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None = None,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> UsageRecord:
        try:
            return await self.budget._drive(
                self.budget.commit_flow(
                    self.hold,
                    input_tokens,
                    output_tokens,
                    metadata,
                    cached_input_tokens,
                    cache_write_tokens,
                    reasoning_tokens,
                ),
                settle=True,
            )
        except BaseException as exc:
            self.commit_failed(exc)
            raise

    async def release(self) -> bool:
        """Free the hold; runs to completion even if the calling task is cancelled meanwhile."""
        if not self.hold.open:
            return False
        task = asyncio.ensure_future(self.budget._drive(self.budget.release_flow(self.hold), settle=True))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])  # finish freeing the hold, then let the cancellation through
            raise

    async def __aenter__(self) -> AsyncReservation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class PendingReservation:
    """What ``AsyncBudget.reserve`` returns: await it for an :class:`AsyncReservation`, or use it
    as ``async with``, which releases the hold on leaving the block uncommitted (even when the task
    is cancelled inside it)."""

    def __init__(self, start: Callable[[], Awaitable[tuple[AsyncBudget, Flow[Hold]]]]) -> None:
        self._start: Callable[[], Awaitable[tuple[AsyncBudget, Flow[Hold]]]] | None = start
        self._reservation: AsyncReservation | None = None

    async def _get(self) -> AsyncReservation:
        if self._reservation is None:
            if self._start is None:
                raise RuntimeError("this reservation was already awaited")
            start, self._start = self._start, None
            budget, flow = await start()
            self._reservation = AsyncReservation(budget, await budget._drive(flow))
        return self._reservation

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncReservation:
        return await self._get()

    async def __aexit__(self, *exc: object) -> None:
        if self._reservation is not None:
            await self._reservation.release()
