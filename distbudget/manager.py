"""``BudgetManager`` / ``AsyncBudgetManager``: named scopes in a registry shared by every process
on the same engine (one Redis hash, ``<prefix>:registry``; embedded: the manager's own store), with
the seed's calls (``register``, ``get``, ``record``, ``all_summaries`` ...).

A scope registered in one process is found by name in any other, with its limits, parent, alert
thresholds and custom rates. Each process keeps the budgets it uses and re-reads a scope's config
when it is older than ``registry_ttl`` seconds (default 1): a registry change reaches every worker
within that, and charges never pay a registry round trip otherwise. The registry logic is in
:class:`ManagerBase` as sans-I/O flows; the two shells drive them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from distbudget import _degraded as D
from distbudget._budget_base import ExportTarget, Flow, Hold, LedgerSince, _seconds, allow_eviction_option, write_jsonl
from distbudget._core import registry as R
from distbudget._core.keys import registry_key
from distbudget._core.scope import BudgetScope, check_name
from distbudget._core.types import UsageRecord
from distbudget._exceptions import BackendError
from distbudget.budget import (
    AsyncBudget,
    Budget,
    PendingReservation,
    Reservation,
    make_async_engine,
    make_engine,
)
from distbudget.pricing import ModelRates

B = TypeVar("B", Budget, AsyncBudget)
T = TypeVar("T")


class ManagerBase(Generic[B]):
    """Scopes by name in the shared registry; ``redis`` as for a budget; ``registry_ttl`` (seconds a
    worker trusts a scope's config before re-reading it); other keyword options (``prefix``,
    ``clock``, ``default_rates``, TTLs, ``ledger_maxlen``) apply to every budget."""

    _budget_class: type[B]

    def __init__(self, engine: Any, options: dict[str, Any]) -> None:
        self._engine = engine
        self._ttl = _seconds(options.pop("registry_ttl", 1.0), "registry_ttl")
        self._key = registry_key(options.get("prefix", "distbudget"))
        self._options = options
        self._budgets: dict[str, B] = {}
        self._lock = threading.Lock()

    def _adopt(self, name: str, chain: list[str]) -> B:
        err = R.refusal(chain)
        if err is not None:
            raise err
        if not chain:
            raise KeyError(f"unknown scope {name!r}")
        with self._lock:
            budget = self._budgets.get(name)
            if budget is not None:
                budget.refreshed(chain)
                return budget
            scope, rates = R.from_chain(chain)
            budget = self._budget_class(
                scope, rates, _engine=self._engine, _registry=(self._key, self._ttl, tuple(chain)), **self._options
            )
            self._budgets[name] = budget
            return budget

    def register_flow(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None) -> Flow[B]:
        if not isinstance(scope, BudgetScope):
            raise TypeError("scope must be a BudgetScope")
        # parents given as objects are registered if absent (never overwritten), in the same
        # all-or-nothing step as the scope itself
        scopes: list[tuple[str, str, bool]] = [
            (a.name, R.scope_config(a, None), True) for a in reversed(scope.ancestors())
        ]
        scopes.append((scope.name, R.scope_config(scope, rates), False))
        reply = yield "registry", (self._key, "put", *R.put_args(scopes))
        return self._adopt(scope.name, reply)

    def get_flow(self, name: str) -> Flow[B]:
        check_name(name, "scope name")
        budget = self._budgets.get(name)
        if budget is None:
            return self._adopt(name, (yield "registry", (self._key, "chain", name)))
        call = budget.refresh_call()
        if call is not None and budget._guard.refresh_due():  # not due: Redis is down, keep the cached config
            try:
                chain = yield call
            except BackendError as err:
                budget._guard.refresh_failed(err)  # Redis unavailable: the call meets the failure policy
                return budget
            budget._guard.refresh_answered()
            try:
                budget.refreshed(chain)
            except KeyError:
                with self._lock:
                    self._budgets.pop(name, None)
                raise
        return budget

    def remove_flow(self, name: str) -> Flow[None]:
        check_name(name, "scope name")
        reply = yield "registry", (self._key, "remove", name)
        err = R.refusal(reply)
        if err is not None:
            raise err
        with self._lock:
            self._budgets.pop(name, None)
        if not reply:
            raise KeyError(f"unknown scope {name!r}")

    def names_flow(self) -> Flow[list[str]]:
        return sorted((yield "registry_names", (self._key,)))

    def _run(self, flow: Flow[T]) -> T:
        return D.run_sync(self._engine, flow)  # type: ignore[no-any-return]  # errors thrown into the flow

    async def _run_async(self, flow: Flow[T]) -> T:
        return await D.run_async(self._engine, flow)  # type: ignore[no-any-return]


class BudgetManager(ManagerBase[Budget]):
    _budget_class = Budget

    def __init__(self, *, redis: Any = None, _engine: Any = None, **options: Any) -> None:
        connect = D.connect_options(options)  # validates on_backend_error & co. now
        super().__init__(
            _engine if _engine is not None else make_engine(redis, connect, allow_eviction_option(options)), options
        )

    def flush_journal(self) -> int:
        """Replay now the charges journaled while Redis was unavailable (see ``Budget.flush_journal``)."""
        return D.flush_sync(self._engine)

    def register(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None = None) -> Budget:
        """Store the scope's whole config in the shared registry (add or replace) and return its
        budget. A ``parent`` given by name must be registered already; given as a scope object it is
        registered first if it is not. Cycles, missing parents and a changed parent are refused."""
        return self._run(self.register_flow(scope, rates))

    def get(self, name: str) -> Budget:
        """The budget of a scope registered by any process; ``KeyError`` if unknown."""
        return self._run(self.get_flow(name))

    def remove(self, name: str) -> None:
        """Remove a scope from the registry (its counters in the store are left as they are);
        refused while it has children. ``KeyError`` if unknown."""
        self._run(self.remove_flow(name))

    def names(self) -> list[str]:
        """Every registered scope, sorted."""
        return self._run(self.names_flow())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except KeyError:
            return False
        return True

    def check(
        self, scope_name: str, model: str, input_tokens: int, output_tokens: int = 0, session_id: str | None = None
    ) -> bool:
        return self.get(scope_name).check(model, input_tokens, output_tokens, session_id)

    def record(
        self,
        scope_name: str,
        session_id: str | None,
        model: str,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> UsageRecord:
        return self.get(scope_name).record(
            session_id, model, input_tokens, output_tokens, metadata, request_id, **kwargs
        )

    def reserve(
        self, scope_name: str, model: str, input_tokens: int, max_output_tokens: int, **kwargs: Any
    ) -> Reservation:
        return self.get(scope_name).reserve(model, input_tokens, max_output_tokens, **kwargs)

    def acquire(
        self, scope_name: str, model: str, input_tokens: int, max_output_tokens: int, **kwargs: Any
    ) -> Reservation:
        return self.get(scope_name).acquire(model, input_tokens, max_output_tokens, **kwargs)

    def summary(self, name: str, session_id: str | None = None) -> dict[str, Any]:
        return self.get(name).summary(session_id)

    def all_summaries(self) -> dict[str, dict[str, Any]]:
        """Summaries of every registered scope (from the registry: no keyspace scan)."""
        return {name: self.get(name).summary() for name in self.names()}

    def records(self, name: str, since: LedgerSince = None, limit: int | None = None) -> list[UsageRecord]:
        """Charges counting against a scope (its own and its descendants'), from the shared ledger."""
        budget = self.get(name)
        return [e.as_record() for e in budget._drive(budget.ledger_flow(since, limit, charges_only=True))]

    def export_ledger(self, name: str, target: ExportTarget, since: LedgerSince = None) -> int:
        """A scope's ledger as JSON lines (path or text file); returns the number of lines."""
        return write_jsonl(self.get(name).ledger(since), target)


class AsyncBudgetManager(ManagerBase[AsyncBudget]):
    """The asyncio twin of :class:`BudgetManager`: every method that reads or writes the registry
    is a coroutine (``await manager.register(scope)``)."""

    _budget_class = AsyncBudget

    def __init__(self, *, redis: Any = None, _engine: Any = None, **options: Any) -> None:
        connect = D.connect_options(options)
        super().__init__(
            _engine if _engine is not None else make_async_engine(redis, connect, allow_eviction_option(options)),
            options,
        )

    async def flush_journal(self) -> int:
        return await D.flush_async(self._engine)

    async def register(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None = None) -> AsyncBudget:
        return await self._run_async(self.register_flow(scope, rates))

    async def get(self, name: str) -> AsyncBudget:
        return await self._run_async(self.get_flow(name))

    async def remove(self, name: str) -> None:
        await self._run_async(self.remove_flow(name))

    async def names(self) -> list[str]:
        return await self._run_async(self.names_flow())

    async def check(
        self, scope_name: str, model: str, input_tokens: int, output_tokens: int = 0, session_id: str | None = None
    ) -> bool:
        return await (await self.get(scope_name)).check(model, input_tokens, output_tokens, session_id)

    async def record(
        self,
        scope_name: str,
        session_id: str | None,
        model: str,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> UsageRecord:
        budget = await self.get(scope_name)
        return await budget.record(session_id, model, input_tokens, output_tokens, metadata, request_id, **kwargs)

    def reserve(
        self,
        scope_name: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> PendingReservation:
        """``r = await manager.reserve(...)`` or ``async with manager.reserve(...) as r:``."""

        async def start() -> tuple[AsyncBudget, Flow[Hold]]:
            budget = await self.get(scope_name)
            return budget, budget.reserve_flow(model, input_tokens, max_output_tokens, session_id, request_id, ttl)

        return PendingReservation(start)

    def acquire(
        self,
        scope_name: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        *,
        timeout: float = 60.0,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> PendingReservation:
        async def start() -> tuple[AsyncBudget, Flow[Hold]]:
            budget = await self.get(scope_name)
            flow = budget.acquire_flow(model, input_tokens, max_output_tokens, timeout, session_id, request_id, ttl)
            return budget, flow

        return PendingReservation(start)

    async def summary(self, name: str, session_id: str | None = None) -> dict[str, Any]:
        return await (await self.get(name)).summary(session_id)

    async def all_summaries(self) -> dict[str, dict[str, Any]]:
        return {name: await (await self.get(name)).summary() for name in await self.names()}

    async def records(self, name: str, since: LedgerSince = None, limit: int | None = None) -> list[UsageRecord]:
        budget = await self.get(name)
        return [e.as_record() for e in await budget._drive(budget.ledger_flow(since, limit, charges_only=True))]

    async def export_ledger(self, name: str, target: ExportTarget, since: LedgerSince = None) -> int:
        return write_jsonl(await (await self.get(name)).ledger(since), target)
