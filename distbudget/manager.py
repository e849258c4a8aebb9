"""``BudgetManager``: a registry of named scopes sharing one engine (one Redis, or one in-process
store), with the seed's calls (``register``, ``get``, ``record``, ``all_summaries`` ...)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from distbudget._core.scope import BudgetScope, check_name
from distbudget._core.types import UsageRecord
from distbudget._exceptions import InvalidInputError
from distbudget.budget import Budget, Reservation, make_engine
from distbudget.pricing import ModelRates


class BudgetManager:
    """Scopes by name. ``redis`` as for :class:`Budget`; other keyword options (``prefix``,
    ``clock``, ``default_rates``, TTLs) apply to every registered budget."""

    def __init__(self, *, redis: Any = None, **options: Any) -> None:
        self._engine = make_engine(redis)
        self._options = options
        self._budgets: dict[str, Budget] = {}
        self._lock = threading.Lock()

    def register(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None = None) -> Budget:
        """Add (or replace) a scope. A ``parent`` given by name must be registered already."""
        if not isinstance(scope, BudgetScope):
            raise TypeError("scope must be a BudgetScope")
        with self._lock:
            if isinstance(scope.parent, str):
                parent = self._budgets.get(scope.parent)
                if parent is None:
                    raise InvalidInputError(f"parent scope {scope.parent!r} is not registered")
                scope = dataclasses.replace(scope, parent=parent.scope)
            budget = Budget(scope, rates, _engine=self._engine, **self._options)
            self._budgets[scope.name] = budget
            return budget

    def get(self, name: str) -> Budget:
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

    def check(self, scope_name: str, model: str, input_tokens: int, output_tokens: int = 0,
              session_id: str | None = None) -> bool:
        return self.get(scope_name).check(model, input_tokens, output_tokens, session_id)

    def record(self, scope_name: str, session_id: str | None, model: str, input_tokens: int,
               output_tokens: int, metadata: dict[str, Any] | None = None, request_id: str | None = None,
               **kwargs: Any) -> UsageRecord:
        return self.get(scope_name).record(session_id, model, input_tokens, output_tokens, metadata,
                                           request_id, **kwargs)

    def reserve(self, scope_name: str, model: str, input_tokens: int, max_output_tokens: int,
                **kwargs: Any) -> Reservation:
        return self.get(scope_name).reserve(model, input_tokens, max_output_tokens, **kwargs)

    def acquire(self, scope_name: str, model: str, input_tokens: int, max_output_tokens: int,
                **kwargs: Any) -> Reservation:
        return self.get(scope_name).acquire(model, input_tokens, max_output_tokens, **kwargs)

    def summary(self, name: str, session_id: str | None = None) -> dict[str, Any]:
        return self.get(name).summary(session_id)

    def all_summaries(self) -> dict[str, dict[str, Any]]:
        return {name: self._budgets[name].summary() for name in self.names()}
