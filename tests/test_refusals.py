"""Refusals are events (issue 17): every call ``check`` or ``reserve`` refuses is counted per scope
and limit in the atomic step that refused it, fleet-wide; the first refusal of a limit in each of
its windows fires one REFUSED alert across the fleet; alerts name the call that drove them; the
counts reach ``summary()``, the ledger, ``distbudget status --json`` and the Prometheus exporter."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from distbudget import AlertLevel, BudgetExceededError, BudgetManager, BudgetScope, Limit, ModelRates
from distbudget._core.types import RequestedBy
from distbudget.alerts import alert_from_payload
from distbudget.cli import main
from distbudget.exporter import BudgetCollector, registry_for
from tests._procs import context
from tests._threads import run_threads
from tests.conftest import Backend, Clock, RedisServer

RATES = {"m": ModelRates(0.001, 0.002)}


def _tree(backend: Backend, **kw: Any) -> Any:
    """team (1,000 tokens a day) over alice (300 tokens per session)."""
    mgr = backend.manager(**kw)
    mgr.register(BudgetScope("team", max_tokens_per_day=1000), RATES)
    mgr.register(BudgetScope("alice", parent="team", max_tokens_per_session=300), RATES)
    return mgr


def refusals(mgr: Any, scope: str, session: str | None = None) -> dict[str, Any]:
    return {key: lim["refusals"] for key, lim in mgr.summary(scope, session)["limits"].items()}


def refused_alerts(alerts: list[Any]) -> list[Any]:
    return [a for a in alerts if a.level is AlertLevel.REFUSED]


def stream_alerts(client: Any, prefix: str = "distbudget") -> list[Any]:
    """Every alert the fleet's alert streams hold, parsed as a listener parses them."""
    out = []
    for stream in set(client.hvals(f"{prefix}:alert-streams")):
        out += [alert_from_payload(json.loads(fields[b"alert"]), eid.decode()) for eid, fields in client.xrange(stream)]
    return out


# ---- counted per scope and limit, shown in summary() ----------------------------------------------


def test_each_refusal_is_counted_for_its_scope_and_limit(backend: Backend) -> None:
    mgr = _tree(backend)
    assert refusals(mgr, "alice") == {"session_tokens": 0, "team:day_tokens": 0}
    assert mgr.check("alice", "m", 100, 50, session_id="s1")  # admitted: nothing counted
    for _ in range(2):
        with pytest.raises(BudgetExceededError):
            mgr.check("alice", "m", 200, 200, session_id="s1")  # alice's session cap
    with pytest.raises(BudgetExceededError):
        mgr.reserve("alice", "m", 250, 100, session_id="s1")
    mgr.record("team", "bob", "m", 900, 0)
    with pytest.raises(BudgetExceededError) as info:
        mgr.reserve("alice", "m", 100, 100, session_id="s2")  # the team's day
    assert (info.value.scope, info.value.limit_type) == ("team", "day_tokens")
    # counted in the limit's scope: alice's for her cap, the team's for its day (seen from alice too)
    assert refusals(mgr, "alice") == {"session_tokens": 3, "team:day_tokens": 1}
    assert refusals(mgr, "alice", "other-session") == {"session_tokens": 3, "team:day_tokens": 1}
    assert refusals(mgr, "team") == {"day_tokens": 1}
    # refusals charge nothing
    assert mgr.summary("team")["total"] == {"tokens": 900, "cost_usd": pytest.approx(0.9 * 0.001), "requests": 1}
    assert mgr.summary("alice", "s1")["session"]["tokens"] == 0


def test_a_charge_over_a_limit_is_not_a_refusal(backend: Backend) -> None:
    """record() always charges (money spent is never dropped), then raises: no refusal to count."""
    mgr = _tree(backend)
    with pytest.raises(BudgetExceededError):
        mgr.record("alice", "s1", "m", 400, 0)
    assert refusals(mgr, "alice") == {"session_tokens": 0, "team:day_tokens": 0}


def test_without_hard_stop_a_refusal_returns_false_and_is_counted(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("soft", max_tokens_per_session=10, hard_stop=False), RATES, session_id="a")
    with pytest.warns(UserWarning):
        assert budget.check("m", 20, 0) is False
    with pytest.warns(UserWarning):
        assert not budget.reserve("m", 20, 0).admitted
    assert budget.summary()["limits"]["session_tokens"]["refusals"] == 2


