"""Issue 13: no money slips through the edges. Model names, numbers, unfinished holds, the seed's
drop-in contract and clear errors, each on every engine (embedded, fakeredis, Redis, Cluster; sync and
async) through the public API, each asserting what a user would notice: what was charged, refused,
held, written."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import pytest

from distbudget import (
    AlertLevel,
    Budget,
    BudgetExceededError,
    BudgetScope,
    BudgetWarning,
    DistBudgetError,
    InvalidInputError,
    Limit,
    ModelRates,
    UnknownModelError,
)
from distbudget._core.bounds import MAX_DURATION_S, MAX_METADATA_BYTES
from distbudget._core.keys import KeySpace
from distbudget._core.money import MAX_AMOUNT
from tests.conftest import Backend, Clock
from tests.test_input import snapshot

RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002)}
SPELLINGS = ["gpt-4o", "openai/gpt-4o", "GPT-4o", "gpt-4o-2024-08-06", "gpt-4o-latest", "OpenAI/GPT-4O-2024-11-20"]


def quiet(fn: Any) -> Any:
    """Call ``fn`` with warnings recorded (not raised), returning (value, warnings)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        value = fn()
    return value, seen


# ---- model identity ------------------------------------------------------------------------------


def test_a_per_model_cap_binds_every_spelling_of_the_model(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_model={"gpt-4o": 1000}), session_id="a")
    admitted = 0
    for name in SPELLINGS:
        for _ in range(3):
            try:
                budget.reserve(name, 300, 0).commit(300, 0)
                admitted += 1
            except BudgetExceededError as err:
                assert err.limit_type == "model_gpt-4o_tokens"
    assert admitted == 3  # 900 tokens; the fourth call of any spelling would make 1,200
    summary = budget.summary()
    assert list(summary["per_model"]) == ["gpt-4o"]
    assert summary["per_model"]["gpt-4o"]["tokens"] == 900


def test_a_windowed_model_limit_binds_every_spelling(backend: Backend, clock: Clock) -> None:
    scope = BudgetScope("s", limits=[Limit("tokens", 1000, "1h", model="gpt-4o")])
    budget = backend.budget(scope, session_id="a", clock=clock)
    budget.record(None, "gpt-4o", 600, 0)
    with pytest.raises(BudgetExceededError) as info:
        budget.check("openai/gpt-4o-2024-08-06", 600)
    assert info.value.limit_type == "model_gpt-4o_hour_tokens"
    with pytest.raises(BudgetExceededError):
        budget.record(None, "GPT-4o-latest", 600, 0)  # charged (money spent), then over the limit
    assert budget.summary()["limits"]["model_gpt-4o_hour_tokens"]["used"] == 1200


