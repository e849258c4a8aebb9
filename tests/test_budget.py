"""The behavioural suite: every test body runs on the embedded engine, on fakeredis (our Lua via
lupa) and on a real redis-server (the ``backend`` fixture)."""

from __future__ import annotations

import logging
import warnings

import pytest

from distbudget import (
    AlertLevel,
    Budget,
    BudgetExceededError,
    BudgetScope,
    BudgetWarning,
    InvalidInputError,
    Limit,
    ModelRates,
    UnknownModelError,
)
from tests.conftest import Backend, Clock

# 1,000 nano-USD per input token, 2,000 per output token: easy exact arithmetic.
RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002), "n": ModelRates(0.004, 0.004)}


def test_seed_quickstart(backend: Backend) -> None:
    scope = BudgetScope(
        name="my-session",
        max_tokens_per_session=50_000,
        max_cost_per_session_usd=1.00,
        max_cost_per_day_usd=5.00,
        alert_at_pct=0.8,
        hard_stop=True,
    )
    budget = backend.budget(scope)
    seen = []
    budget.on_alert(seen.append)
    assert budget.check("gpt-4o", input_tokens=800, output_tokens=200) is True
    record = budget.record(session_id="user-123", model="gpt-4o", input_tokens=800, output_tokens=200)
    expected = ModelRates.for_model("gpt-4o").estimate_cost(800, 200)
    assert record.cost_usd == pytest.approx(expected)
    assert record.total_tokens == 1000
    assert record.session_id == "user-123"
    s = budget.summary()
    assert s["session"]["tokens"] == 1000
    assert s["session"]["cost_usd"] == pytest.approx(expected)
    assert s["day"]["tokens"] == 1000
    assert s["per_model"]["gpt-4o"]["tokens"] == 1000
    assert budget.records == [record]
    assert seen == []


def test_record_over_session_cap_persists_then_raises(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a")
    budget.record(None, "m", 600, 0)
    with pytest.raises(BudgetExceededError) as info:
        budget.record(None, "m", 300, 200)
    err = info.value
    assert err.limit_type == "session_tokens"
    assert err.scope == "s"
    assert err.used == 1100 and err.limit == 1000
    assert err.record is not None and err.record.total_tokens == 500
    assert budget.summary()["session"]["tokens"] == 1100  # money spent is never dropped
    assert len(budget.records) == 2


def test_check_refuses_and_records_nothing(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_cost_per_session_usd=0.01), RATES, session_id="a")
    budget.record(None, "m", 5000, 0)  # $0.005
    assert budget.check("m", 5000, 0) is True  # exactly at the cap is admitted
    with pytest.raises(BudgetExceededError) as info:
        budget.check("m", 5000, 1)
    assert info.value.limit_type == "session_cost_usd"
    assert info.value.used == pytest.approx(0.010002)
    assert info.value.retry_after is None
    assert budget.summary()["session"] == {"tokens": 5000, "cost_usd": 0.005, "requests": 1}


def test_sessions_are_keyed_by_id_and_shared(backend: Backend) -> None:
    scope = BudgetScope("s", max_tokens_per_session=100)
    one = backend.budget(scope, RATES)
    two = backend.budget(scope, RATES)
    one.record("alice", "m", 60, 0)
    two.record("bob", "m", 60, 0)
    with pytest.raises(BudgetExceededError):
        two.record("alice", "m", 60, 0)  # alice's counter is shared by every worker using her id
    assert one.summary("alice")["session"]["tokens"] == 120
    assert one.summary("bob")["session"]["tokens"] == 60
    assert two.session_id == "alice"  # the session of the latest record


def test_reset_session(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=100), RATES, session_id="a")
    budget.record(None, "m", 90, 0)
    budget.reset_session()
    assert budget.summary()["session"]["tokens"] == 0
    assert budget.summary()["total"]["tokens"] == 90
    budget.record(None, "m", 90, 0)


