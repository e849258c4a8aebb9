"""The public names are a contract: ``distbudget.__all__`` lists exactly what the package exports (and
what its API returns), and a budget shows exactly its documented methods (in the manner of httpx's
``tests/test_exported_members.py``)."""

from __future__ import annotations

import inspect

import distbudget
from distbudget import AsyncBudget, AsyncBudgetManager, Budget, BudgetManager

# The names the SPEC and the README document (more may be added; none may go).
DOCUMENTED_NAMES = """
AlertLevel AlertListener AsyncAlertListener AsyncBudget AsyncBudgetManager AsyncReservation BackendError Budget
BudgetAlert BudgetExceededError BudgetManager BudgetScope BudgetWarning DistBudgetError InvalidInputError LedgerEntry
Limit ModelRates PendingReservation Reservation UnknownModelError UnknownScopeError UsageRecord WebhookSink
"""
DOCUMENTED = set(DOCUMENTED_NAMES.split())

BUDGET_API = {
    "acquire",
    "alerts",
    "backend_status",
    "check",
    "engine",
    "estimate",
    "export_ledger",
    "flush_journal",
    "ledger",
    "name",
    "on_alert",
    "record",
    "record_many",
    "records",
    "report",
    "reserve",
    "reset",
    "reset_model",
    "reset_session",
    "scope",
    "session_id",
    "summary",
}

MANAGER_API = {
    "acquire",
    "all_summaries",
    "check",
    "export_ledger",
    "flush_journal",
    "get",
    "names",
    "prices",
    "push_prices",
    "record",
    "records",
    "register",
    "remove",
    "report",
    "reserve",
    "summary",
    "update",
}


RESERVATION_API = {
    "admitted",
    "commit",
    "extend",
    "held_cost_usd",
    "held_nano_usd",
    "held_tokens",
    "hold_id",
    "model",
    "record",
    "release",
    "request_id",
    "session_id",
}


def public(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


def test_all_is_exactly_the_exported_names() -> None:
    exported = {
        name for name, value in vars(distbudget).items() if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(distbudget.__all__) == exported
    assert len(distbudget.__all__) == len(exported)  # each once
    assert exported >= DOCUMENTED
    for name in exported:  # each defined in a module of the package, none a stray import
        assert getattr(distbudget, name).__module__.startswith("distbudget."), name


def test_what_the_api_returns_is_exported() -> None:
    for name in ("LedgerEntry", "PendingReservation", "Reservation", "AsyncReservation", "UsageRecord", "BudgetAlert"):
        assert getattr(distbudget, name).__name__ == name


def test_budgets_show_exactly_their_documented_api() -> None:
    assert public(Budget) | {"engine", "name"} == BUDGET_API  # instance attributes
    assert public(AsyncBudget) | {"engine", "name"} == BUDGET_API
    budget = Budget(distbudget.BudgetScope("s"))
    assert public(budget) == BUDGET_API


def test_reservations_show_exactly_their_documented_api() -> None:
    assert public(distbudget.Reservation) == RESERVATION_API
    assert public(distbudget.AsyncReservation) == RESERVATION_API
    rates = {"m": distbudget.ModelRates(0.001, 0.002)}
    reservation = Budget(distbudget.BudgetScope("s"), rates).reserve("m", 1, 1)
    assert public(reservation) == RESERVATION_API


def test_managers_show_exactly_their_documented_api() -> None:
    assert public(BudgetManager) == MANAGER_API
    assert public(AsyncBudgetManager) == MANAGER_API


def test_sync_and_async_methods_share_one_signature() -> None:
    for name in BUDGET_API - {"engine", "alerts", "records", "backend_status", "name", "scope", "session_id"}:
        assert inspect.signature(getattr(Budget, name)) == inspect.signature(getattr(AsyncBudget, name)), name
    assert inspect.iscoroutinefunction(AsyncBudget.record)
    assert not inspect.iscoroutinefunction(AsyncBudget.reserve)  # a PendingReservation: await it or async with


def test_an_unknown_scope_is_a_distbudget_error_and_a_key_error() -> None:
    manager = BudgetManager()
    assert manager.get("nope") is None and manager.remove("nope") is False  # as agent-budget's
    for call in (
        lambda: manager.record("nope", "s", "m", 1, 1),
        lambda: manager.summary("nope"),
    ):
        try:
            call()
        except distbudget.UnknownScopeError as err:
            assert isinstance(err, distbudget.DistBudgetError) and isinstance(err, KeyError)
            assert "nope" in str(err)
        else:
            raise AssertionError("no UnknownScopeError")


def test_every_setting_is_a_keyword_of_budgets_and_managers() -> None:
    """``Settings.pick`` takes the settings from the constructors' keywords by name: a setting the
    constructors lack would silently keep its default."""
    import dataclasses

    from distbudget._accounting import Settings

    settings = {field.name for field in dataclasses.fields(Settings)} - {"fleet"}  # fleet: the manager's own
    for cls in (Budget, AsyncBudget, BudgetManager, AsyncBudgetManager):
        assert settings <= set(inspect.signature(cls).parameters), cls.__name__


def test_constructor_keywords_reach_the_budget() -> None:
    manager = BudgetManager(prefix="kw", session_ttl=123, hold_ttl=45, strict_models=True, ledger_maxlen=77)
    manager.register(distbudget.BudgetScope("t", max_tokens_per_session=10))
    budget = manager.get("t")
    assert budget is not None
    direct = Budget(distbudget.BudgetScope("t"), prefix="kw", session_ttl=123, hold_ttl=45, strict_models=True)
    for core in (budget._core, direct._core):
        got = (core.prefix, core.session_ttl_ms, core.hold_ttl_us, core.strict_models)
        assert got == ("kw", 123_000, 45_000_000, True)