def test_a_rate_override_applies_to_every_spelling(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s"), {"gpt-4o": ModelRates(1.0, 2.0)}, session_id="a")
    for name in SPELLINGS:
        assert budget.estimate(name, 1000, 1000) == pytest.approx(3.0)
    assert budget.record(None, "openai/gpt-4o-2024-08-06", 1000, 0).cost_nano_usd == 10**9


def test_the_ledger_keeps_the_raw_name_and_the_canonical_id(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s"), session_id="a")
    record = budget.record(None, "OpenAI/GPT-4o-2024-08-06", 10, 1)
    assert record.model == "OpenAI/GPT-4o-2024-08-06"
    assert record.canonical_model == "gpt-4o"
    (entry,) = budget.ledger()
    assert (entry.model, entry.canonical_model) == ("OpenAI/GPT-4o-2024-08-06", "gpt-4o")


def test_per_model_counters_stay_bounded_by_the_real_models(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s"), session_id="a")
    names = [f"{p}{m}{d}" for p in ("", "openai/", "azure/") for m in ("gpt-4o", "GPT-4O") for d in ("", "-latest")]
    budget.record_many([("a", name, 1, 0) for name in names])
    assert budget.summary()["per_model"] == {
        "gpt-4o": {"tokens": 12, "cost_usd": pytest.approx(12 * 2.5e-6), "requests": 12}
    }
    if backend.store is not None:  # the totals hash: 't', 'c', 'r' and one field per metric of one model
        assert backend.store.hlen(KeySpace("distbudget", "s").totals("s")) == 3 + 3


def test_a_limit_naming_an_unknown_model_warns_and_strict_models_raises(backend: Backend) -> None:
    scope = BudgetScope("s", limits=[Limit("tokens", 1000, "1h", model="gpt4o")])  # typo
    with pytest.warns(BudgetWarning, match="gpt4o"):
        backend.budget(scope)
    with pytest.warns(BudgetWarning, match="gpt-4x"):
        backend.budget(BudgetScope("t"), {"gpt-4x": ModelRates(1, 1)}, default_rates=ModelRates(1, 1))
    with pytest.raises(UnknownModelError, match="gpt4o"):
        backend.budget(scope, strict_models=True)
    # a model priced by the budget's own rates is known
    _, seen = quiet(lambda: backend.budget(BudgetScope("u", max_tokens_per_model={"m": 5}), RATES))
    assert not [w for w in seen if issubclass(w.category, BudgetWarning)]


# ---- numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [sys.maxsize, 9.3e12, 1e17, MAX_DURATION_S + 1, 0.0004, 0.0, -1.0, float("nan")])
def test_a_hold_ttl_outside_its_range_is_refused_before_anything_is_written(backend: Backend, ttl: float) -> None:
    budget = backend.budget(BudgetScope("s", max_cost_per_session_usd=1.0), RATES, session_id="a")
    held = budget.reserve("m", 100_000, 100_000)  # $0.30 held
    before = snapshot(backend, budget)
    with pytest.raises(InvalidInputError, match="ttl"):
        budget.reserve("m", 100_000, 100_000, ttl=ttl)
    assert snapshot(backend, budget) == before
    assert budget.summary()["limits"]["session_cost_usd"]["held"] == pytest.approx(0.3)
    held.release()


def test_the_extremes_of_the_duration_range_are_accepted(backend: Backend, clock: Clock) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=10), RATES, session_id="a", clock=clock)
    long = budget.reserve("m", 5, 0, ttl=MAX_DURATION_S)
    short = budget.reserve("m", 5, 0, ttl=0.001)
    with pytest.raises(BudgetExceededError):
        budget.check("m", 1)
    clock.advance(0.002)
    assert budget.summary()["limits"]["session_tokens"]["held"] == 5  # the 1 ms hold lapsed, the other holds
    assert long.commit(5, 0).total_tokens == 5 and not short.release()


@pytest.mark.parametrize("option", ["session_ttl", "hold_ttl", "request_ttl"])
@pytest.mark.parametrize("value", [sys.maxsize, 1e17, 0.0004])
def test_budget_durations_outside_their_range_are_refused(backend: Backend, option: str, value: float) -> None:
    with pytest.raises(InvalidInputError, match=option):
        backend.budget(BudgetScope("s"), RATES, **{option: value})


def test_a_huge_session_ttl_no_longer_deletes_the_session(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_ttl=MAX_DURATION_S)
    for _ in range(2):
        budget.record("x", "m", 500, 0)
    with pytest.raises(BudgetExceededError):
        budget.record("x", "m", 500, 0)
    assert budget.summary("x")["session"]["tokens"] == 1500


def test_a_call_whose_cost_a_counter_cannot_hold_is_refused_on_both_engines(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_cost_per_day_usd=1.0), session_id="a")
    budget.record(None, "gpt-4o", 1000, 0)
    before = snapshot(backend, budget)
    for call in (
        lambda: budget.record(None, "gpt-4o", 0, MAX_AMOUNT),
        lambda: budget.check("gpt-4o", 0, MAX_AMOUNT),
        lambda: budget.reserve("gpt-4o", 0, MAX_AMOUNT),
        lambda: budget.record(None, "gpt-4o", MAX_AMOUNT, MAX_AMOUNT),  # the token sum too
        lambda: budget.estimate("gpt-4o", 0, MAX_AMOUNT),
    ):
        with pytest.raises(InvalidInputError):
            call()
    assert snapshot(backend, budget) == before
    with pytest.raises(BudgetExceededError):
        for _ in range(20):
            budget.reserve("gpt-4o", 40_000, 0).commit(40_000, 0)  # $0.10 each
    assert budget.summary()["day"]["cost_usd"] <= 1.0 + 1e-9