def test_rolling_day_window_ages_out_by_bucket(backend: Backend, clock: Clock) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_day=1000), RATES, clock=clock, session_id="a")
    clock.t = 1_800_000_000.0 - (1_800_000_000 % 900)  # start of a 15-minute bucket
    budget.record(None, "m", 700, 0)
    clock.advance(3600)
    budget.record(None, "m", 300, 0)
    with pytest.raises(BudgetExceededError) as info:
        budget.check("m", 1, 0)
    # the first charge leaves when its whole bucket has left the window: 24 h + 15 min after it
    assert info.value.retry_after == pytest.approx(86400 + 900 - 3600)
    clock.advance(86400 - 3600 + 899)
    assert budget.summary()["day"]["tokens"] == 1000
    with pytest.raises(BudgetExceededError):
        budget.check("m", 1, 0)
    clock.advance(1)
    assert budget.summary()["day"]["tokens"] == 300
    assert budget.check("m", 700, 0)
    assert budget.summary()["session"]["tokens"] == 1000  # the session does not roll


def test_per_model_limits_are_cumulative(backend: Backend) -> None:
    scope = BudgetScope("s", max_tokens_per_model={"m": 100}, max_cost_per_model_usd={"n": 0.001})
    budget = backend.budget(scope, RATES)
    budget.record("a", "m", 80, 0)
    budget.record("b", "n", 200, 0)  # 200 x 4,000 nano = $0.0008
    budget.reset_session("a")
    with pytest.raises(BudgetExceededError) as info:
        budget.record("c", "m", 30, 0)
    assert info.value.limit_type == "model_m_tokens"
    with pytest.raises(BudgetExceededError) as info:
        budget.check("n", 100, 0, session_id="z")
    assert info.value.limit_type == "model_n_cost_usd"
    s = budget.summary()
    assert s["per_model"]["m"]["tokens"] == 110
    assert s["per_model"]["n"]["cost_usd"] == pytest.approx(0.0008)
    assert s["limits"]["model_m_tokens"]["used"] == 110


def test_request_rate_limit_with_retry_after(backend: Backend, clock: Clock) -> None:
    clock.t = 1_800_000_040.0
    scope = BudgetScope("s", limits=[Limit("requests", 3, "1m")])
    budget = backend.budget(scope, RATES, clock=clock)
    for _ in range(3):
        budget.check("m", 1)
        budget.record("a", "m", 1, 0)
        clock.advance(10)
    with pytest.raises(BudgetExceededError) as info:
        budget.check("m", 1)
    assert info.value.limit_type == "minute_requests"
    # the first request's 1 s bucket leaves the window 61 s after it started; 30 s have passed
    assert info.value.retry_after == pytest.approx(31)
    clock.advance(info.value.retry_after)
    assert budget.check("m", 1)


def test_alerts_fire_once_per_crossing(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=100, alert_at_pct=0.8), RATES, session_id="a")
    alerts = []
    budget.on_alert(alerts.append)
    budget.record(None, "m", 50, 0)
    assert alerts == []
    budget.record(None, "m", 30, 0)
    assert [a.level for a in alerts] == [AlertLevel.WARNING]
    assert alerts[0].limit_type == "session_tokens" and alerts[0].pct == pytest.approx(0.8)
    budget.record(None, "m", 10, 0)
    assert len(alerts) == 1  # no storm above the threshold
    with pytest.raises(BudgetExceededError):
        budget.record(None, "m", 20, 0)
    assert [a.level for a in alerts] == [AlertLevel.WARNING, AlertLevel.CRITICAL]
    with pytest.raises(BudgetExceededError):
        budget.record(None, "m", 1, 0)
    assert len(alerts) == 2
    assert budget.alerts == alerts
    budget.reset_session()  # a reset re-arms
    budget.record(None, "m", 85, 0)
    assert [a.level for a in alerts][2:] == [AlertLevel.WARNING]


