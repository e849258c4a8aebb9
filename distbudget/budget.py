"""``Budget`` and ``AsyncBudget``: thin shells over one accounting core.

A budget holds its accounting core (``_accounting.py``: validation, plans, pricing, alerts, errors)
and a driver (``_driver.py``) bound to its engine and failure policy. Each operation is defined once,
as the core's method that prepares its job; ``Budget`` runs the job with plain calls, ``AsyncBudget``
with ``await``: :func:`_sync` and :func:`_async` make the two methods from that one definition, with
its signature and docstring. What is not I/O (``estimate``, ``records``, ``on_alert`` ...) is
:class:`_BudgetBase`'s, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from types import CoroutineType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from distbudget._accounting import Accounting, ExportTarget, Hold, LedgerSince, Settings, write_jsonl
from distbudget._core import ledger as L
from distbudget._core.errors import BackendError, BudgetExceededError, BudgetWarning
from distbudget._core.money import nano_to_usd
from distbudget._core.ops import Job, Step
from distbudget._core.plan import ALERT_STREAM_MAXLEN
from distbudget._core.prices import ModelRates, PriceBook
from distbudget._core.scope import BudgetScope
from distbudget._core.types import BudgetAlert, UsageRecord
from distbudget._driver import AsyncDriver, Driver
from distbudget._policy.guard import Kept, connect_options
from distbudget._policy.journal import DEFAULT_JOURNAL_SIZE, flush
from distbudget.engines.base import AsyncEngine, Engine
from distbudget.engines.memory import AsyncMemoryEngine, MemoryEngine

P = ParamSpec("P")
T = TypeVar("T")
E = TypeVar("E", Engine, AsyncEngine)
B = TypeVar("B", bound="Budget | AsyncBudget")


def _allow_eviction(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"allow_eviction must be True or False, got {value!r}")
    return value


def make_engine(
    redis: object, options: dict[str, Any], batch_window_us: int | None = None, *, allow_eviction: bool = False
) -> Engine:
    """``None`` -> embedded; a URL or a redis-py client -> Redis (``options``: for a URL's client;
    ``batch_window_us``: coalesce concurrent calls, see ``engines/redis.py``; ``allow_eviction``: accept
    a server that evicts keys, unsafe: see ``engines/functions.py``)."""
    allow = _allow_eviction(allow_eviction)
    if redis is None:
        return MemoryEngine()
    from distbudget.engines.connect import parse
    from distbudget.engines.redis import RedisEngine, connect

    if isinstance(redis, str):  # redis://, rediss://, unix://, redis+cluster://, redis+sentinel://
        return RedisEngine(
            connect(redis, **options), wait=parse(redis).wait, batch_window_us=batch_window_us, allow_eviction=allow
        )
    if hasattr(redis, "register_script") and not inspect.iscoroutinefunction(getattr(redis, "execute_command", None)):
        return RedisEngine(redis, batch_window_us=batch_window_us, allow_eviction=allow)
    raise TypeError("redis must be None, a Redis URL or a (sync) redis-py client (Redis, RedisCluster)")


def make_async_engine(
    redis: object, options: dict[str, Any], batch_window_us: int | None = None, *, allow_eviction: bool = False
) -> AsyncEngine:
    """``None`` -> embedded; a URL or a ``redis.asyncio`` client -> Redis (see :func:`make_engine`)."""
    allow = _allow_eviction(allow_eviction)
    if redis is None:
        return AsyncMemoryEngine()
    from distbudget.engines.connect import parse
    from distbudget.engines.redis import AsyncRedisEngine, connect_async

    if isinstance(redis, str):
        return AsyncRedisEngine(
            connect_async(redis, **options),
            wait=parse(redis).wait,
            batch_window_us=batch_window_us,
            allow_eviction=allow,
        )
    if hasattr(redis, "register_script") and inspect.iscoroutinefunction(getattr(redis, "execute_command", None)):
        return AsyncRedisEngine(redis, batch_window_us=batch_window_us, allow_eviction=allow)
    raise TypeError("redis must be None, a Redis URL or a redis.asyncio client (Redis, RedisCluster)")


class _BudgetBase(Generic[E]):
    """What both budgets are without I/O: construction, and the calls that never reach the engine."""

    def __init__(
        self,
        scope: BudgetScope,
        rates: Mapping[str, ModelRates] | None = None,
        *,
        redis: object = None,
        session_id: str | None = None,
        prefix: str = "distbudget",
        clock: Callable[[], float] | None = None,
        default_rates: ModelRates | None = None,
        session_ttl: float = 7 * 86400,
        hold_ttl: float = 600,
        request_ttl: float | None = None,
        sleep: Callable[[float], Any] | None = None,
        ledger_maxlen: int = L.DEFAULT_MAXLEN,
        alert_stream_maxlen: int = ALERT_STREAM_MAXLEN,
        on_backend_error: str = "raise",
        fail_open_max_cost_usd: float | None = None,
        fail_open_max_tokens: int | None = None,
        journal_size: int = DEFAULT_JOURNAL_SIZE,
        on_uncommitted: str = "release",
        strict_models: bool = False,
        batch_window_us: int | None = None,
        allow_eviction: bool = False,
        prices: PriceBook | None = None,
        _engine: E | None = None,
        _registry: tuple[str, float, tuple[str, ...]] | None = None,
        _settings: Settings | None = None,  # a manager's: in place of the keywords above
    ) -> None:
        settings = _settings or Settings.pick(locals())
        self._core = core = Accounting(scope, rates, settings, _registry)
        self.name: str = core.name  #: the scope's name
        #: The engine: ``MemoryEngine`` (embedded) or ``RedisEngine`` (``under_replicated``: charges
        #: whose ``WAIT`` returned before enough replicas acknowledged them).
        self.engine: E = (
            _engine
            if _engine is not None
            else self._make_engine(
                redis, connect_options(core.mode), batch_window_us, allow_eviction=settings.allow_eviction
            )
        )
        self._guard = core.attach(self.engine)
        self._fast_path()
        self._driver = self._driver_class(self.engine, self._guard, settings.sleep)
        self._plain = self._driver_class(self.engine)  # the journal's replay: no policy around it

    def _fast_path(self) -> None:
        """Take the engine's fast paths, if any (``Budget``: ``record()`` on the embedded engine)."""

    #: ``make_engine`` or ``make_async_engine``, and the driver that runs this flavour's operations
    _make_engine: Callable[..., E]
    _driver_class: Callable[..., Any]

    @property
    def scope(self) -> BudgetScope:
        """The scope: its name, limits and parent (as the latest registry refresh or update left it)."""
        return self._core.scope

    @property
    def session_id(self) -> str:
        """The current session: the constructor's, else the latest record/reserve's."""
        return self._core.session_id

    @property
    def records(self) -> list[UsageRecord]:
        """Records charged through this object (the latest 10,000)."""
        return self._core.records

    @property
    def alerts(self) -> list[BudgetAlert]:
        """Alerts fired by this object's calls (the latest 10,000)."""
        return self._core.alerts

    @property
    def backend_status(self) -> dict[str, Any]:
        """The failure policy and the backend's health as this process sees it (no I/O): degraded
        or not, charges journaled and replayed, errors (``summary()["backend"]`` shows the same)."""
        return self._core.backend_status()

    def estimate(self, model: str, input_tokens: int, output_tokens: int = 0) -> float:
        """Cost in USD of a call; records nothing."""
        return self._core.estimate(model, input_tokens, output_tokens)

    def on_alert(self, callback: Callable[[BudgetAlert], Any]) -> None:
        """Call ``callback(alert)`` for each threshold crossing this object's calls cause."""
        self._core.on_alert(callback)