def test_bad_input_is_refused_before_anything_is_counted(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=10), RATES, session_id="a")
    for bad in (-1, 1.5, float("nan")):
        with pytest.raises((ValueError, TypeError)):
            budget.check("m", bad, 0)
        with pytest.raises((ValueError, TypeError)):
            budget.reserve("m", 100, bad)
    assert budget.summary()["limits"]["session_tokens"]["refusals"] == 0
    assert budget.ledger() == []


def test_reset_zeroes_the_counts(backend: Backend) -> None:
    mgr = _tree(backend)
    with pytest.raises(BudgetExceededError):
        mgr.check("alice", "m", 400, 0, session_id="s1")
    mgr.get("alice").reset_session("s1")
    assert refusals(mgr, "alice")["session_tokens"] == 1  # cumulative for the scope: a session reset keeps it
    mgr.get("alice").reset("s1")
    assert refusals(mgr, "alice")["session_tokens"] == 0


def test_acquire_counts_only_the_attempt_it_gives_up_on(backend: Backend, clock: Clock) -> None:
    budget = backend.budget(
        BudgetScope("s", limits=[Limit("requests", 2, "1m")]), RATES, clock=clock, sleep=clock.advance
    )
    for _ in range(2):
        budget.acquire("m", 1, 1).commit(1, 1)
    start = clock.t
    budget.acquire("m", 1, 1, timeout=120).commit(1, 1)  # waited for the window: never refused
    assert clock.t > start and budget.summary()["limits"]["minute_requests"]["refusals"] == 0
    budget.acquire("m", 1, 1).commit(1, 1)  # the window full again
    with pytest.raises(BudgetExceededError):
        budget.acquire("m", 1, 1, timeout=1)  # gives up: one refusal, not one per attempt
    assert budget.summary()["limits"]["minute_requests"]["refusals"] == 1


# ---- the REFUSED alert: once per window ---------------------------------------------------------


def test_the_first_refusal_in_a_session_alerts_once_and_names_the_call(backend: Backend) -> None:
    mgr = _tree(backend)
    alice = mgr.get("alice")
    got: list[Any] = []
    alice.on_alert(got.append)
    for _ in range(3):
        with pytest.raises(BudgetExceededError):
            mgr.reserve("alice", "m", 200, 200, session_id="s1")
    [alert] = refused_alerts(got)
    assert (alert.scope, alert.limit_type, alert.session_id, alert.model) == ("alice", "session_tokens", "s1", "m")
    assert alert.requested_by == RequestedBy("alice", "s1", "m")
    assert (alert.used, alert.limit) == (400, 300)  # what the call would have brought it to
    assert alert.message == "Budget refused a call for scope 'alice': session_tokens would reach 133% (400 of 300)"
    assert (alert.alert_id is not None) == (backend.store is not None)  # a stream entry on Redis
    with pytest.raises(BudgetExceededError):
        mgr.check("alice", "m", 400, 0, session_id="s2")  # a new session is a new window
    with pytest.raises(BudgetExceededError):
        mgr.check("alice", "m", 400, 0, session_id="s2")
    assert [a.session_id for a in refused_alerts(got)] == ["s1", "s2"]
    alice.reset_session("s1")  # re-armed by the reset
    with pytest.raises(BudgetExceededError):
        mgr.check("alice", "m", 400, 0, session_id="s1")
    assert [a.session_id for a in refused_alerts(got)] == ["s1", "s2", "s1"]
    assert refusals(mgr, "alice")["session_tokens"] == 6


def test_an_ancestors_refusal_alert_names_the_requesting_scope(backend: Backend) -> None:
    mgr = _tree(backend)
    mgr.record("team", "bob", "m", 950, 0)
    got: list[Any] = []
    mgr.get("alice").on_alert(got.append)
    with pytest.raises(BudgetExceededError):
        mgr.reserve("alice", "m", 100, 0, session_id="s7")
    [alert] = refused_alerts(got)
    assert (alert.scope, alert.limit_type) == ("team", "day_tokens")  # the limit's scope
    assert alert.requested_by == RequestedBy("alice", "s7", "m")  # the call that drove it
    if backend.store is not None:  # the fleet's copy, as listeners read it
        [streamed] = refused_alerts(stream_alerts(backend.store))
        assert (streamed.scope, streamed.requested_by, streamed.used) == ("team", alert.requested_by, 1050)