def test_rolling_alert_rearms_only_below_margin(backend: Backend, clock: Clock) -> None:
    clock.t = 1_800_000_000.0
    scope = BudgetScope("s", limits=[Limit("tokens", 100, "10s")], alert_at_pct=0.5)
    budget = backend.budget(scope, RATES, clock=clock)
    alerts = []
    budget.on_alert(alerts.append)
    budget.record("a", "m", 50, 0)  # 50 % -> WARNING
    clock.advance(11)  # the 50 aged out: usage 0
    budget.record("a", "m", 46, 0)  # back below the 45 re-arm margin before this charge ... crosses?
    assert len(alerts) == 1  # 46 < 50: re-armed but not crossed
    budget.record("a", "m", 4, 0)  # 50 -> WARNING again (it had re-armed at 0)
    assert len(alerts) == 2
    clock.advance(11)
    budget.record("a", "m", 50, 0)  # hovering: usage fell to 0 (re-armed) and crossed again
    assert len(alerts) == 3
    budget.record("a", "m", 0, 0)  # no change in usage: no alert
    assert len(alerts) == 3


def test_callback_errors_are_logged_not_raised(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=10), RATES, session_id="a")

    def broken(_alert: object) -> None:
        raise RuntimeError("pager down")

    got = []
    budget.on_alert(broken)
    budget.on_alert(got.append)
    with caplog.at_level(logging.ERROR, logger="distbudget"):
        budget.record(None, "m", 9, 0)
    assert "pager down" in caplog.text
    assert len(got) == 1
    assert budget.summary()["session"]["tokens"] == 9


def test_soft_budget_warns_instead_of_raising(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=10, hard_stop=False), RATES, session_id="a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        budget.record(None, "m", 20, 0)
        assert budget.check("m", 1) is False
    assert [w.category for w in caught if w.category is not ResourceWarning] == [BudgetWarning, BudgetWarning]
    assert budget.summary()["session"]["tokens"] == 20


def test_unknown_model_is_an_explicit_policy(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_cost_per_session_usd=1))
    with pytest.raises(UnknownModelError):
        budget.record("a", "my-finetune", 10, 10)
    with pytest.raises(KeyError):
        budget.estimate("my-finetune", 10)
    assert budget.summary()["session"]["tokens"] == 0
    fallback = backend.budget(BudgetScope("s2"), default_rates=ModelRates(0.01, 0.01))
    with pytest.warns(BudgetWarning):
        record = fallback.record("a", "my-finetune", 1000, 0)
    assert record.cost_usd == pytest.approx(0.01)


def test_custom_rates_and_estimate(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s"), rates={"my-model": ModelRates(input_per_1k=0.001, output_per_1k=0.002)})
    assert budget.estimate("my-model", 1000, 1000) == pytest.approx(0.003)
    assert budget.estimate("gpt-4o-mini", 1000, 0) == pytest.approx(ModelRates.for_model("gpt-4o-mini").input_per_1k)
    assert budget.record("a", "my-model", 1000, 1000).cost_nano_usd == 3_000_000


def test_request_id_is_charged_once(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s"), RATES, session_id="a")
    first = budget.record(None, "m", 10, 5, request_id="req-1")
    again = budget.record(None, "m", 10, 5, request_id="req-1")
    assert again.duplicate and not first.duplicate
    assert again.cost_nano_usd == first.cost_nano_usd
    budget.record(None, "m", 10, 5, request_id="req-2")
    assert budget.summary()["session"]["tokens"] == 30


def test_request_ids_are_per_scope_even_inside_one_tree(backend: Backend) -> None:
    team = BudgetScope("team")
    alice = backend.budget(BudgetScope("alice", parent=team), RATES, session_id="a")
    bob = backend.budget(BudgetScope("bob", parent=team), RATES, session_id="a")
    assert not alice.record(None, "m", 10, 0, request_id="call-1").duplicate
    assert not bob.record(None, "m", 10, 0, request_id="call-1").duplicate  # another scope's call
    assert alice.record(None, "m", 10, 0, request_id="call-1").duplicate
    assert backend.budget(team, RATES).summary()["total"]["tokens"] == 20


def test_a_parent_named_outside_a_manager_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="by name"):
        Budget(BudgetScope("alice", parent="team-a"))


def test_reservation_holds_then_commits(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=100), RATES, session_id="a")
    res = budget.reserve("m", 30, 40)
    assert budget.summary()["limits"]["session_tokens"]["held"] == 70
    with pytest.raises(BudgetExceededError):
        budget.reserve("m", 20, 20)  # 70 held + 40 > 100
    assert budget.summary()["limits"]["session_tokens"]["held"] == 70  # the refusal held nothing
    record = res.commit(30, 10)
    assert record.total_tokens == 40 and not record.over_hold
    lim = budget.summary()["limits"]["session_tokens"]
    assert (lim["used"], lim["held"], lim["remaining"]) == (40, 0, 60)
    with budget.reserve("m", 10, 10):
        pass  # left without commit: released
    assert budget.summary()["limits"]["session_tokens"]["held"] == 0


