"""The Redis engine's record() fast path (``Accounting.fast_charging``, ``RedisEngine.record_fast``,
``codec.RecordWire``) is invisible: on a real redis-server, random operation sequences give the same
records, errors, warnings, alerts, summaries and ledgers with it as without it (the same budget with
``record`` overridden takes the usual path), sync and asyncio, alone and coalesced; the answers it
does not read itself (alerts, a limit passed, a counter's overflow, NOSCRIPT, a lost library, an
outage) are finished by the usual code, each charge made once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbudget import (
    AsyncBudget,
    BackendError,
    Budget,
    BudgetExceededError,
    BudgetManager,
    BudgetScope,
    InvalidInputError,
    ModelRates,
)
from distbudget._core import ops
from distbudget._core.fast import FastCall
from distbudget.engines import functions
from distbudget.engines.codec import Codec, parse_charge, plain_charge, whole_bulk
from tests._faults import AofRedis
from tests.conftest import Clock, LoopThread, RedisServer, SyncView
from tests.test_fast_path import OPS, RATES, Usual, make_scope, record_view, run

pytestmark = pytest.mark.redis

ZERO = {"z": ModelRates(0, 0), "m": ModelRates(0.001, 0.002)}


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    client.script_flush()
    yield client
    client.close()


def counting(budget: Budget | AsyncBudget) -> list[Any]:
    """The operations the budget's driver sends through ``engine.execute`` (the usual path)."""
    sent: list[Any] = []
    execute = budget.engine.execute

    def spy(op: Any) -> Any:
        sent.append(op)
        return execute(op)

    budget.engine.execute = spy  # type: ignore[method-assign]
    return sent


def fast_plan(budget: Budget | AsyncBudget, session: str, model: str) -> FastCall:
    fp = budget._core._fast_plans[(session, model)]
    assert isinstance(fp, FastCall)
    return fp


# ---- the codec's compiled call is packed_charge's, and its cheap read is parse_charge's -------------


@pytest.mark.parametrize("now", [None, 1_800_000_000_123_456])
@pytest.mark.parametrize("maxlen", [0, 1000])
def test_the_compiled_call_is_the_codecs_packed_charge(now: int | None, maxlen: int) -> None:
    budget = Budget(make_scope(True), RATES, ledger_maxlen=maxlen)
    plan = budget._core.plan("a", "m")
    entry = '{"kind":"charge","op":"x-1","input_tokens":3,"output_tokens":4}' if maxlen else ""
    codec = Codec()
    wire = codec.record_wire(plan, b"EVALSHA", "f" * 40, maxlen)
    op = ops.Record(plan, now, (7, 12345, 1), None, 600_000, maxlen, entry)
    assert wire.pack(now, 7, 12345, entry) == codec.packed_charge(op, b"EVALSHA", "f" * 40)
    fcall = codec.record_wire(plan, b"FCALL", "distbudget_x_record", maxlen)
    assert fcall.pack(now, 7, 12345, entry) == codec.packed_charge(op, b"FCALL", "distbudget_x_record")


REPLIES = [
    (b"0|1800000000000001|5 6 1 5 6 1|||||17-0", (), (1800000000000001, "17-0")),
    (b"0|1800000000000001|5 6 1 5 6 1|||||", ((3, 6),), (1800000000000001, "")),
    (b"0|1800000000000001|5 6 1 5 7 1|||||17-0", ((4, 6),), None),  # a usage over its limit
    (b"0|1800000000000001|5 6 1|1 2|||1-1|17-0", (), None),  # an alert fired
    (b"1|1800000000000001|||1800000000000000 5 6", (), None),  # a duplicate request id
]


@pytest.mark.parametrize(("raw", "checks", "plain"), REPLIES)
def test_a_plain_answer_is_read_as_parse_charge_reads_it(raw: bytes, checks: Any, plain: Any) -> None:
    assert plain_charge(raw, checks) == plain
    if plain is not None:
        result = parse_charge(raw)
        assert (result.now_us, result.ledger_id, result.alerts, result.original) == (*plain, (), None)
        assert not [i for i, (k, v) in enumerate(checks) if result.totals[k] > v]
    assert plain_charge(b"2|1800000000000001|4", ()) is None
    assert whole_bulk(b"$%d\r\n%b\r\n" % (len(raw), raw)) == raw