def test_a_counter_is_never_pushed_beyond_what_it_holds_exactly(backend: Backend) -> None:
    huge = {"h": ModelRates(input_per_1k=4_000_000, output_per_1k=0)}  # $4M per 1K tokens
    budget = backend.budget(BudgetScope("s"), huge, session_id="a")
    budget.record(None, "h", 1000, 0)
    budget.record(None, "h", 1000, 0)  # $8M: still exact
    before = snapshot(backend, budget)
    with pytest.raises(InvalidInputError, match="counter"):
        budget.record(None, "h", 1000, 0)  # $12M would pass 2**53 nano-USD
    assert snapshot(backend, budget) == before
    assert budget.summary()["total"]["cost_usd"] == pytest.approx(8_000_000)


LONE = ["\ud800", "a\udfffb"]


@pytest.mark.parametrize("bad", LONE)
def test_lone_surrogates_are_invalid_input_and_write_nothing(backend: Backend, bad: str) -> None:
    budget = backend.budget(BudgetScope("s"), {**RATES, f"m{bad}": ModelRates(1, 1)}, session_id="a")
    budget.record(None, "m", 1, 1)
    before = snapshot(backend, budget)
    for call in (
        lambda: budget.record(bad, "m", 1, 1),
        lambda: budget.record(None, f"m{bad}", 1, 1),
        lambda: budget.record(None, "m", 1, 1, {"note": bad}),
        lambda: budget.record(None, "m", 1, 1, {bad: 1}),
        lambda: budget.record(None, "m", 1, 1, request_id=bad),
        lambda: budget.reserve("m", 1, 1, session_id=bad),
        lambda: budget.check(f"m{bad}", 1),
    ):
        with pytest.raises(InvalidInputError, match="surrogate"):
            call()
    assert snapshot(backend, budget) == before
    with pytest.raises(InvalidInputError, match="surrogate"):
        BudgetScope(f"s{bad}")


def test_metadata_is_capped_at_4_kb_of_json(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=100), RATES, session_id="a")
    fits = {"note": "x" * (MAX_METADATA_BYTES - 20)}
    assert budget.record(None, "m", 1, 1, fits).metadata == fits
    before = snapshot(backend, budget)
    with pytest.raises(InvalidInputError, match="4096"):
        budget.record(None, "m", 1, 1, {"note": "x" * MAX_METADATA_BYTES})
    assert snapshot(backend, budget) == before
    res = budget.reserve("m", 1, 1)
    with pytest.raises(InvalidInputError, match="4096"):
        res.commit(1, 1, {"blob": "é" * 3000})  # bytes of UTF-8, not characters
    assert (
        budget.summary()["limits"]["session_tokens"]["held"] == 2 and res.release()
    )  # refused: the hold was still held
    assert len(budget.ledger()) == 1


# ---- holds that end without a commit ------------------------------------------------------------------