def test_hierarchy_counts_against_ancestors(backend: Backend) -> None:
    org = BudgetScope("org", max_tokens_per_day=150)
    team = BudgetScope("team", max_tokens_per_day=1000, parent=org)
    alice = backend.budget(BudgetScope("alice", max_tokens_per_session=100, parent=team), RATES)
    bob = backend.budget(BudgetScope("bob", parent=team), RATES)
    alice.record("s", "m", 90, 0)
    with pytest.raises(BudgetExceededError) as info:
        bob.check("m", 61, session_id="s")
    assert info.value.scope == "org" and info.value.limit_type == "day_tokens"
    bob.record("s", "m", 60, 0)
    s = alice.summary()
    assert s["limits"]["org:day_tokens"]["used"] == 150
    assert s["limits"]["team:day_tokens"]["used"] == 150
    assert s["session"]["tokens"] == 90


def test_manager_registry(backend: Backend) -> None:
    mgr = backend.manager()
    mgr.register(BudgetScope(name="user-alice", max_cost_per_day_usd=2.00))
    mgr.register(BudgetScope(name="user-bob", max_cost_per_day_usd=5.00))
    rec = mgr.record("user-alice", session_id="s1", model="gpt-4o-mini", input_tokens=100, output_tokens=50)
    assert rec.cost_usd == pytest.approx(ModelRates.for_model("gpt-4o-mini").estimate_cost(100, 50))
    summaries = mgr.all_summaries()
    assert set(summaries) == {"user-alice", "user-bob"}
    assert summaries["user-alice"]["day"]["tokens"] == 150
    assert summaries["user-bob"]["day"]["tokens"] == 0
    assert mgr.check("user-bob", "gpt-4o", 10) is True
    with pytest.raises(KeyError):
        mgr.record("nobody", "s", "gpt-4o", 1, 1)
    mgr.remove("user-bob")
    with pytest.raises(KeyError):
        mgr.summary("user-bob")


def test_every_key_has_a_ttl_or_is_owned(backend: Backend) -> None:
    if backend.store is None:
        pytest.skip("TTLs are a Redis matter")
    scope = BudgetScope("ttl", max_tokens_per_session=100, max_tokens_per_day=1000, limits=[Limit("requests", 5, "1m")])
    budget = backend.budget(scope, RATES, session_id="a")
    budget.record(None, "m", 90, 0, request_id="r")  # WARNING: the alert stream too
    budget.reserve("m", 1, 1)
    owned = {
        "distbudget:{ttl}:t:ttl",
        "distbudget:{ttl}:alerts",
        "distbudget:{ttl}:ledger",
        "distbudget:alert-streams",
    }
    for key in backend.store.scan_iter(count=1000):
        name = key.decode()
        ttl = backend.store.pttl(key)
        assert (name in owned) == (ttl == -1), (name, ttl)