def test_charge_alerts_name_the_requesting_scope_too(backend: Backend) -> None:
    mgr = _tree(backend)
    got: list[Any] = []
    mgr.get("alice").on_alert(got.append)
    mgr.record("alice", "s1", "m", 250, 0)  # alice's session WARNING (80 % of 300)
    mgr.record("alice", "s2", "m", 250, 0)  # in s2 too; the team's day at 500
    mgr.record("alice", "s3", "m", 200, 0)  # the team at 700
    mgr.record("alice", "s4", "m", 100, 0)  # the team at 800: its WARNING, driven by alice's s4
    team = [a for a in got if a.scope == "team"]
    assert [(a.level, a.requested_by) for a in team] == [(AlertLevel.WARNING, RequestedBy("alice", "s4", "m"))]


def test_a_rolling_window_re_arms_one_window_later(backend: Backend, clock: Clock) -> None:
    scope = BudgetScope("r", limits=[Limit("requests", 1, "1m")])
    budget = backend.budget(scope, RATES, clock=clock, session_id="a")
    got: list[Any] = []
    budget.on_alert(got.append)
    budget.record(None, "m", 1, 0)
    for step in (0, 10, 30):  # refused at 0 s, 10 s, 40 s: one alert
        clock.advance(step)
        with pytest.raises(BudgetExceededError):
            budget.check("m", 1, 0)
    assert len(refused_alerts(got)) == 1
    clock.advance(25)  # 65 s after the alert: a new window (the charge is still in it: refused)
    budget.record(None, "m", 1, 0)
    with pytest.raises(BudgetExceededError):
        budget.check("m", 1, 0)
    assert len(refused_alerts(got)) == 2
    assert budget.summary()["limits"]["minute_requests"]["refusals"] == 4


def test_a_calendar_limit_re_arms_each_period(backend: Backend, clock: Clock) -> None:
    clock.t = 1_800_000_000.0  # 2027-01-15 08:00 UTC
    scope = BudgetScope("c", limits=[Limit("tokens", 100, "calendar_day", tz="UTC")])
    budget = backend.budget(scope, RATES, clock=clock, session_id="a")
    got: list[Any] = []
    budget.on_alert(got.append)
    for _ in range(2):
        with pytest.raises(BudgetExceededError):
            budget.check("m", 150, 0)
    clock.advance(86_400)  # the next day: a new period
    with pytest.raises(BudgetExceededError):
        budget.check("m", 150, 0)
    assert len(refused_alerts(got)) == 2
    [name] = budget.summary()["limits"]
    assert budget.summary()["limits"][name]["refusals"] == 3


# ---- fleet-wide: exact counts, one alert ------------------------------------------------------------


def test_threads_refusing_at_once_count_exactly_and_alert_once(backend: Backend) -> None:
    mgr = _tree(backend)
    mgr.record("team", "bob", "m", 1000, 0)  # the team's day is spent: every call is refused
    got: list[Any] = []  # list.append is atomic: the threads' callbacks share it
    raised: list[int] = []

    def worker(n: int) -> None:
        budget = _tree(backend).get("alice")  # each thread its own manager, as separate workers
        budget.on_alert(got.append)
        for i in range(25):
            try:
                if i % 2:
                    budget.check("m", 10, 0, session_id=f"t{n}")
                else:
                    budget.reserve("m", 10, 0, session_id=f"t{n}")
            except BudgetExceededError:
                raised.append(n)

    run_threads(8, worker)
    assert len(raised) == 200
    assert refusals(mgr, "team") == {"day_tokens": 200}
    assert len(refused_alerts(got)) == 1  # the first refusal of the day's window, once across the fleet
    assert sum(1 for e in mgr.get("team").ledger() if e.kind == "refusal") == 200


def _refuse(url: str, n: int, out: Any) -> None:
    mgr = BudgetManager(redis=url)
    mgr.register(BudgetScope("team", max_tokens_per_day=1000), RATES)
    mgr.register(BudgetScope("alice", parent="team", max_tokens_per_session=300), RATES)
    refused = 0
    for i in range(40):
        try:
            if i % 2:
                mgr.check("alice", "m", 10, 0, session_id=f"p{n}")
            else:
                mgr.reserve("alice", "m", 10, 0, session_id=f"p{n}")
        except BudgetExceededError:
            refused += 1
    out.put(refused)