def test_leaving_a_reservation_uncommitted_warns_is_in_the_ledger_and_counted(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a")
    with pytest.warns(BudgetWarning, match="without commit"), budget.reserve("m", 100, 200):
        pass
    summary = budget.summary()
    assert summary["limits"]["session_tokens"]["held"] == 0 and summary["session"]["tokens"] == 0
    assert summary["holds"]["released_uncommitted"] == 1
    (entry,) = budget.ledger()
    assert entry.kind == "released_uncommitted" and entry.tokens == 300 and entry.session_id == "a"


def test_on_uncommitted_charge_hold_charges_the_worst_case(backend: Backend) -> None:
    budget = backend.budget(
        BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a", on_uncommitted="charge_hold"
    )
    with pytest.warns(BudgetWarning, match="without commit"), budget.reserve("m", 100, 200):
        pass
    summary = budget.summary()
    assert (summary["session"]["tokens"], summary["limits"]["session_tokens"]["held"]) == (300, 0)
    assert summary["holds"]["charged_uncommitted"] == 1
    (entry,) = budget.ledger()
    assert entry.kind == "charge" and entry.tokens == 300 and entry.uncommitted == "exit"


def test_on_uncommitted_is_validated() -> None:
    with pytest.raises(InvalidInputError, match="on_uncommitted"):
        Budget(BudgetScope("s"), RATES, on_uncommitted="drop")


def test_an_exception_inside_the_block_releases_without_warning(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        with pytest.raises(RuntimeError), budget.reserve("m", 100, 200):
            raise RuntimeError("the LLM call failed")
    assert budget.summary()["limits"]["session_tokens"]["held"] == 0


def test_a_refused_commit_leaves_the_hold_held_for_a_corrected_commit(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a")
    res = budget.reserve("m", 100, 200)
    with pytest.raises(InvalidInputError, match="cached_input_tokens"):
        res.commit(100, 50, cached_input_tokens=80, cache_write_tokens=40)  # the naive Anthropic mapping
    assert budget.summary()["limits"]["session_tokens"]["held"] == 300
    record = res.commit(120, 50, cached_input_tokens=80, cache_write_tokens=40)
    assert (record.cached_input_tokens, record.cache_write_tokens) == (80, 40)
    summary = budget.summary()
    assert (summary["session"]["tokens"], summary["limits"]["session_tokens"]["held"]) == (170, 0)


def test_a_block_left_by_a_refused_commit_charges_the_hold_flagged(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a")
    with pytest.raises(InvalidInputError), budget.reserve("m", 100, 200) as res:
        res.commit(100, 50, cached_input_tokens=80, cache_write_tokens=40)
    summary = budget.summary()
    assert (summary["session"]["tokens"], summary["limits"]["session_tokens"]["held"]) == (300, 0)
    (entry,) = budget.ledger()
    assert entry.kind == "charge" and entry.uncommitted == "commit_refused" and entry.tokens == 300


def test_a_hold_that_expired_before_its_commit_is_flagged_and_alerted(backend: Backend, clock: Clock) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a", clock=clock)
    seen: list[Any] = []
    budget.on_alert(seen.append)
    res = budget.reserve("m", 100, 100, ttl=30)
    clock.advance(31)
    record = res.commit(100, 100)
    assert record.hold_expired and record.total_tokens == 200  # charged all the same
    assert budget.summary()["session"]["tokens"] == 200
    (alert,) = [a for a in seen if a.limit_type == "hold_expired"]
    assert alert.level == AlertLevel.WARNING and alert.scope == "s"
    live = budget.reserve("m", 10, 10, ttl=30)
    assert not live.commit(10, 10).hold_expired


def test_extend_keeps_a_long_call_held(backend: Backend, clock: Clock) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a", clock=clock)
    res = budget.reserve("m", 400, 400, ttl=30)
    clock.advance(20)
    assert res.extend(60) is True  # the lease now ends 60 s from now
    clock.advance(50)
    assert budget.summary()["limits"]["session_tokens"]["held"] == 800
    with pytest.raises(BudgetExceededError):
        budget.check("m", 300)
    assert not res.commit(400, 400).hold_expired
    with pytest.raises(InvalidInputError, match="ttl"):
        budget.reserve("m", 1, 1).extend(sys.maxsize)
    late = budget.reserve("m", 1, 1, ttl=1)
    clock.advance(2)
    assert late.extend(60) is False  # it had lapsed: nothing is held again


def test_usage_records_and_ledger_entries_carry_cache_and_reasoning_tokens(backend: Backend) -> None:
    rates = {
        "r": ModelRates(0.001, 0.002, cached_input_per_1k=0.0001, cache_write_per_1k=0.002, reasoning_per_1k=0.004)
    }
    budget = backend.budget(BudgetScope("s"), rates, session_id="a")
    record = budget.record(None, "r", 1000, 500, cached_input_tokens=600, cache_write_tokens=100, reasoning_tokens=300)
    assert (record.cached_input_tokens, record.cache_write_tokens, record.reasoning_tokens) == (600, 100, 300)
    (entry,) = budget.ledger()
    assert (entry.cached_input_tokens, entry.cache_write_tokens, entry.reasoning_tokens) == (600, 100, 300)
    assert entry.cost_nano_usd == record.cost_nano_usd


def test_commit_and_record_take_a_usage_value(backend: Backend) -> None:
    from distbudget import Usage

    rates = {"r": ModelRates(0.001, 0.002, cached_input_per_1k=0.0001, cache_write_per_1k=0.00125)}
    budget = backend.budget(BudgetScope("s"), rates, session_id="a")
    # Anthropic reports cache reads and writes beside input_tokens; Usage adds them up
    anthropic = Usage.from_anthropic(
        {"input_tokens": 20, "cache_read_input_tokens": 80, "cache_creation_input_tokens": 40, "output_tokens": 50}
    )
    assert (anthropic.input_tokens, anthropic.cached_input_tokens, anthropic.cache_write_tokens) == (140, 80, 40)
    with budget.reserve("r", 200, 100) as res:
        committed = res.commit(anthropic)
    recorded = budget.record(None, "r", anthropic)
    for rec in (committed, recorded):
        assert (rec.input_tokens, rec.output_tokens, rec.cached_input_tokens, rec.cache_write_tokens) == (
            140,
            50,
            80,
            40,
        )
    assert committed.cost_nano_usd == recorded.cost_nano_usd == 20 * 1000 + 80 * 100 + 40 * 1250 + 50 * 2000


# ---- the seed's drop-in contract ----------------------------------------------------------------------


def test_manager_remove_answers_and_get_of_an_unknown_scope_is_none(backend: Backend) -> None:
    from distbudget import UnknownScopeError

    mgr = backend.manager()
    mgr.register(BudgetScope("to_remove"), RATES)
    assert mgr.remove("to_remove") is True
    assert mgr.remove("to_remove") is False
    assert mgr.get("to_remove") is None
    for call in (
        lambda: mgr.record("to_remove", "s", "m", 1, 1),
        lambda: mgr.check("to_remove", "m", 1),
        lambda: mgr.summary("to_remove"),
        lambda: mgr.reserve("to_remove", "m", 1, 1),
    ):
        with pytest.raises(UnknownScopeError, match="to_remove") as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, DistBudgetError)


def test_model_rates_default_and_alert_at_zero_as_in_the_seed() -> None:
    assert ModelRates().input_per_1k == ModelRates().output_per_1k == 0.002
    budget = Budget(BudgetScope("s", max_tokens_per_session=100, alert_at_pct=0.0), RATES)
    budget.record("a", "m", 1, 0)
    assert [a.level for a in budget.alerts] == [AlertLevel.WARNING]


# ---- clear errors ----------------------------------------------------------------------------------------


def test_a_tls_option_on_a_plain_url_says_what_is_wrong() -> None:
    with pytest.raises(InvalidInputError, match="rediss://"):
        budget = Budget(BudgetScope("s"), RATES, redis="redis://127.0.0.1:1/0?ssl_cert_reqs=required")
        budget.record("a", "m", 1, 1)


def test_a_url_passed_as_rates_says_so() -> None:
    with pytest.raises(TypeError, match="redis="):
        Budget(BudgetScope("s"), "redis://127.0.0.1:6379/0")  # type: ignore[arg-type]


def test_a_refusal_names_the_requesting_and_the_blocking_scope(backend: Backend) -> None:
    team = BudgetScope("team-a", max_cost_per_day_usd=0.001)
    budget = backend.budget(BudgetScope("alice", parent=team), RATES, session_id="a")
    with pytest.raises(BudgetExceededError) as info:
        budget.check("m", 1000, 0)  # $0.001 held against itself is fine; 1001 is not
        budget.check("m", 1001, 0)
    message = str(info.value)
    assert "for scope 'alice'" in message and "'team-a'" in message and "day_cost_usd" in message
    assert message.count("team-a") == 1 and info.value.scope == "team-a"


def test_an_unknown_model_in_a_manager_says_to_pass_register_rates(backend: Backend) -> None:
    mgr = backend.manager()
    mgr.register(BudgetScope("s"))
    with pytest.raises(UnknownModelError, match=r"register\(.*rates="):
        mgr.record("s", "a", "house-model-7", 1, 1)


def test_invalid_input_is_refused_at_the_call_even_while_redis_is_down() -> None:
    budget = Budget(BudgetScope("s"), RATES, redis="redis://127.0.0.1:1/0", on_backend_error="allow")
    for call in (
        lambda: budget.record("\ud800", "m", 1, 1),
        lambda: budget.record("a", "m", 1, 1, {"k": "\udc00"}),
        lambda: budget.record("a", "m", 1, 1, {"k": "x" * 5000}),
        lambda: budget.reserve("m", 1, 1, ttl=1e17),
    ):
        with pytest.raises(InvalidInputError):
            call()
    assert budget.backend_status["journaled"] == 0


# ---- the bounds themselves (pure) ------------------------------------------------------------------------


def test_bounds_are_the_documented_ones() -> None:
    from distbudget._core import bounds

    assert (
        bounds.check_duration(0.001, "ttl") == 0.001 and bounds.check_duration(MAX_DURATION_S, "ttl") == MAX_DURATION_S
    )
    for bad in (0.0009, MAX_DURATION_S * 1.001, float("inf"), float("nan"), -1):
        with pytest.raises(InvalidInputError, match="between 1 ms and 10 years"):
            bounds.check_duration(bad, "ttl")
    with pytest.raises(TypeError):
        bounds.check_duration("60", "ttl")
    with pytest.raises(TypeError):
        bounds.check_duration(True, "ttl")
    assert bounds.check_text("été {x}:*", "name") == "été {x}:*"
    with pytest.raises(InvalidInputError, match="surrogate"):
        bounds.check_text("é\udc80", "name")
    assert (
        bounds.metadata_json({"k": "x" * (MAX_METADATA_BYTES - 8)}) == '{"k":"' + "x" * (MAX_METADATA_BYTES - 8) + '"}'
    )
    with pytest.raises(InvalidInputError, match="4097 bytes"):
        bounds.metadata_json({"k": "x" * (MAX_METADATA_BYTES - 7)})
    bounds.check_amounts(MAX_AMOUNT, MAX_AMOUNT)
    with pytest.raises(InvalidInputError, match="cost"):
        bounds.check_amounts(1, MAX_AMOUNT + 1)
    bounds.check_after(MAX_AMOUNT - 5, 5, "day cost")
    with pytest.raises(InvalidInputError, match="day cost"):
        bounds.check_after(MAX_AMOUNT - 5, 6, "day cost")


def test_a_record_many_charge_a_counter_cannot_hold_is_refused_alone(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s"), {"h": ModelRates(input_per_1k=4_000_000, output_per_1k=0)})
    calls = [("a", "h", 1000, 0), ("a", "h", 1000, 0), ("a", "h", 1000, 0), ("a", "h", 1, 0)]
    with pytest.raises(InvalidInputError, match="9007199254740991"):
        budget.record_many(calls)  # the third would pass 2**53 - 1 nano-USD: refused, the others stand
    total = budget.summary("a")["total"]
    assert (total["tokens"], total["requests"]) == (2001, 3)
    assert [e.tokens for e in budget.ledger()] == [1000, 1000, 1]


def test_async_with_on_a_pending_reservation_settles_like_with() -> None:
    import asyncio

    from distbudget import AsyncBudget

    async def main() -> dict[str, Any]:
        budget = AsyncBudget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a")
        with pytest.warns(BudgetWarning, match="without commit"):
            async with budget.reserve("m", 100, 200):
                pass
        with pytest.raises(InvalidInputError):
            async with budget.reserve("m", 100, 200) as res:
                await res.commit(100, 50, cached_input_tokens=200)
        return await budget.summary()

    summary = asyncio.run(main())
    assert summary["holds"] == {"released_uncommitted": 1, "charged_uncommitted": 1, "expired_before_commit": 0}
    assert summary["session"]["tokens"] == 300 and summary["limits"]["session_tokens"]["held"] == 0


def test_the_scripts_refuse_what_would_fail_after_a_write(redis_server: Any) -> None:
    """The client never sends them, but a script checks the arguments a late write could fail on (a
    request TTL of 0 ms would make SET PX fail after the counters were charged) before its first write."""
    import dataclasses

    from distbudget import BackendError

    admin = redis_server.client()
    admin.flushall()
    budget = Budget(BudgetScope("s", max_tokens_per_session=100), RATES, redis=admin, session_id="a")
    budget.record(None, "m", 1, 1)
    before = sorted((k, admin.dump(k)) for k in admin.keys("*") if b"alert-streams" not in k)
    op = budget._core.record(None, "m", 1, 1, request_id="r").op
    with pytest.raises(BackendError, match="invalid request TTL"):
        budget.engine.execute(dataclasses.replace(op, request_ttl_ms=0))
    assert sorted((k, admin.dump(k)) for k in admin.keys("*") if b"alert-streams" not in k) == before
    hold = budget._core.reserve("m", 1, 1).op
    with pytest.raises(BackendError, match="invalid lease TTL"):
        budget.engine.execute(dataclasses.replace(hold, ttl_us=10**17))
    assert sorted((k, admin.dump(k)) for k in admin.keys("*") if b"alert-streams" not in k) == before