def test_reads_of_sessions_never_charged_leave_no_state(backend: Backend) -> None:
    """check() and summary() of a session never charged write nothing (Redis's HMGET / HGETALL
    create no key; the embedded engine must not either): a stream of new session ids, each read
    once, leaves no state behind. A refusal is an event: it leaves its count, its ledger entry, its
    alert and the session's armed REFUSED alert, which expires with the session."""
    scope = BudgetScope("reads", max_tokens_per_session=100, limits=[Limit("requests", 5, "1m")])
    budget = backend.budget(scope, RATES, session_ttl=3600)
    budget.record("charged", "m", 10, 0)

    def keys() -> list[bytes]:
        every = getattr(backend.store, "ALL_NODES", None)  # a Cluster: every node's
        return sorted(backend.store.keys("*", **({"target_nodes": every} if every else {})))

    def state() -> object:
        if backend.store is not None:
            return keys()
        engine = backend.memory
        return {name: len(getattr(engine, name)) for name in ("_hashes", "_expires", "_trees", "_windows")}

    before = state()
    for i in range(200):
        assert budget.check("m", 10, session_id=f"new-{i}")
        assert budget.summary(f"new-{i}")["session"]["tokens"] == 0
    assert state() == before
    for i in range(3):
        with pytest.raises(BudgetExceededError):
            budget.reserve("m", 500, 0, session_id=f"refused-{i}")
    assert budget.summary()["limits"]["session_tokens"]["refusals"] == 3
    if backend.store is None:
        assert backend.memory is not None
        sessions = [k for k in backend.memory._hashes if ":refused-" in k]
        assert len(sessions) == 3 and all(k in backend.memory._expires for k in sessions)
        return
    new = sorted(set(keys()) - set(before))  # type: ignore[arg-type]
    sessions = [k for k in new if b":refused-" in k]
    assert len(sessions) == 3 and all(0 < backend.store.pttl(k) <= 3_600_000 for k in sessions)
    assert {k.rsplit(b":", 1)[-1] for k in new if k not in sessions} <= {b"alerts", b"ledger"}


def test_extra_alert_thresholds_fire_info_once(backend: Backend) -> None:
    scope = BudgetScope("s", max_tokens_per_session=100, alert_thresholds=[0.5, 0.8, 0.9])
    budget = backend.budget(scope, RATES, session_id="a")
    alerts = []
    budget.on_alert(alerts.append)
    budget.record(None, "m", 55, 0)
    budget.record(None, "m", 1, 0)
    assert [(a.level, a.limit_type, a.limit) for a in alerts] == [(AlertLevel.INFO, "session_tokens", 100)]
    budget.record(None, "m", 40, 0)  # 96 %: WARNING at 80 % (alert_at_pct) and INFO at 90 %
    assert sorted(a.level.value for a in alerts[1:]) == ["info", "warning"]
    assert [a.pct for a in alerts if a.level is AlertLevel.INFO] == [0.55, 0.96]
    assert set(budget.summary()["limits"]) == {"session_tokens"}  # thresholds are not limits
    assert budget.check("m", 4)  # and never refuse
    with pytest.raises(ValueError):
        BudgetScope("bad", alert_thresholds=[1.5])


def test_script_cache_loss_is_invisible(backend: Backend) -> None:
    if backend.kind != "redis":
        pytest.skip("SCRIPT FLUSH on a real server")
    budget = backend.budget(BudgetScope("flush", max_tokens_per_session=100), RATES, session_id="a")
    budget.record(None, "m", 10, 0)
    backend.store.script_flush()
    backend.store.function_flush()  # distbudget loads no Functions: nothing of ours to lose
    budget.record(None, "m", 10, 0)  # NOSCRIPT is recovered by reloading the script
    with budget.reserve("m", 5, 5) as hold:
        backend.store.script_flush()
        hold.commit(5, 5)
    assert budget.summary()["session"]["tokens"] == 30


def test_alert_at_zero_alerts_on_the_first_usage(backend: Backend) -> None:
    """agent-budget's ``alert_at_pct=0.0`` means "alert on any usage": a WARNING at the first charge."""
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=100, alert_at_pct=0.0, hard_stop=False), RATES)
    budget.record("a", "m", 50, 0)
    assert [(a.level, a.pct) for a in budget.alerts] == [(AlertLevel.WARNING, 0.5)]
    budget.record("a", "m", 10, 0)
    assert len(budget.alerts) == 1  # once per crossing
