"""Bad input raises a clear error and writes nothing; odd names are safe (no key escapes the
prefix, every key of a tree in one Cluster slot)."""

from __future__ import annotations

import math

import pytest
from redis.crc import key_slot

from distbudget import BudgetManager, BudgetScope, DistBudgetError, Limit, ModelRates
from tests.conftest import Backend

RATES = {"m": ModelRates(0.001, 0.002)}


def snapshot(backend: Backend, budget: object) -> object:
    if backend.store is not None:
        return sorted(backend.store.keys("*")), [backend.store.dump(k) for k in sorted(backend.store.keys("*"))]
    engine = budget.engine  # type: ignore[attr-defined]
    engine = getattr(engine, "engine", engine)  # the async wrapper holds the memory engine
    return repr(engine._hashes), repr({k: w.buckets for k, w in engine._windows.items()})


BAD_TOKENS = [-1, 1.5, 2.0, math.nan, math.inf, True, "10", None, 2**60]


@pytest.mark.parametrize("tokens", BAD_TOKENS)
def test_bad_tokens_write_nothing(backend: Backend, tokens: object) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=100), RATES, session_id="a")
    budget.record(None, "m", 1, 1)
    before = snapshot(backend, budget)
    for call in (
        lambda: budget.record(None, "m", tokens, 1),
        lambda: budget.record(None, "m", 1, tokens),
        lambda: budget.check("m", tokens),
        lambda: budget.reserve("m", 1, tokens),
        lambda: budget.estimate("m", tokens),
    ):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert "tokens" in str(info.value)
    assert snapshot(backend, budget) == before
    assert budget.records[-1].total_tokens == 2 and len(budget.records) == 1


@pytest.mark.parametrize("name", ["", "x" * 257, None, 5, b"bytes"])
def test_bad_names_write_nothing(backend: Backend, name: object) -> None:
    budget = backend.budget(BudgetScope("s"), RATES, session_id="a")
    budget.record(None, "m", 1, 1)
    before = snapshot(backend, budget)
    if name is not None:  # None session and request ids are valid: the current session, no id
        with pytest.raises((ValueError, TypeError)):
            budget.record(name, "m", 1, 1)  # type: ignore[arg-type]
        with pytest.raises((ValueError, TypeError)):
            budget.record("a", "m", 1, 1, request_id=name)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError)):
        budget.record("a", name, 1, 1)  # type: ignore[arg-type]
    assert snapshot(backend, budget) == before


def test_bad_scopes_and_limits_are_rejected_up_front() -> None:
    with pytest.raises(ValueError):
        BudgetScope("")
    with pytest.raises(ValueError):
        BudgetScope("s", max_cost_per_session_usd=-1)
    with pytest.raises(ValueError):
        BudgetScope("s", max_cost_per_day_usd=math.nan)
    with pytest.raises(ValueError):
        BudgetScope("s", max_tokens_per_session=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BudgetScope("s", alert_at_pct=1.5)
    with pytest.raises(ValueError):
        Limit("dollars", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Limit("tokens", 1, "fortnight")
    with pytest.raises(ValueError):
        Limit("tokens", 1, 0)
    with pytest.raises(ValueError):
        BudgetScope("s", max_tokens_per_session=5, limits=[Limit("tokens", 9, "session")])  # same name twice
    with pytest.raises(TypeError):
        BudgetScope("s", limits=[{"metric": "tokens"}])  # type: ignore[list-item]
    a = BudgetScope("a")
    b = BudgetScope("b", parent=a)
    a.parent = b
    with pytest.raises(ValueError):
        b.ancestors()
    with pytest.raises(DistBudgetError):
        BudgetManager().register(BudgetScope("orphan", parent="missing"))


def test_bad_options_are_rejected() -> None:
    from distbudget import Budget

    scope = BudgetScope("s")
    with pytest.raises(ValueError):
        Budget(scope, prefix="a{b}")
    with pytest.raises(ValueError):
        Budget(scope, hold_ttl=0)
    with pytest.raises(TypeError):
        Budget(scope, redis=42)
    with pytest.raises(TypeError):
        Budget(scope, rates={"m": (0.1, 0.2)})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        ModelRates(-0.1, 0.1)


ODD = ["a{b}c", "}{", "x:y:z", "*", "with space", "ünïcødé-模型-🙂", "%7B", "a|b", "line\nbreak"]


@pytest.mark.parametrize("odd", ODD)
def test_odd_names_are_safe(backend: Backend, odd: str) -> None:
    parent = BudgetScope(odd + "-root", max_tokens_per_day=10_000)
    scope = BudgetScope(
        odd,
        max_tokens_per_session=1000,
        parent=parent,
        max_tokens_per_model={odd: 500},
        limits=[Limit("requests", 10, "1m", model=odd)],
    )
    budget = backend.budget(scope, {odd: ModelRates(0.001, 0.001)}, prefix="pfx")
    budget.record(odd, odd, 10, 10, request_id=odd)
    with budget.reserve(odd, 1, 1, session_id=odd) as res:
        res.commit(1, 1)
    s = budget.summary(odd)
    assert s["session"]["tokens"] == 22
    assert s["per_model"][odd.lower()]["tokens"] == 22  # keyed by the canonical id (names are case-blind)
    assert s["limits"][f"model_{odd}_tokens"]["used"] == 22
    assert s["limits"][f"model_{odd}_minute_requests"]["used"] == 2
    assert s["limits"][f"{odd}-root:day_tokens"]["used"] == 22
    if backend.store is not None:
        keys = [k.decode() for k in backend.store.scan_iter(count=1000)]
        keys.remove("pfx:alert-streams")  # the listeners' index: the one key outside any tree
        assert keys and all(k.startswith("pfx:{") for k in keys)
        assert len({key_slot(k.encode()) for k in keys}) == 1  # the whole tree in one slot
        budget.reset_session(odd)
        assert budget.summary(odd)["session"]["tokens"] == 0


def test_unreachable_redis_raises_backend_error_without_hanging(tmp_path: object) -> None:
    from distbudget import BackendError, Budget
    from tests.conftest import free_port

    budget = Budget(BudgetScope("down", max_tokens_per_session=10), RATES, redis=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(BackendError) as info:
        budget.record("s", "m", 1, 1)
    assert isinstance(info.value, DistBudgetError)
    assert info.value.__cause__ is not None  # the redis-py error is chained
    assert "Redis" in str(info.value)
    assert budget._core.announced is False  # registering the alert stream is retried once Redis is back
