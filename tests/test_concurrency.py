"""Real concurrency: threads on both engines, processes on a real Redis; and exact money."""

from __future__ import annotations

import random
from typing import Any

import pytest

from distbudget import Budget, BudgetScope, ModelRates
from distbudget._core.money import NANO
from distbudget._core.ops import Record
from tests._procs import context
from tests._threads import run_threads
from tests.conftest import Backend, RedisServer

# 123,000 nano-USD per input token: one token costs exactly $0.000123
RATES = {"m": ModelRates(input_per_1k=0.123, output_per_1k=0.2), "k": ModelRates(0.0001, 0.0003)}


def plan_for_worker(seed: int, n: int) -> list[tuple[str, int, int]]:
    rnd = random.Random(seed)
    return [(rnd.choice("mk"), rnd.randint(0, 500), rnd.randint(0, 300)) for _ in range(n)]


def expected_totals(calls: list[tuple[str, int, int]]) -> tuple[int, int]:
    tokens = sum(i + o for _, i, o in calls)
    cost = sum(RATES[m].cost_nano(i, o) for m, i, o in calls)
    return tokens, cost


def test_100_threads_recording_at_once_totals_exact(backend: Backend) -> None:
    if backend.kind == "fakeredis":
        pytest.skip("fakeredis serialises commands itself; the real server is the interesting case")
    scope = BudgetScope("fleet", max_tokens_per_day=10**12, max_tokens_per_model={"m": 10**12})
    budgets = [backend.budget(scope, RATES, session_id="shared") for _ in range(4)]
    work = [plan_for_worker(seed, 40) for seed in range(100)]

    def worker(i: int) -> None:
        for model, inp, out in work[i]:
            budgets[i % 4].record(None, model, inp, out)

    run_threads(100, worker)
    calls = [c for w in work for c in w]
    tokens, cost = expected_totals(calls)
    s = budgets[0].summary()
    assert s["session"]["tokens"] == tokens
    assert s["session"]["requests"] == 4000
    assert round(s["session"]["cost_usd"] * NANO) == cost
    assert s["day"]["tokens"] == tokens and s["total"]["tokens"] == tokens
    m_tokens = sum(i + o for m, i, o in calls if m == "m")
    assert s["per_model"]["m"]["tokens"] == m_tokens
    assert s["limits"]["model_m_tokens"]["used"] == m_tokens
    assert sum(len(b.records) for b in budgets) == 4000


def _process_worker(url: str, seed: int, n: int, queue: Any) -> None:
    budget = Budget(BudgetScope("fleet", max_tokens_per_day=10**12), RATES, redis=url, session_id="shared")
    total = 0
    for model, inp, out in plan_for_worker(seed, n):
        total += budget.record(None, model, inp, out).cost_nano_usd
    queue.put(total)


def test_8_processes_recording_on_real_redis_totals_exact(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    ctx = context()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(redis_server.url, seed, 300, queue)) for seed in range(8)]
    for p in procs:
        p.start()
    charged = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    tokens, cost = expected_totals([c for seed in range(8) for c in plan_for_worker(seed, 300)])
    assert sum(charged) == cost
    s = Budget(BudgetScope("fleet", max_tokens_per_day=10**12), RATES, redis=redis_server.url).summary("shared")
    assert s["session"]["tokens"] == tokens
    assert s["session"]["requests"] == 2400
    assert round(s["total"]["cost_usd"] * NANO) == cost
    assert s["limits"]["day_tokens"]["used"] == tokens


def test_a_million_charges_of_0_000123_sum_to_exactly_123() -> None:
    budget = Budget(BudgetScope("money", max_cost_per_session_usd=1000), RATES, session_id="s")
    plan = budget._core.plan("s", "m")
    usage = budget._core.usage("m", (1, 0, 0, 0, 0, 0))
    assert usage[1] == 123_000  # nano-USD
    engine = budget.engine
    op = Record(plan, None, usage, None, 0, 0, "")
    for _ in range(1_000_000):
        engine.execute(op)
    s = budget.summary()
    assert s["session"]["requests"] == 1_000_000
    assert round(s["session"]["cost_usd"] * NANO) == 123 * NANO
    assert s["session"]["cost_usd"] == 123.0
    floats = 0.0
    for _ in range(1_000_000):
        floats += 0.000123
    assert floats != 123.0  # what float accounting would have reported


def test_100k_charges_on_redis_are_exact(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    budget = Budget(BudgetScope("money", max_cost_per_session_usd=1000), RATES, redis=client, session_id="s")
    plan = budget._core.plan("s", "m")
    usage = budget._core.usage("m", (1, 0, 0, 0, 0, 0))
    from distbudget.engines.codec import Codec

    call = Codec().encode(Record(plan, None, usage, None, 0, 0, ""))
    keys, args = call.keys, call.argv
    script = budget.engine.scripts[call.script]
    for _ in range(20):
        pipe = client.pipeline(transaction=False)
        for _ in range(5000):
            script(keys=keys, args=args, client=pipe)
        pipe.execute()
    s = budget.summary()
    assert s["session"]["requests"] == 100_000
    assert round(s["session"]["cost_usd"] * NANO) == 12_300_000_000
    assert s["day"]["cost_usd"] == 12.3
