"""The failure policy against a scripted engine (``distbudget.engines.scripted``): every Redis failure
the policy distinguishes, made on demand, in front of a real embedded engine. The same behaviour is
proven against real servers being killed in ``test_failure_policy.py``; here each rule is one small
test, with no server and no waiting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from distbudget import AsyncBudget, BackendError, Budget, BudgetExceededError, BudgetScope, ModelRates
from distbudget._core.ops import Check, Commit, LedgerRead, Operation, Record, Reserve
from distbudget.engines.memory import MemoryEngine
from distbudget.engines.scripted import AsyncScriptedEngine, ScriptedEngine, outage

RATES = {"m": ModelRates(0.001, 0.002)}


class Redis:
    """A stand-in Redis: a memory engine behind a switch. ``fail`` is what the next charges meet:
    None (answered), an outage before sending, an outage after sending (``"lost"``: the charge ran,
    its reply was lost), or an error Redis answered."""

    def __init__(self) -> None:
        self.memory = MemoryEngine()
        self.fail: str | None = None

    def __call__(self, op: Operation[Any]) -> Any:
        if self.fail == "down":
            raise outage("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        if self.fail == "lost" and isinstance(op, (Record, Commit)):
            self.memory.execute(op)  # it ran; the reply never came back
            raise outage("Connection closed by server.", maybe_sent=True)
        if self.fail == "refused":
            raise BackendError("Redis record failed: NOPERM this user has no permissions")
        return self.memory.execute(op)


def budget_on(redis: Redis, **kw: Any) -> tuple[Budget, ScriptedEngine]:
    engine = ScriptedEngine(redis)
    scope = BudgetScope("s", max_tokens_per_session=1000)
    return Budget(scope, RATES, session_id="a", _engine=engine, **kw), engine


def charged(redis: Redis) -> int:
    return int(Budget(BudgetScope("s"), RATES, session_id="a", _engine=redis.memory).summary()["session"]["tokens"])


@pytest.mark.parametrize("mode", ["raise", "deny", "allow"])
def test_a_charge_that_never_reached_redis_is_journaled_then_replayed_once(mode: str) -> None:
    redis = Redis()
    budget, engine = budget_on(redis, on_backend_error=mode)
    redis.fail = "down"
    if mode == "raise":
        with pytest.raises(BackendError) as info:
            budget.record(None, "m", 10, 5)
        assert info.value.journaled
    else:
        assert budget.record(None, "m", 10, 5).journaled
    assert budget.backend_status["journaled"] == 1 and charged(redis) == 0
    redis.fail = None
    assert budget.flush_journal() == 1
    assert charged(redis) == 15
    assert budget.flush_journal() == 0 and charged(redis) == 15  # exactly once
    # the first call found Redis down (registering the alert stream): the charge went straight to
    # the journal, and was sent once, by the replay
    assert len([op for op in engine.ops if isinstance(op, Record)]) == 1


def test_an_ambiguous_charge_that_ran_is_found_in_the_ledger_and_not_sent_again() -> None:
    redis = Redis()
    budget, engine = budget_on(redis, on_backend_error="allow")
    redis.fail = "lost"
    assert budget.record(None, "m", 10, 5).journaled
    assert charged(redis) == 15  # it ran
    redis.fail = None
    engine.ops.clear()
    assert budget.flush_journal() == 1
    assert charged(redis) == 15  # not twice
    assert [type(op) for op in engine.ops] == [LedgerRead]  # looked up, not re-sent
    assert budget.backend_status["already_applied"] == 1


def test_an_ambiguous_charge_with_a_request_id_is_resent_and_deduplicated_by_redis() -> None:
    redis = Redis()
    budget, _engine = budget_on(redis, on_backend_error="allow", ledger_maxlen=0)
    redis.fail = "lost"
    budget.record(None, "m", 10, 5, request_id="r1")
    redis.fail = None
    assert budget.flush_journal() == 1
    assert charged(redis) == 15
    assert budget.backend_status["already_applied"] == 1 and budget.backend_status["unverified"] == 0


def test_an_error_redis_answered_raises_in_every_mode_and_is_not_journaled() -> None:
    for mode in ("raise", "deny", "allow"):
        redis = Redis()
        budget, _engine = budget_on(redis, on_backend_error=mode)
        redis.fail = "refused"
        with pytest.raises(BackendError) as info:
            budget.record(None, "m", 10, 5)
        assert not info.value.journaled and "NOPERM" in str(info.value)
        assert budget.backend_status["journaled"] == 0 and not budget.backend_status["degraded"]


def test_deny_refuses_and_does_not_touch_redis_again_before_the_retry_interval() -> None:
    redis = Redis()
    budget, engine = budget_on(redis, on_backend_error="deny")
    redis.fail = "down"
    with pytest.raises(BudgetExceededError) as info:
        budget.check("m", 1)
    assert info.value.limit_type == "backend_unavailable"
    sent = len(engine.ops)
    for _ in range(5):
        with pytest.raises(BudgetExceededError):
            budget.reserve("m", 1, 1)
    assert len(engine.ops) == sent  # degraded: straight to the policy


def test_allow_admits_within_its_allowance_and_holds_locally() -> None:
    redis = Redis()
    budget, engine = budget_on(redis, on_backend_error="allow", fail_open_max_tokens=100)
    redis.fail = "down"
    hold = budget.reserve("m", 50, 30)  # 80 tokens of the 100 allowed
    assert hold.admitted and budget.backend_status["local_holds"] == 1
    with pytest.raises(BudgetExceededError) as info:
        budget.reserve("m", 20, 10)
    assert info.value.limit_type == "backend_unavailable"
    assert hold.release() is True and budget.backend_status["local_holds"] == 0
    assert not any(isinstance(op, Reserve) and op.hold_id == hold.hold_id for op in engine.ops[1:])


def test_the_async_budget_meets_the_same_policy() -> None:
    redis = Redis()
    engine = AsyncScriptedEngine(redis)
    budget = AsyncBudget(BudgetScope("s"), RATES, session_id="a", _engine=engine, on_backend_error="allow")

    async def scenario() -> int:
        redis.fail = "down"
        record = await budget.record(None, "m", 10, 5)
        assert record.journaled and await budget.check("m", 1)
        redis.fail = None
        return await budget.flush_journal()

    assert asyncio.run(scenario()) == 1
    assert charged(redis) == 15
    assert any(isinstance(op, Check) for op in engine.ops) is False  # the check was admitted locally
