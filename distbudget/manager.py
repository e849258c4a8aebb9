"""``BudgetManager`` / ``AsyncBudgetManager``: a registry of named scopes sharing one engine (one
Redis, or one in-process store), with the seed's calls (``register``, ``get``, ``record``,
``all_summaries`` ...). The registry logic is in :class:`ManagerBase`; the two shells delegate."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from distbudget._core.scope import BudgetScope, check_name
from distbudget._core.types import UsageRecord
from distbudget._exceptions import InvalidInputError
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


class ManagerBase(Generic[B]):
    """Scopes by name; ``redis`` as for a budget; other keyword options (``prefix``, ``clock``,
    ``default_rates``, TTLs) apply to every registered budget."""

    _budget_class: type[B]

    def __init__(self, engine: Any, options: dict[str, Any]) -> None:
        self._engine = engine
        self._options = options
        self._budgets: dict[str, B] = {}
        self._lock = threading.Lock()

    def register(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None = None) -> B:
        """Add (or replace) a scope. A ``parent`` given by name must be registered already."""
        if not isinstance(scope, BudgetScope):
            raise TypeError("scope must be a BudgetScope")
        with self._lock:
            if isinstance(scope.parent, str):
                parent = self._budgets.get(scope.parent)
                if parent is None:
                    raise InvalidInputError(f"parent scope {scope.parent!r} is not registered")
                scope = dataclasses.replace(scope, parent=parent.scope)
            budget = self._budget_class(scope, rates, _engine=self._engine, **self._options)
            self._budgets[scope.name] = budget
            return budget

    def get(self, name: str) -> B:
        """The budget of a registered scope; ``KeyError`` if unknown."""
        check_name(name, "scope name")
        try:
            return self._budgets[name]
        except KeyError:
            raise KeyError(f"unknown scope {name!r}") from None

    def remove(self, name: str) -> None:
        """Forget a scope (its counters in the store are left as they are)."""
        self.get(name)
        with self._lock:
            self._budgets.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._budgets)

    def __contains__(self, name: object) -> bool:
        return name in self._budgets


class BudgetManager(ManagerBase[Budget]):
    _budget_class = Budget

    def __init__(self, *, redis: Any = None, **options: Any) -> None:
        super().__init__(make_engine(redis), options)

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
        return {name: self._budgets[name].summary() for name in self.names()}


class AsyncBudgetManager(ManagerBase[AsyncBudget]):
    """The asyncio twin of :class:`BudgetManager` (``register``/``get``/``remove`` stay sync: they
    do no I/O)."""

    _budget_class = AsyncBudget

    def __init__(self, *, redis: Any = None, **options: Any) -> None:
        super().__init__(make_async_engine(redis), options)

    async def check(
        self, scope_name: str, model: str, input_tokens: int, output_tokens: int = 0, session_id: str | None = None
    ) -> bool:
        return await self.get(scope_name).check(model, input_tokens, output_tokens, session_id)

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
        return await self.get(scope_name).record(
            session_id, model, input_tokens, output_tokens, metadata, request_id, **kwargs
        )

    def reserve(
        self, scope_name: str, model: str, input_tokens: int, max_output_tokens: int, **kwargs: Any
    ) -> PendingReservation:
        return self.get(scope_name).reserve(model, input_tokens, max_output_tokens, **kwargs)

    def acquire(
        self, scope_name: str, model: str, input_tokens: int, max_output_tokens: int, **kwargs: Any
    ) -> PendingReservation:
        return self.get(scope_name).acquire(model, input_tokens, max_output_tokens, **kwargs)

    async def summary(self, name: str, session_id: str | None = None) -> dict[str, Any]:
        return await self.get(name).summary(session_id)

    async def all_summaries(self) -> dict[str, dict[str, Any]]:
        return {name: await self._budgets[name].summary() for name in self.names()}