# ---- the fast path is taken, and equals the usual one ------------------------------------------------


def test_the_fast_path_is_taken_and_charges_once(redis_server: RedisServer, admin: redis.Redis) -> None:
    budget = Budget(BudgetScope("s", max_tokens_per_session=10**9), RATES, redis=redis_server.url, session_id="a")
    sent = counting(budget)
    records = [budget.record("a", "m", 100, 50) for _ in range(20)]
    assert [type(op).__name__ for op in sent] == ["Announce", "Record"]  # the first call: the usual path
    assert fast_plan(budget, "a", "m").wire is not None
    assert budget.summary()["session"] == {"tokens": 3000, "cost_usd": 0.004, "requests": 20}
    assert [e.id for e in budget.ledger()] == [r.ledger_id for r in records]
    assert [record_view(r) for r in budget.records] == [record_view(r) for r in records]
    assert all(r.timestamp == e.timestamp for r, e in zip(records, budget.ledger(), strict=True))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(OPS, min_size=20, max_size=60), hard_stop=st.booleans(), ledger=st.sampled_from([0, 5, 1000]))
def test_fast_and_usual_paths_agree_on_redis(
    redis_server: RedisServer, ops: list[tuple[Any, ...]], hard_stop: bool, ledger: int
) -> None:
    redis_server.client().flushall()
    clocks = Clock(1_800_000_123.25), Clock(1_800_000_123.25)
    options: dict[str, Any] = {"session_ttl": 3600, "request_ttl": 600, "ledger_maxlen": ledger}
    url = redis_server.url
    fast = Budget(make_scope(hard_stop), RATES, redis=url, prefix="distbudget", clock=clocks[0], **options)
    usual = Usual(make_scope(hard_stop), RATES, redis=url, prefix="pfx", clock=clocks[1], **options)
    assert fast.record is not Budget.record and type(usual).record is Usual.record
    assert run(fast, clocks[0], ops) == run(usual, clocks[1], ops)


def outcomes(budget: Budget, calls: list[tuple[Any, ...]]) -> list[Any]:
    """Each call's record or error, the alerts its callback saw, and the budget's state after them."""
    seen: list[Any] = []
    budget.on_alert(lambda a: seen.append((a.level, a.limit_type, a.used, a.scope)))
    out: list[Any] = []
    for call in calls:
        try:
            out.append(record_view(budget.record(*call)))
        except BudgetExceededError as err:
            assert err.record is not None
            out.append(("exceeded", str(err), record_view(err.record)))
        except InvalidInputError as err:
            out.append(("invalid", str(err)))
    ledger = [vars(e) | {"id": None, "op": None} for e in budget.ledger()]
    return [out, seen, budget.summary(), ledger, [record_view(r) for r in budget.records]]


@pytest.mark.parametrize("hard_stop", [True, False])
def test_alerts_limits_and_overflow_are_the_usual_paths(
    redis_server: RedisServer, admin: redis.Redis, hard_stop: bool
) -> None:
    scope = BudgetScope("t", max_tokens_per_session=1000, alert_thresholds=[0.5, 0.9], hard_stop=hard_stop)
    calls = [("a", "m", 100, 100)] * 5 + [("a", "m", 1, 0), ("a", "m", 100, 100)]  # 1000 tokens: at, then over
    calls += [("a", "z", 2**52, 0), ("a", "z", 2**52, 0), ("a", "m", 1, 1)]  # the second overflows: refused
    results = []
    for cls, prefix in ((Budget, "distbudget"), (Usual, "pfx")):
        clock = Clock()
        budget = cls(scope, ZERO, redis=redis_server.url, prefix=prefix, session_id="a", clock=clock)
        if hard_stop:
            results.append(outcomes(budget, calls))
        else:
            with pytest.warns(Warning):
                results.append(outcomes(budget, calls))
    assert results[0] == results[1]
    out, seen = results[0][:2]
    assert [o[0] if isinstance(o, tuple) else "ok" for o in out] == ["ok"] * 5 + [
        "exceeded" if hard_stop else "ok"
    ] * 3 + ["invalid", "exceeded" if hard_stop else "ok"]
    assert "critical" in [level.value for level, *_ in seen]
    assert results[0][2]["session"]["requests"] == 9  # every charge made, the overflowing one refused


