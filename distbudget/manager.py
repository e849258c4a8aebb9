"""``BudgetManager`` / ``AsyncBudgetManager``: named scopes in a registry shared by every process
on the same engine (one Redis hash, ``<prefix>:registry``; embedded: the manager's own store), with
the seed's calls (``register``, ``get``, ``record``, ``all_summaries`` ...).

A scope registered in one process is found by name in any other, with its limits, parent, alert
thresholds and custom rates. Each process keeps the budgets it uses and re-reads a scope's config
when it is older than ``registry_ttl`` seconds (default 1): a registry change reaches every worker
within that, and charges never pay a registry round trip otherwise. The registry logic is in
:class:`_ManagerBase`, once; the two managers only run its steps (a call, or an ``await``), and take
the calls of a scope's budget over by name (:func:`_by_name`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from distbudget._accounting import ExportTarget, LedgerSince, Settings, _seconds, write_jsonl
from distbudget._core import ledger as L
from distbudget._core import registry as R
from distbudget._core import update as U
from distbudget._core.errors import UnknownScopeError
from distbudget._core.fleet_prices import FleetBook, encode_book
from distbudget._core.keys import prices_key, registry_key
from distbudget._core.ops import (
    PricesPush,
    PricesRead,
    RegistryChain,
    RegistryNames,
    RegistryPut,
    RegistryRemove,
    RegistrySwap,
    Step,
    Steps,
)
from distbudget._core.plan import ALERT_STREAM_MAXLEN
from distbudget._core.prices import ModelRates, PriceBook
from distbudget._core.scope import BudgetScope, check_name
from distbudget._core.types import UsageRecord
from distbudget._driver import AsyncDriver, Driver
from distbudget._policy.guard import check_options, connect_options
from distbudget._policy.journal import DEFAULT_JOURNAL_SIZE, flush, state_for
from distbudget.budget import AsyncBudget, Budget, PendingReservation, make_async_engine, make_engine
from distbudget.engines.base import AsyncEngine, Engine

B = TypeVar("B", Budget, AsyncBudget)
E = TypeVar("E", Engine, AsyncEngine)
M = TypeVar("M", "BudgetManager", "AsyncBudgetManager")
P = ParamSpec("P")
T = TypeVar("T")


class _ManagerBase(Generic[B, E]):
    """Scopes by name in the shared registry. ``redis`` as for a budget; ``registry_ttl``: seconds a
    worker trusts a scope's config before re-reading it; the other keywords apply to every budget
    (see :class:`~distbudget.Budget`)."""

    _budget_class: type[B]

    def __init__(
        self,
        *,
        redis: object = None,
        registry_ttl: float = 1.0,
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
        allow_eviction: bool = False,
        prices: PriceBook | None = None,
        _engine: E | None = None,
    ) -> None:
        mode = check_options(on_backend_error, fail_open_max_cost_usd, fail_open_max_tokens, journal_size)[0]
        options = connect_options(mode)
        self._engine: E = _engine if _engine is not None else self._connect(redis, options, allow_eviction)
        self._ttl = _seconds(registry_ttl, "registry_ttl")
        self._key = registry_key(prefix)
        self._settings = Settings.pick(locals(), fleet=FleetBook())
        if prices is not None and not isinstance(prices, PriceBook):
            raise TypeError("prices must be a PriceBook")
        self._prices_key = prices_key(prefix)
        self._budgets: dict[str, B] = {}
        self._lock = threading.Lock()

    def _connect(self, redis: object, options: dict[str, Any], allow_eviction: bool) -> E:
        raise NotImplementedError

    def _adopt(self, name: str, chain: list[str]) -> B:
        err = R.refusal(chain)
        if err is not None:
            raise err
        if not chain:
            raise UnknownScopeError(f"unknown scope {name!r}")
        with self._lock:
            budget = self._budgets.get(name)
            if budget is not None:
                budget._core.refreshed(chain)
                return budget
            scope, rates = R.from_chain(chain)
            budget = self._budget_class(
                scope,
                rates,
                _engine=self._engine,  # type: ignore[arg-type]
                _registry=(self._key, self._ttl, tuple(chain)),
                _settings=self._settings,
            )
            self._budgets[name] = budget
            return budget

    def _register(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None) -> Step[list[str], B]:
        if not isinstance(scope, BudgetScope):
            raise TypeError("scope must be a BudgetScope")
        # parents given as objects are registered if absent (never overwritten), in the same
        # all-or-nothing step as the scope itself
        scopes: list[tuple[str, str, bool]] = [
            (a.name, R.scope_config(a, None), True) for a in reversed(scope.ancestors())
        ]
        scopes.append((scope.name, R.scope_config(scope, rates), False))
        return Step(RegistryPut(self._key, R.put_args(scopes)), lambda chain: self._adopt(scope.name, chain))

    def _lookup(self, name: str) -> Step[list[str], B] | B:
        """A budget this process knows, or the registry read that finds it."""
        check_name(name, "scope name")
        budget = self._budgets.get(name)
        if budget is not None:
            return budget
        return Step(RegistryChain(self._key, name), lambda chain: self._adopt(name, chain))

    def _forget(self, name: str) -> None:
        with self._lock:
            self._budgets.pop(name, None)

    def _remove(self, name: str) -> Step[list[str], bool]:
        check_name(name, "scope name")

        def finish(reply: list[str]) -> bool:
            err = R.refusal(reply)
            if err is not None:
                raise err
            self._forget(name)
            return bool(reply)  # False: it was not registered

        return Step(RegistryRemove(self._key, name), finish)

    def _update(self, name: str, changes: dict[str, Any]) -> Steps[B]:
        """Read the scope's config, merge the changes (``_core/update.py``), write it if nobody
        changed it meanwhile (else read and merge again), then the zero charge that fires the alerts
        the new config crossed (a cap lowered under usage), once across the fleet."""
        check_name(name, "scope name")
        U.check_changes(changes)
        while True:
            chain = yield RegistryChain(self._key, name)
            err = R.refusal(chain)
            if err is not None:
                raise err
            if not chain:
                raise UnknownScopeError(f"unknown scope {name!r}")
            reply = yield RegistrySwap(self._key, name, chain[0], U.merge(chain[0], changes))
            if reply != [U.CHANGED]:
                break
        if not reply:
            raise UnknownScopeError(f"unknown scope {name!r}")
        budget = self._adopt(name, reply)
        step = budget._core.alert_check()
        step.finish((yield step.op))
        return budget

    def _push_prices(self, book: PriceBook) -> Step[int, int]:
        if not isinstance(book, PriceBook):
            raise TypeError("push_prices takes a PriceBook (e.g. PriceBook.from_litellm(path))")
        return Step(PricesPush(self._prices_key, encode_book(book)), int)

    def _prices(self) -> Step[tuple[int, str | None], PriceBook] | PriceBook:
        given, fleet = self._settings.prices, self._settings.fleet
        if given is not None:
            return given
        assert fleet is not None

        def finish(reply: tuple[int, str | None]) -> PriceBook:
            fleet.update(*reply)
            return PriceBook(table=fleet.table)

        return Step(PricesRead(self._prices_key, fleet.rev), finish)

    def _names(self) -> Step[list[str], list[str]]:
        return Step(RegistryNames(self._key), sorted)


def _by_name(call: Callable[Concatenate[B, P], T]) -> Callable[Concatenate[Any, str, P], T]:
    """A manager's call on a scope by name: the call of that scope's budget (``get``, then it), as
    the budget itself has it (``record``: its embedded fast path, when it took one)."""
    name = call.__name__

    @functools.wraps(call)
    def method(self: BudgetManager, scope_name: str, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return getattr(self._budget(scope_name), name)(*args, **kwargs)  # type: ignore[no-any-return]

    return method


def _async_by_name(
    call: Callable[Concatenate[AsyncBudget, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[AsyncBudgetManager, str, P], Coroutine[Any, Any, T]]:
    name = call.__name__

    @functools.wraps(call)
    async def method(self: AsyncBudgetManager, scope_name: str, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await getattr(await self._budget(scope_name), name)(*args, **kwargs)  # type: ignore[no-any-return]

    return method


def _pending_by_name(
    call: Callable[Concatenate[AsyncBudget, P], PendingReservation],
) -> Callable[Concatenate[AsyncBudgetManager, str, P], PendingReservation]:
    name = call.__name__

    @functools.wraps(call)
    def method(self: AsyncBudgetManager, scope_name: str, /, *args: P.args, **kwargs: P.kwargs) -> PendingReservation:
        async def start() -> Any:
            return await getattr(await self._budget(scope_name), name)(*args, **kwargs)

        return PendingReservation(start)

    return method


class BudgetManager(_ManagerBase[Budget, Engine]):
    """Named scopes shared by every process on one engine (see the module docstring)."""

    _budget_class = Budget

    def _connect(self, redis: object, options: dict[str, Any], allow_eviction: bool) -> Engine:
        return make_engine(redis, options, allow_eviction=allow_eviction)

    def flush_journal(self) -> int:
        """Replay now the charges journaled while Redis was unavailable (see ``Budget.flush_journal``)."""
        return Driver(self._engine).run(flush(state_for(self._engine)))

    def register(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None = None) -> Budget:
        """Store the scope's whole config in the shared registry (add or replace) and return its
        budget. A ``parent`` given by name must be registered already; given as a scope object it is
        registered first if it is not. Cycles, missing parents and a changed parent are refused."""
        return Driver(self._engine).run(self._register(scope, rates))

    def get(self, name: str) -> Budget | None:
        """The budget of a scope registered by any process; ``None`` if unknown (as agent-budget's).
        The calls by scope name (``record``, ``check`` ...) raise ``UnknownScopeError`` instead."""
        try:
            return self._budget(name)
        except UnknownScopeError:
            return None

    def _budget(self, name: str) -> Budget:
        """The budget of a scope; ``UnknownScopeError`` (a ``KeyError``) if unknown."""
        found = self._lookup(name)
        if isinstance(found, Step):
            return Driver(self._engine).run(found)
        refresh = found._core.refresh()
        if refresh is not None:
            try:
                found._keep(refresh)  # under the budget's failure policy: an outage keeps its config
            except UnknownScopeError:
                self._forget(name)
                raise
        return found

    def remove(self, name: str) -> bool:
        """Remove a scope from the registry (its counters in the store are left as they are);
        refused while it has children. True if it was registered, False if not (as agent-budget's)."""
        return Driver(self._engine).run(self._remove(name))

    def update(self, name: str, **fields: Any) -> Budget:
        """Change only the named fields of a registered scope (any :class:`BudgetScope` field but
        ``name`` and ``parent``, and ``rates``), atomically, keeping the rest; returns its budget.
        The whole new config is validated before anything is written. A cap lowered under current
        usage fires its alert at once, once across the fleet. Other workers see the change within
        their ``registry_ttl``."""
        return Driver(self._engine).run(self._update(name, fields))

    def push_prices(self, book: PriceBook) -> int:
        """Store ``book``'s price table as the fleet's (this prefix's) and return its revision: every
        manager's budgets without their own ``prices=`` price with it from their next registry
        refresh (custom ``rates=`` of a scope still win)."""
        return Driver(self._engine).run(self._push_prices(book))

    def prices(self) -> PriceBook:
        """The book this manager's budgets price with: its ``prices=``, else the fleet's book,
        else the bundled snapshot."""
        found = self._prices()
        return found if isinstance(found, PriceBook) else Driver(self._engine).run(found)

    def names(self) -> list[str]:
        """Every registered scope, sorted."""
        return Driver(self._engine).run(self._names())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return self.get(name) is not None

    check = _by_name(Budget.check)
    record = _by_name(Budget.record)
    reserve = _by_name(Budget.reserve)
    acquire = _by_name(Budget.acquire)
    summary = _by_name(Budget.summary)
    report = _by_name(Budget.report)

    def all_summaries(self) -> dict[str, dict[str, Any]]:
        """Summaries of every registered scope (from the registry: no keyspace scan)."""
        return {name: self._budget(name).summary() for name in self.names()}

    def records(self, name: str, since: LedgerSince = None, limit: int | None = None) -> list[UsageRecord]:
        """Charges counting against a scope (its own and its descendants'), from the shared ledger."""
        budget = self._budget(name)
        budget._before()  # a journal due for replay is replayed first, as before any budget call
        return [e.as_record() for e in budget._driver.run(budget._core.ledger_pages(since, limit, charges_only=True))]

    def export_ledger(self, name: str, target: ExportTarget, since: LedgerSince = None) -> int:
        """A scope's ledger as JSON lines (path or text file); returns the number of lines."""
        return write_jsonl(self._budget(name).ledger(since), target)


class AsyncBudgetManager(_ManagerBase[AsyncBudget, AsyncEngine]):
    """The asyncio twin of :class:`BudgetManager`: every method that reads or writes the registry
    is a coroutine (``await manager.register(scope)``)."""

    _budget_class = AsyncBudget

    def _connect(self, redis: object, options: dict[str, Any], allow_eviction: bool) -> AsyncEngine:
        return make_async_engine(redis, options, allow_eviction=allow_eviction)

    async def flush_journal(self) -> int:
        return await AsyncDriver(self._engine).run(flush(state_for(self._engine)))

    async def register(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None = None) -> AsyncBudget:
        return await AsyncDriver(self._engine).run(self._register(scope, rates))

    async def get(self, name: str) -> AsyncBudget | None:
        """The budget of a scope registered by any process; ``None`` if unknown."""
        try:
            return await self._budget(name)
        except UnknownScopeError:
            return None

    async def _budget(self, name: str) -> AsyncBudget:
        found = self._lookup(name)
        if isinstance(found, Step):
            return await AsyncDriver(self._engine).run(found)
        refresh = found._core.refresh()
        if refresh is not None:
            try:
                await found._keep(refresh)
            except UnknownScopeError:
                self._forget(name)
                raise
        return found

    async def remove(self, name: str) -> bool:
        return await AsyncDriver(self._engine).run(self._remove(name))

    async def update(self, name: str, **fields: Any) -> AsyncBudget:
        """See :meth:`BudgetManager.update`."""
        return await AsyncDriver(self._engine).run(self._update(name, fields))

    async def push_prices(self, book: PriceBook) -> int:
        """See :meth:`BudgetManager.push_prices`."""
        return await AsyncDriver(self._engine).run(self._push_prices(book))

    async def prices(self) -> PriceBook:
        """See :meth:`BudgetManager.prices`."""
        found = self._prices()
        return found if isinstance(found, PriceBook) else await AsyncDriver(self._engine).run(found)

    async def names(self) -> list[str]:
        return await AsyncDriver(self._engine).run(self._names())

    check = _async_by_name(AsyncBudget.check)
    record = _async_by_name(AsyncBudget.record)
    reserve = _pending_by_name(AsyncBudget.reserve)
    acquire = _pending_by_name(AsyncBudget.acquire)
    summary = _async_by_name(AsyncBudget.summary)
    report = _async_by_name(AsyncBudget.report)

    async def all_summaries(self) -> dict[str, dict[str, Any]]:
        return {name: await (await self._budget(name)).summary() for name in await self.names()}

    async def records(self, name: str, since: LedgerSince = None, limit: int | None = None) -> list[UsageRecord]:
        budget = await self._budget(name)
        await budget._before()
        pages = budget._core.ledger_pages(since, limit, charges_only=True)
        return [e.as_record() for e in await budget._driver.run(pages)]

    async def export_ledger(self, name: str, target: ExportTarget, since: LedgerSince = None) -> int:
        return write_jsonl(await (await self._budget(name)).ledger(since), target)
