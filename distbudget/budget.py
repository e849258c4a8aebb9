"""``Budget`` and ``AsyncBudget``: thin shells over the flows of :class:`BudgetCore`.

A shell only drives a flow: it hands each engine call the flow yields to its engine (a plain call,
or an ``await``) and sends the answer back. Validation, plans, pricing, alerts and errors all live
in ``_budget_base.py``, once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Generator, Mapping
from typing import Any

from distbudget._budget_base import BudgetCore, Flow, Hold, ReservationBase, T
from distbudget._core.scope import BudgetScope
from distbudget._core.types import UsageRecord
from distbudget.engines.memory import AsyncMemoryEngine, MemoryEngine
from distbudget.pricing import ModelRates


def make_engine(redis: Any) -> Any:
    """``None`` -> embedded; a URL or a redis-py client -> Redis."""
    if redis is None:
        return MemoryEngine()
    from distbudget.engines.redis import RedisEngine, connect

    if isinstance(redis, str):
        return RedisEngine(connect(redis))
    if hasattr(redis, "register_script") and not inspect.iscoroutinefunction(getattr(redis, "execute_command", None)):
        return RedisEngine(redis)
    raise TypeError("redis must be None, a redis:// URL or a (sync) redis-py client")


def make_async_engine(redis: Any) -> Any:
    """``None`` -> embedded; a URL or a ``redis.asyncio`` client -> Redis."""
    if redis is None:
        return AsyncMemoryEngine()
    from distbudget.engines.redis import AsyncRedisEngine, connect_async

    if isinstance(redis, str):
        return AsyncRedisEngine(connect_async(redis))
    if hasattr(redis, "register_script") and inspect.iscoroutinefunction(getattr(redis, "execute_command", None)):
        return AsyncRedisEngine(redis)
    raise TypeError("redis must be None, a redis:// URL or a redis.asyncio client")


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
        self.engine = _engine if _engine is not None else make_engine(redis)

    def _drive(self, flow: Flow[T]) -> T:
        first = self.announcement()
        if first is not None:
            self.engine.apply(*first)
            self._announced = True
        try:
            name, args = next(flow)
            while True:
                if name == "sleep":
                    (self.sleep or time.sleep)(*args)
                    answer = None
                else:
                    answer = self.engine.apply(name, args)
                name, args = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

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
        """Clear this scope's counters of the current (or given) session."""
        self._drive(self.reset_session_flow(session_id))


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
        return self.budget._drive(
            self.budget.commit_flow(
                self.hold,
                input_tokens,
                output_tokens,
                metadata,
                cached_input_tokens,
                cache_write_tokens,
                reasoning_tokens,
            )
        )

    def release(self) -> bool:
        """Free the hold; True if it was still live."""
        return self.budget._drive(self.budget.release_flow(self.hold))

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
        self.engine = _engine if _engine is not None else make_async_engine(redis)

    async def _drive(self, flow: Flow[T]) -> T:
        first = self.announcement()
        if first is not None:
            await self.engine.apply(*first)
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
                    answer = await self.engine.apply(name, args)
                name, args = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

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
        return PendingReservation(
            self, self.reserve_flow(model, input_tokens, max_output_tokens, session_id, request_id, ttl)
        )

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
        return PendingReservation(
            self, self.acquire_flow(model, input_tokens, max_output_tokens, timeout, session_id, request_id, ttl)
        )

    async def summary(self, session_id: str | None = None) -> dict[str, Any]:
        return await self._drive(self.summary_flow(session_id))

    async def reset_session(self, session_id: str | None = None) -> None:
        await self._drive(self.reset_session_flow(session_id))


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
        return await self.budget._drive(
            self.budget.commit_flow(
                self.hold,
                input_tokens,
                output_tokens,
                metadata,
                cached_input_tokens,
                cache_write_tokens,
                reasoning_tokens,
            )
        )

    async def release(self) -> bool:
        """Free the hold; runs to completion even if the calling task is cancelled meanwhile."""
        if not self.hold.open:
            return False
        task = asyncio.ensure_future(self.budget._drive(self.budget.release_flow(self.hold)))
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

    def __init__(self, budget: AsyncBudget, flow: Flow[Hold]) -> None:
        self._budget = budget
        self._flow: Flow[Hold] | None = flow
        self._reservation: AsyncReservation | None = None

    async def _get(self) -> AsyncReservation:
        if self._reservation is None:
            if self._flow is None:
                raise RuntimeError("this reservation was already awaited")
            flow, self._flow = self._flow, None
            self._reservation = AsyncReservation(self._budget, await self._budget._drive(flow))
        return self._reservation

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncReservation:
        return await self._get()

    async def __aexit__(self, *exc: object) -> None:
        if self._reservation is not None:
            await self._reservation.release()