def test_noscript_and_a_lost_library_go_the_usual_way_once(redis_server: RedisServer, admin: redis.Redis) -> None:
    budget = Budget(BudgetScope("s", max_tokens_per_session=10**9), RATES, redis=redis_server.admin_url, session_id="a")
    budget.record("a", "m", 1, 0)
    sent = counting(budget)
    budget.record("a", "m", 1, 0)
    admin.script_flush()  # NOSCRIPT: the usual path loads the script and sends it again
    budget.record("a", "m", 1, 0)
    budget.record("a", "m", 1, 0)
    assert [type(op).__name__ for op in sent] == ["Record"]
    functions.install_library(admin)  # the library, once the engine checks the server again
    budget.engine.path = None
    budget.record("a", "m", 1, 0)  # the usual path: checks the server, takes the functions
    budget.record("a", "m", 1, 0)
    assert budget.engine.path == functions.FUNCTIONS
    assert fast_plan(budget, "a", "m").wire.target == budget.engine.scripts["record"].name
    admin.function_flush()  # the library lost: the usual path calls the script instead
    budget.record("a", "m", 1, 0)
    budget.record("a", "m", 1, 0)
    assert fast_plan(budget, "a", "m").wire.target == budget.engine.scripts["record"].sha
    assert [type(op).__name__ for op in sent] == ["Record", "Record", "Record"]
    assert budget.summary()["session"]["requests"] == 8
    assert len(budget.ledger()) == 8


@pytest.mark.parametrize("window", [None, 0])
def test_threads_recording_at_once_lose_nothing(
    redis_server: RedisServer, admin: redis.Redis, window: int | None
) -> None:
    scope = BudgetScope("s", max_tokens_per_session=10**12, alert_at_pct=0.99)
    budget = Budget(scope, RATES, redis=redis_server.url, session_id="a", batch_window_us=window)
    budget.record("a", "m", 1, 0)
    n, threads = 300, 6

    def work(k: int) -> None:
        for _ in range(n):
            budget.record("a", "m", k, 1)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(1, threads + 1)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    expected = 1 + sum(n * (k + 1) for k in range(1, threads + 1))
    assert budget.summary()["session"]["tokens"] == expected
    assert len(budget.records) == len(budget.ledger()) == 1 + n * threads
    assert sum(r.total_tokens for r in budget.records) == expected


# ---- outages: the failure policy, as on the usual path -------------------------------------------------


def outage(srv: AofRedis, make: Any, mode: str) -> list[Any]:
    """Records before, during (the server killed -9) and after an outage; what each call gave."""
    budget = make(BudgetScope("f", max_tokens_per_session=10**9), RATES, redis=srv.url, on_backend_error=mode)
    out: list[Any] = []

    def call(i: int) -> None:
        try:
            r = budget.record("s", "m", i, 1)
            out.append(("ok", r.journaled, r.input_tokens, r.cost_nano_usd))
        except BackendError as err:
            out.append(("error", err.journaled, err.outage))

    for i in range(1, 4):
        call(i)
    srv.kill9()
    for i in range(4, 7):
        call(i)
    out.append(budget.backend_status["journaled"])
    srv.start()
    out.append(budget.flush_journal())
    for i in range(7, 9):
        call(i)
    summary = budget.summary()
    out.append((summary["session"], summary["backend"]["journaled_total"], summary["backend"]["replayed"]))
    out.append(sorted(e.input_tokens for e in budget.ledger()))
    out.append([(r.input_tokens, r.journaled) for r in budget.records])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("mode", ["raise", "allow"])
def test_an_outage_meets_the_failure_policy_as_on_the_usual_path(tmp_path: Path, mode: str, api: str) -> None:
    results = []
    runner = LoopThread()
    makers = (Budget, Usual) if api == "sync" else (AsyncBudget, AsyncUsual)
    for cls in makers:
        (tmp_path / cls.__name__).mkdir()
        srv = AofRedis(tmp_path / cls.__name__)
        try:
            make = cls if api == "sync" else lambda *a, cls=cls, **kw: SyncView(cls(*a, **kw), runner)
            results.append(outage(srv, make, mode))
        finally:
            srv.stop()
    runner.close()
    assert results[0] == results[1]
    assert results[0][-2] == list(range(1, 9))  # each charge once, the journaled ones replayed
    assert results[0][6] == 3  # journaled during the outage (the first through the fast path's error)