def _sync(prepare: Callable[Concatenate[Accounting, P], Job[T]]) -> Callable[Concatenate[Budget, P], T]:
    """A ``Budget`` method: ``prepare``'s job, run (with its signature and docstring)."""

    @functools.wraps(prepare)
    def method(self: Budget, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._core.preamble_due or self._guard.state.busy:
            self._before()
        return self._driver.run(prepare(self._core, *args, **kwargs))

    return method


def _async(
    prepare: Callable[Concatenate[Accounting, P], Job[T]],
) -> Callable[Concatenate[AsyncBudget, P], Coroutine[Any, Any, T]]:
    """An ``AsyncBudget`` method: ``prepare``'s job, awaited."""

    @functools.wraps(prepare)
    async def method(self: AsyncBudget, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._core.preamble_due or self._guard.state.busy:
            await self._before()
        return await self._driver.run(prepare(self._core, *args, **kwargs))

    return method


def _reserving(
    prepare: Callable[Concatenate[Accounting, P], Job[Hold]],
) -> Callable[Concatenate[Budget, P], Reservation]:
    """``Budget.reserve`` / ``acquire``: the hold, as a :class:`Reservation`."""
    run = _sync(prepare)

    @functools.wraps(prepare)
    def method(self: Budget, /, *args: P.args, **kwargs: P.kwargs) -> Reservation:
        return Reservation(self, run(self, *args, **kwargs))

    return method


def _pending(
    prepare: Callable[Concatenate[Accounting, P], Job[Hold]], waits: bool = False
) -> Callable[Concatenate[AsyncBudget, P], PendingReservation]:
    """``AsyncBudget.reserve`` / ``acquire``: awaitable, or ``async with``. ``waits``: it may sleep
    on rolling windows (acquire), so a cancellation interrupts it."""
    run = _async(prepare)

    @functools.wraps(prepare)
    def method(self: AsyncBudget, /, *args: P.args, **kwargs: P.kwargs) -> PendingReservation:
        async def start() -> AsyncReservation:
            return await _holding(self, run(self, *args, **kwargs), waits)

        return PendingReservation(start)

    return method


async def _holding(budget: AsyncBudget, making: Coroutine[Any, Any, Hold], waits: bool) -> AsyncReservation:
    """Make the hold in its own task and let a cancellation of the caller through as
    ``CancelledError``, after freeing any hold it made. Before Python 3.12, redis-py's
    ``asyncio.wait_for`` around a send swallows a cancellation that arrives as the send ends, and a
    reserve cancelled mid-reply has made a hold its caller never hears of: both end here."""
    task = asyncio.ensure_future(making)
    try:
        return AsyncReservation(budget, await asyncio.shield(task))
    except asyncio.CancelledError:
        if waits:
            task.cancel()  # an acquire sleeping on a window stops waiting
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is None:
            await AsyncReservation(budget, task.result()).release()
        raise


class Budget(_BudgetBase[Engine]):
    """A budget for one scope, enforced on the embedded engine or on Redis.

    ``redis``: ``None`` (embedded, in-process), a ``redis://`` / ``rediss://`` URL, or a redis-py
    client. ``clock``: a testing hook returning seconds; ``None`` uses the server's time.
    ``batch_window_us``: on Redis, coalesce the concurrent calls of this budget's threads (or, on an
    ``AsyncBudget``, tasks): each batch waits that many µs for company (``0``: none; calls queue
    behind the batch in flight anyway), then goes out as one pipelined round trip, each call still its
    own atomic script with its own answer. ``None`` (the default): every call its own round trip.
    A plain standalone or Sentinel client without ``wait`` only; elsewhere calls go alone.
    """

    _make_engine = staticmethod(make_engine)
    _driver_class = Driver
    _driver: Driver
    _plain: Driver

    def _fast_path(self) -> None:
        """``record()`` with the embedded engine's fast path (``Accounting.fast_recording``) or the
        Redis engine's (``Accounting.fast_charging``), unless a subclass overrides ``record``. On
        Redis ``record_many`` keeps its one pipelined round trip."""
        if type(self).record is Budget.record:
            fast = self._core.fast_recording(self.engine, self.record)
            if fast is not None:
                self.record = fast  # type: ignore[method-assign]  # the same signature and docstring
                if type(self).record_many is Budget.record_many:
                    self.record_many = self._core.fast_recording_many(fast, self.record_many)  # type: ignore[method-assign]
                return
            fast = self._core.fast_charging(self.engine, self.record)
            if fast is not None:
                self.record = fast  # type: ignore[method-assign]

    def _before(self, settle: bool = False) -> None:
        """Before an operation: the journal's replay when due, then the registry refresh when due
        (not to ``settle`` a reservation: it carries its plan) and the alert stream's announcement."""
        if self._guard.state.busy:  # degraded, or journaled charges to replay first
            due = self._guard.recovery()
            if due is not None:
                self._plain.run(due)
        for step in self._core.preamble(settle):
            self._keep(step)

    def _keep(self, step: Step[Any, None]) -> None:
        """A registry refresh or the announcement: an outage skips it (the cached config is kept;
        the operation itself then meets the failure policy)."""
        with contextlib.suppress(Kept):
            self._driver.run(step)

    def flush_journal(self) -> int:
        """Replay now the charges journaled while Redis was unavailable (shared by every budget on
        this engine), oldest first, each exactly once; returns how many were settled. Raises
        ``BackendError`` if Redis is still unavailable (they stay journaled)."""
        return self._plain.run(flush(self._guard.state))

    check = _sync(Accounting.check)
    record = _sync(Accounting.record)
    record_many = _sync(Accounting.record_many)

    reserve = _reserving(Accounting.reserve)
    acquire = _reserving(Accounting.acquire)
    summary = _sync(Accounting.summary)
    reset_session = _sync(Accounting.reset_session)
    reset_model = _sync(Accounting.reset_model)
    reset = _sync(Accounting.reset)
    ledger = _sync(Accounting.ledger)
    report = _sync(Accounting.report)

    def export_ledger(self, target: ExportTarget, since: LedgerSince = None) -> int:
        """Write the ledger as JSON lines to a path or a text file; returns the number of lines."""
        return write_jsonl(self.ledger(since), target)


def _answering(fast: Callable[..., T | Coroutine[Any, Any, T]]) -> Callable[..., Coroutine[Any, Any, T]]:
    """An ``AsyncBudget`` method over an embedded fast path: what the fast path made, or the usual
    call's coroutine (a call it declined) awaited."""

    @functools.wraps(fast)
    async def method(*args: Any, **kwargs: Any) -> T:
        answer = fast(*args, **kwargs)
        if isinstance(answer, CoroutineType):
            return await answer  # type: ignore[no-any-return]
        return answer  # type: ignore[return-value]  # not a coroutine: a T

    return method


class AsyncBudget(_BudgetBase[AsyncEngine]):
    """The asyncio twin of :class:`Budget`: the same methods as coroutines (``estimate`` stays
    sync: it does no I/O; ``reserve`` and ``acquire`` return a :class:`PendingReservation`, to
    await or to use with ``async with``). ``redis``: ``None``, a URL, or a ``redis.asyncio`` client."""

    _make_engine = staticmethod(make_async_engine)
    _driver_class = AsyncDriver
    _driver: AsyncDriver
    _plain: AsyncDriver

    def _fast_path(self) -> None:
        """``record()`` and ``record_many()`` with the embedded engine's fast path (see
        :meth:`Budget._fast_path`): that engine answers at once, so what the fast path takes is
        returned without awaiting anything, and what it declines is awaited the usual way; or
        ``record()`` with the Redis engine's (``Accounting.fast_charging_async``). Unless a subclass
        overrides ``record``."""
        if type(self).record is not AsyncBudget.record:
            return
        engine = self.engine
        if isinstance(engine, AsyncMemoryEngine):
            core, memory = self._core, engine.engine
            fast = core.fast_recording(memory, self.record)
            if fast is not None:
                self.record = _answering(fast)  # type: ignore[method-assign]  # the same signature and docstring
                if type(self).record_many is AsyncBudget.record_many:
                    # a call of the batch the fast path declines: record()'s job, run at once as the
                    # embedded engine answers (the batch's preamble was run or not due, as record_many's)
                    plain = Driver(memory, self._guard)
                    one = core.fast_recording(memory, lambda *args, **kw: plain.run(core.record(*args, **kw)))
                    assert one is not None
                    self.record_many = _answering(core.fast_recording_many(one, self.record_many))  # type: ignore[method-assign]
            return
        charging = self._core.fast_charging_async(engine, self.record)
        if charging is not None:
            self.record = charging  # type: ignore[method-assign,assignment]  # the same signature and docstring

    async def _before(self, settle: bool = False) -> None:
        """See :meth:`Budget._before`."""
        if self._guard.state.busy:
            due = self._guard.recovery()
            if due is not None:
                await self._plain.run(due)
        for step in self._core.preamble(settle):
            await self._keep(step)

    async def _keep(self, step: Step[Any, None]) -> None:
        with contextlib.suppress(Kept):
            await self._driver.run(step)

    async def flush_journal(self) -> int:
        """Replay now the charges journaled while Redis was unavailable (see ``Budget.flush_journal``)."""
        return await self._plain.run(flush(self._guard.state))

    check = _async(Accounting.check)
    record = _async(Accounting.record)
    record_many = _async(Accounting.record_many)
    reserve = _pending(Accounting.reserve)
    acquire = _pending(Accounting.acquire, waits=True)
    summary = _async(Accounting.summary)
    reset_session = _async(Accounting.reset_session)
    reset_model = _async(Accounting.reset_model)
    reset = _async(Accounting.reset)
    ledger = _async(Accounting.ledger)
    report = _async(Accounting.report)

    async def export_ledger(self, target: ExportTarget, since: LedgerSince = None) -> int:
        """Write the ledger as JSON lines to a path or a text file; returns the number of lines."""
        return write_jsonl(await self.ledger(since), target)


class _ReservationBase(Generic[B]):
    """What sync and async reservations share: the hold and its read-only views (fixed at the hold:
    ``admitted``, ``model``, ``session_id``, ``request_id``, ``hold_id``, what it holds)."""

    __slots__ = (
        "_budget",
        "_hold",
        "admitted",
        "held_cost_usd",
        "held_nano_usd",
        "held_tokens",
        "hold_id",
        "model",
        "request_id",
        "session_id",
    )

    def __init__(self, budget: B, hold: Hold) -> None:
        self._budget: B = budget
        self._hold = hold
        self.admitted: bool = hold.admitted
        self.model: str = hold.model
        self.session_id: str = hold.plan.session_id
        self.request_id: str | None = hold.request_id
        self.hold_id: str = hold.hold_id
        self.held_tokens: int = hold.held[0]
        self.held_nano_usd: int = hold.held[1]
        self.held_cost_usd: float = nano_to_usd(hold.held[1])

    @property
    def record(self) -> UsageRecord | None:
        """The charge, once committed."""
        return self._hold.record

    def _commit_failed(self, exc: BaseException) -> None:
        """A commit raised. It may be committed again unless that could charge twice: refused while
        its charge is journaled (replayed later) or may have run (a cancellation, a lost reply)
        without a request id to deduplicate it. An error Redis answered ran nothing."""
        if self._hold.record is not None:
            return
        journaled = isinstance(exc, BackendError) and exc.journaled
        if self._hold.request_key is not None or (isinstance(exc, BackendError) and not journaled):
            self._hold.committing = False


def _committing(
    prepare: Callable[Concatenate[Accounting, Hold, P], Job[UsageRecord]],
) -> Callable[Concatenate[Reservation, P], UsageRecord]:
    """``Reservation.commit``: the core's commit of this hold, run as a settlement."""

    @functools.wraps(prepare)
    def method(self: Reservation, /, *args: P.args, **kwargs: P.kwargs) -> UsageRecord:
        budget = self._budget
        try:
            budget._before(settle=True)
            return budget._driver.run(prepare(budget._core, self._hold, *args, **kwargs))
        except BaseException as exc:
            self._commit_failed(exc)
            raise

    return method


def _async_committing(
    prepare: Callable[Concatenate[Accounting, Hold, P], Job[UsageRecord]],
) -> Callable[Concatenate[AsyncReservation, P], Coroutine[Any, Any, UsageRecord]]:
    """``AsyncReservation.commit``."""

    @functools.wraps(prepare)
    async def method(self: AsyncReservation, /, *args: P.args, **kwargs: P.kwargs) -> UsageRecord:
        budget = self._budget
        try:
            await budget._before(settle=True)
            return await budget._driver.run(prepare(budget._core, self._hold, *args, **kwargs))
        except BaseException as exc:
            self._commit_failed(exc)
            raise

    return method


class Reservation(_ReservationBase[Budget]):
    """A hold from :meth:`Budget.reserve`. ``commit`` the actual usage or ``release``; as a context
    manager, leaving the block without a commit (an exception, a return) releases it."""

    __slots__ = ()

    commit = _committing(Accounting.commit)

    def release(self) -> bool:
        """Free the hold; True if it was still live."""
        self._budget._before(settle=True)
        return self._budget._driver.run(self._budget._core.release(self._hold))

    def extend(self, ttl: float) -> bool:
        """Keep a long call (a stream) held: its lease now ends ``ttl`` seconds from now (one round
        trip). False if the hold had lapsed already (a later commit is flagged ``hold_expired``)."""
        job = self._budget._core.extend(self._hold, ttl)
        self._budget._before(settle=True)
        return self._budget._driver.run(job)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """Leaving the block: see ``Accounting.leave`` (a hold left uncommitted warns, and is released
        or charged per ``on_uncommitted``; a refused commit's error charges it)."""
        job = self._budget._core.leave(self._hold, exc)
        if job is None:
            return
        self._budget._before(settle=True)
        try:
            self._budget._driver.run(job)
        except BudgetExceededError as err:  # charged (money spent): nothing to raise on leaving
            warnings.warn(err.message, BudgetWarning, stacklevel=2)


class AsyncReservation(_ReservationBase[AsyncBudget]):
    """A hold from :meth:`AsyncBudget.reserve`; ``await r.commit(...)`` or ``await r.release()``."""

    __slots__ = ()

    commit = _async_committing(Accounting.commit)

    async def release(self) -> bool:
        """Free the hold; runs to completion even if the calling task is cancelled meanwhile."""
        if not self._hold.open:
            return False
        task = asyncio.ensure_future(self._release())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])  # finish freeing the hold, then let the cancellation through
            raise

    async def _release(self) -> bool:
        await self._budget._before(settle=True)
        return await self._budget._driver.run(self._budget._core.release(self._hold))

    async def extend(self, ttl: float) -> bool:
        """See :meth:`Reservation.extend`."""
        job = self._budget._core.extend(self._hold, ttl)
        await self._budget._before(settle=True)
        return await self._budget._driver.run(job)

    async def _leave(self, exc: BaseException | None) -> None:
        """Leaving an ``async with`` block (see :meth:`Reservation.__exit__`); runs to completion even
        if the calling task is cancelled meanwhile."""
        job = self._budget._core.leave(self._hold, exc)
        if job is None:
            return
        task = asyncio.ensure_future(self._settle(job))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])  # finish settling the hold, then let the cancellation through
            raise
        except BudgetExceededError as err:  # charged (money spent): nothing to raise on leaving
            warnings.warn(err.message, BudgetWarning, stacklevel=2)

    async def _settle(self, job: Job[Any]) -> None:
        await self._budget._before(settle=True)
        await self._budget._driver.run(job)

    async def __aenter__(self) -> AsyncReservation:
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        await self._leave(exc)


class PendingReservation:
    """What ``AsyncBudget.reserve`` returns: await it for an :class:`AsyncReservation`, or use it
    as ``async with``, which releases the hold on leaving the block uncommitted (even when the task
    is cancelled inside it)."""

    def __init__(self, start: Callable[[], Awaitable[AsyncReservation]]) -> None:
        self._start: Callable[[], Awaitable[AsyncReservation]] | None = start
        self._reservation: AsyncReservation | None = None

    async def _get(self) -> AsyncReservation:
        if self._reservation is None:
            if self._start is None:
                raise RuntimeError("this reservation was already awaited")
            start, self._start = self._start, None
            self._reservation = await start()
        return self._reservation

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncReservation:
        return await self._get()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self._reservation is not None:
            await self._reservation._leave(exc)