def test_processes_refusing_at_once_count_exactly_and_alert_once(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    mgr = BudgetManager(redis=redis_server.url)
    mgr.register(BudgetScope("team", max_tokens_per_day=1000), RATES)
    mgr.record("team", "bob", "m", 1000, 0)
    ctx = context()
    out = ctx.Queue()
    procs = [ctx.Process(target=_refuse, args=(redis_server.url, n, out)) for n in range(6)]
    for p in procs:
        p.start()
    refused = sum(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert refused == 240
    assert refusals(mgr, "team") == {"day_tokens": 240}
    [alert] = refused_alerts(stream_alerts(client))
    assert alert.scope == "team" and alert.requested_by is not None and alert.requested_by.scope == "alice"
    ledger = mgr.get("team").ledger()
    assert [(e.kind, e.limit_scope, e.limit_type) for e in ledger if e.kind == "refusal"] == [
        ("refusal", "team", "day_tokens")
    ] * 240
    assert {e.operation for e in ledger if e.kind == "refusal"} == {"check", "reserve"}


# ---- the ledger and the reports -------------------------------------------------------------------


def test_refusals_are_in_the_ledger_and_the_report(backend: Backend) -> None:
    mgr = _tree(backend)
    with pytest.raises(BudgetExceededError):
        mgr.check("alice", "m", 250, 100, session_id="s1")
    mgr.record("alice", "s1", "m", 10, 5)
    [refusal] = [e for e in mgr.get("team").ledger() if e.kind == "refusal"]  # the team's ledger has alice's
    assert (refusal.scope, refusal.path, refusal.session_id, refusal.model) == ("alice", ("alice", "team"), "s1", "m")
    assert (refusal.operation, refusal.limit_scope, refusal.limit_type) == ("check", "alice", "session_tokens")
    assert (refusal.input_tokens, refusal.output_tokens) == (250, 100)  # asked for
    assert (refusal.tokens, refusal.cost_nano_usd, refusal.requests) == (0, 0, 0)  # charged: nothing
    assert [r.session_id for r in mgr.records("team")] == ["s1"]  # records: charges only
    [row] = mgr.report("team", by="session")
    assert (row.session, row.tokens, row.refusals) == ("s1", 15, 1)


# ---- the operator's views: status --json, the exporter ------------------------------------------------

PREFIX = "pfx"  # a prefix the suite's ACL user may use (tests/conftest.py)


@pytest.fixture
def refused_fleet(redis_server: RedisServer, redis_client: redis.Redis) -> BudgetManager:
    mgr = BudgetManager(redis=redis_server.url, prefix=PREFIX)
    mgr.register(BudgetScope("org", max_tokens_per_day=1000), RATES)
    mgr.register(BudgetScope("dev", parent="org", max_tokens_per_session=100), RATES)
    mgr.record("dev", "s1", "m", 90, 0)
    for _ in range(3):
        with pytest.raises(BudgetExceededError):
            mgr.check("dev", "m", 20, 0, session_id="s1")
    mgr.record("org", "x", "m", 900, 0)
    with pytest.raises(BudgetExceededError):
        mgr.reserve("dev", "m", 50, 0, session_id="s2")  # the org's day
    return mgr


def test_status_json_shows_the_counts(
    refused_fleet: BudgetManager, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--json", "--redis", redis_server.url, "--prefix", PREFIX]) == 0
    doc = json.loads(capsys.readouterr().out)
    counts = {(s["name"], lim["limit_type"]): lim["refusals"] for s in doc["scopes"] for lim in s["limits"]}
    assert counts == {("org", "day_tokens"): 1, ("dev", "session_tokens"): 3}


def test_the_exporter_shows_the_counts(refused_fleet: BudgetManager, redis_server: RedisServer) -> None:
    text = generate_latest(registry_for([BudgetCollector(redis_server.url, prefix=PREFIX)])).decode()
    got = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "distbudget_refusals_total"
    }
    assert got == {
        (("limit", "day_tokens"), ("metric", "tokens"), ("scope", "org")): 1,
        (("limit", "session_tokens"), ("metric", "tokens"), ("scope", "dev")): 3,
    }