# ---- asyncio, alone and coalesced ---------------------------------------------------------------------


class AsyncUsual(AsyncBudget):
    async def record(self, *args: Any, **kwargs: Any) -> Any:
        return await AsyncBudget.record(self, *args, **kwargs)


@pytest.fixture
def runner() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.mark.parametrize("window", [None, 0])
@pytest.mark.parametrize("hard_stop", [True, False])
def test_async_alerts_limits_and_overflow_are_the_usual_paths(
    redis_server: RedisServer, admin: redis.Redis, runner: LoopThread, hard_stop: bool, window: int | None
) -> None:
    scope = BudgetScope("t", max_tokens_per_session=1000, alert_thresholds=[0.5, 0.9], hard_stop=hard_stop)
    calls = [("a", "m", 100, 100)] * 5 + [("a", "m", 1, 0), ("a", "m", 100, 100)]
    calls += [("a", "z", 2**52, 0), ("a", "z", 2**52, 0), ("a", "m", 1, 1)]
    results = []
    for cls, prefix in ((AsyncBudget, "distbudget"), (AsyncUsual, "pfx")):
        options: dict[str, Any] = {"prefix": prefix, "session_id": "a", "clock": Clock(), "batch_window_us": window}
        budget = SyncView(cls(scope, ZERO, redis=redis_server.url, **options), runner)
        if hard_stop:
            results.append(outcomes(budget, calls))  # type: ignore[arg-type]
        else:
            with pytest.warns(Warning):
                results.append(outcomes(budget, calls))  # type: ignore[arg-type]
        assert ("record" in vars(budget._target)) is (cls is AsyncBudget)  # the fast path installed
    assert results[0] == results[1]
    assert results[0][2]["session"]["requests"] == 9


@pytest.mark.parametrize("window", [None, 0])
def test_async_tasks_at_once_lose_nothing_and_survive_a_flush(
    redis_server: RedisServer, admin: redis.Redis, window: int | None
) -> None:
    async def main() -> tuple[list[Any], dict[str, Any], int, list[Any]]:
        scope = BudgetScope("s", max_tokens_per_session=10**12, alert_at_pct=0.99)
        budget = AsyncBudget(scope, RATES, redis=redis_server.url, session_id="a", batch_window_us=window)
        await budget.record("a", "m", 1, 0)
        sent = counting(budget)

        async def task(k: int) -> None:
            for i in range(40):
                if k == 0 and i == 20:
                    admin.script_flush()  # NOSCRIPT for the calls in flight: each sent again, once
                await budget.record("a", "m", k, 1)

        await asyncio.gather(*(task(k) for k in range(32)))
        summary = await budget.summary()
        ledger = await budget.ledger()
        await budget.engine.client.aclose()
        return sent, summary, len(ledger), budget.records

    sent, summary, entries, records = asyncio.run(main())
    expected = 1 + sum(40 * (k + 1) for k in range(32))
    assert summary["session"] == {"tokens": expected, "cost_usd": summary["session"]["cost_usd"], "requests": 1281}
    assert entries == len(records) == 1281 and sum(r.total_tokens for r in records) == expected
    assert 1 <= len([op for op in sent if type(op).__name__ == "Record"]) < 1280  # the NOSCRIPT ones alone


def test_an_error_redis_answers_is_raised_once_as_on_the_usual_path(
    redis_server: RedisServer, admin: redis.Redis
) -> None:
    """A script that fails (here WRONGTYPE on the session's hash) is neither sent again nor
    journaled: the fast path raises the usual path's BackendError, after one EVALSHA."""
    errors = []
    for cls, prefix in ((Budget, "distbudget"), (Usual, "pfx")):
        budget = cls(BudgetScope("s", max_tokens_per_session=10**9), RATES, redis=redis_server.admin_url, prefix=prefix)
        budget.record("a", "m", 1, 0)
        budget.record("a", "m", 1, 0)
        admin.delete(budget._core.keyspace.session("s", "a"))
        admin.set(budget._core.keyspace.session("s", "a"), "not a hash")
        admin.config_resetstat()
        with pytest.raises(BackendError) as err:
            budget.record("a", "m", 1, 0)
        assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
        assert not err.value.outage and not err.value.journaled
        assert budget.backend_status["journaled"] == 0
        errors.append(str(err.value).replace(prefix, "<prefix>"))
    assert errors[0] == errors[1]


# ---- a manager's budgets: the fast path between registry reads, a registry change seen at the next --


def test_a_managers_budget_takes_the_fast_path_and_sees_registry_changes(
    redis_server: RedisServer, admin: redis.Redis
) -> None:
    url = redis_server.url
    worker = BudgetManager(redis=url, registry_ttl=3600)  # its registry read: at its first call only
    budget = worker.register(BudgetScope("team", max_tokens_per_session=3000, hard_stop=True), RATES)
    sent = counting(budget)
    for _ in range(5):
        worker.record("team", "a", "m", 20, 10)  # by name: the budget's own (fast) record
    budget.record("a", "m", 20, 10)
    # its first call the usual way (the fleet price book, the alert stream), then the fast path 5 times
    assert [type(op).__name__ for op in sent] == ["PricesRead", "Announce", "Record"]
    assert fast_plan(budget, "a", "m").wire is not None
    # another worker lowers the limit: this one trusts its config (fast path) until its next registry read
    BudgetManager(redis=url).update("team", max_tokens_per_session=400)
    budget.record("a", "m", 1, 0)  # 181 tokens: under either limit
    assert len(sent) == 3
    budget._core._fresh_until = 0.0  # its registry read is due now
    budget.record("a", "m", 1, 0)  # the usual path: reads the registry, then charges (182)
    assert [type(op).__name__ for op in sent[3:]] == ["RegistryChain", "Record"]
    assert budget.scope.max_tokens_per_session == 400
    budget.record("a", "m", 200, 0)  # 382 of 400: the fast path again, its plan compiled anew
    assert len(sent) == 5  # an alert fired (80 % of 400): read by the usual finish, sent once
    assert [(a.level.name, a.limit) for a in budget.alerts] == [("WARNING", 400)]
    with pytest.raises(BudgetExceededError, match="session_tokens"):
        worker.record("team", "a", "m", 60, 0)  # 442 > 400, on the new plan
    assert [(a.level.name, a.limit) for a in budget.alerts][1:] == [("CRITICAL", 400)]
    assert budget.summary()["session"]["tokens"] == 442
    assert [e.id for e in budget.ledger()][-1] == budget.records[-1].ledger_id


# ---- calls by keyword (agent-budget's documented style) take it; metadata or a request id do not ----


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_calls_by_keyword_take_the_fast_path(
    redis_server: RedisServer, admin: redis.Redis, runner: LoopThread, flavour: str
) -> None:
    cls = Budget if flavour == "sync" else AsyncBudget
    made = cls(BudgetScope("kw", max_tokens_per_session=10**9), RATES, redis=redis_server.url, session_id="a")
    budget: Any = made if flavour == "sync" else SyncView(made, runner)
    budget.record("a", "m", 1, 1)  # the first call: the usual path
    sent = counting(made)
    records = [
        budget.record(session_id="a", model="m", input_tokens=800, output_tokens=200),
        budget.record("a", "m", input_tokens=800, output_tokens=200),
        budget.record("a", model="m", input_tokens=800, output_tokens=200, metadata=None, request_id=None),
    ]
    assert sent == []  # none through engine.execute: the fast path sent all three
    budget.record(session_id="a", model="m", input_tokens=1, output_tokens=0, metadata={"k": 1})
    budget.record(session_id="a", model="m", input_tokens=1, output_tokens=0, request_id="r-1")
    budget.record(session_id="a", model="m", input_tokens=1, output_tokens=0, reasoning_tokens=0)
    assert [type(op).__name__ for op in sent] == ["Record", "Record", "Record"]  # the usual path
    assert [(r.input_tokens, r.output_tokens, r.metadata) for r in records] == [(800, 200, {})] * 3
    assert budget.summary()["session"]["tokens"] == 2 + 3 * 1000 + 3
    assert [e.metadata for e in budget.ledger()][-3] == {"k": 1}
