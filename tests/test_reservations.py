"""Fleet-safe admission: reservations with leases, idempotent charges, rate limits that wait."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import pytest

from distbudget import Budget, BudgetExceededError, BudgetScope, Limit, ModelRates
from distbudget._core.money import NANO
from tests._procs import context
from tests.conftest import Backend, Clock, RedisServer

RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002), "r": ModelRates(0.001, 0.002, reasoning_per_1k=0.01)}


# ---- single-process behaviour, on every engine ------------------------------------------------


def test_reserve_holds_worst_case_at_reasoning_rate(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_cost_per_session_usd=1), RATES, session_id="a")
    res = budget.reserve("r", 1000, 1000)
    assert res.held_tokens == 2000
    assert res.held_nano_usd == 1000 * 1000 + 1000 * 10_000  # output held at the higher reasoning rate
    lim = budget.summary()["limits"]["session_cost_usd"]
    assert lim["held"] == pytest.approx(0.011) and lim["used"] == 0
    res.release()
    assert res.release() is False  # already released
    assert budget.summary()["limits"]["session_cost_usd"]["held"] == 0


def test_actual_above_hold_is_charged_and_flagged(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=10_000), RATES, session_id="a")
    with budget.reserve("m", 100, 100) as res:
        record = res.commit(100, 250)
    assert record.over_hold and record.total_tokens == 350
    lim = budget.summary()["limits"]["session_tokens"]
    assert (lim["used"], lim["held"]) == (350, 0)


def test_exception_inside_block_releases(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a")
    with pytest.raises(RuntimeError), budget.reserve("m", 400, 400):
        assert budget.summary()["limits"]["session_tokens"]["held"] == 800
        raise RuntimeError("LLM call failed")
    assert budget.summary()["limits"]["session_tokens"]["held"] == 0
    assert budget.summary()["session"]["tokens"] == 0


def test_expired_lease_frees_the_hold_and_commit_still_charges(backend: Backend, clock: Clock) -> None:
    budget = backend.budget(BudgetScope("s", max_tokens_per_session=1000), RATES, session_id="a", clock=clock)
    res = budget.reserve("m", 400, 400, ttl=30)
    with pytest.raises(BudgetExceededError) as info:
        budget.reserve("m", 200, 100)
    assert info.value.retry_after == pytest.approx(0.05)  # only a hold blocks: look again soon
    clock.advance(30)
    assert budget.summary()["limits"]["session_tokens"]["held"] == 0  # reaped inside the scripts
    other = budget.reserve("m", 200, 100)
    record = res.commit(300, 100)  # late: its hold is gone, the money was spent all the same
    assert record.total_tokens == 400
    other.commit(200, 100)
    assert budget.summary()["session"]["tokens"] == 700


def test_commit_request_id_once(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("s"), RATES, session_id="a")
    first = budget.reserve("m", 10, 10, request_id="call-7").commit(10, 5)
    again = budget.reserve("m", 10, 10, request_id="call-7").commit(10, 5)
    assert again.duplicate and not first.duplicate
    s = budget.summary()
    assert s["session"]["tokens"] == 15 and s["limits"] == {} and s["session"]["requests"] == 1
    assert budget.record(None, "m", 10, 5, request_id="call-7").duplicate


def test_acquire_raises_at_once_when_exhausted(backend: Backend, clock: Clock) -> None:
    slept: list[float] = []
    budget = backend.budget(
        BudgetScope("s", max_tokens_per_session=100), RATES, session_id="a", clock=clock, sleep=slept.append
    )
    budget.record(None, "m", 90, 0)
    with pytest.raises(BudgetExceededError) as info:
        budget.acquire("m", 10, 10, timeout=60)
    assert info.value.retry_after is None and slept == []


def test_acquire_times_out(backend: Backend, clock: Clock) -> None:
    budget = backend.budget(
        BudgetScope("s", limits=[Limit("requests", 1, "1h")]), RATES, clock=clock, sleep=clock.advance
    )
    budget.acquire("m", 1, 1).commit(1, 1)
    with pytest.raises(BudgetExceededError) as info:
        budget.acquire("m", 1, 1, timeout=600)
    assert info.value.retry_after and info.value.retry_after > 600


def test_rate_limit_60_per_minute_over_3_simulated_minutes(backend: Backend, clock: Clock) -> None:
    clock.t = 1_800_000_000.3
    admitted: list[float] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds)

    scope = BudgetScope("s", limits=[Limit("requests", 60, "1m")])
    budget = backend.budget(scope, RATES, clock=clock, sleep=sleep)
    end = clock.t + 180
    rnd = random.Random(7)
    while clock.t < end:
        with budget.acquire("m", 10, 10, timeout=120) as res:
            admitted.append(clock.t)
            res.commit(10, 5)
        clock.advance(rnd.choice([0, 0.1, 0.25, 0.5]))  # bursty arrivals, faster than the limit
    admitted = [t for t in admitted if t < end]
    for t in admitted:
        assert sum(1 for u in admitted if t - 60 < u <= t) <= 60  # no trailing minute over 60
    assert len(admitted) >= 170
    assert waits and all(w > 0 for w in waits)
    assert max(waits) <= 61  # each wait is until the oldest bucket leaves, never a blind poll


# ---- the fleet: real processes on a real Redis ------------------------------------------------

CAP_USD = 0.5
FLEET_SCOPE = {"name": "fleet", "max_cost_per_session_usd": CAP_USD}


def _reserving_worker(url: str, seed: int, out: Any) -> None:
    budget = Budget(BudgetScope(**FLEET_SCOPE), RATES, redis=url, session_id="shared")  # type: ignore[arg-type]
    rnd = random.Random(seed)
    charged = refused = 0
    while True:
        try:
            res = budget.reserve("m", 500, 500)
        except BudgetExceededError as err:
            if err.retry_after is None:
                break  # the cap itself is exhausted
            refused += 1
            time.sleep(err.retry_after)
            continue
        time.sleep(rnd.random() * 0.002)  # the LLM call
        charged += res.commit(rnd.randint(250, 500), rnd.randint(0, 500)).cost_nano_usd
    out.put((charged, refused))


def test_16_processes_reserving_never_exceed_the_cap(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    ctx = context()
    out = ctx.Queue()
    procs = [ctx.Process(target=_reserving_worker, args=(redis_server.url, seed, out)) for seed in range(16)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    budget = Budget(BudgetScope(**FLEET_SCOPE), RATES, redis=redis_server.url)  # type: ignore[arg-type]
    lim = budget.summary("shared")["limits"]["session_cost_usd"]
    used_nano = round(lim["used"] * NANO)
    assert used_nano <= CAP_USD * NANO  # never over the cap
    assert used_nano == sum(c for c, _ in results)  # exactly what the workers committed
    worst = RATES["m"].worst_case_nano(500, 500)
    assert used_nano > CAP_USD * NANO - worst  # and close to it
    assert lim["held"] == 0  # no hold left behind


def _holding_worker(url: str, start: float, ready: Any) -> None:
    clock = Clock(start)
    budget = Budget(BudgetScope("lease", max_tokens_per_session=1000), RATES, redis=url, session_id="s", clock=clock)
    budget.reserve("m", 400, 400, ttl=30)
    ready.set()
    time.sleep(60)  # killed long before this


def test_sigkilled_worker_loses_its_hold_after_ttl(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    ctx = context()
    ready = ctx.Event()
    start = 1_800_000_000.0
    proc = ctx.Process(target=_holding_worker, args=(redis_server.url, start, ready))
    proc.start()
    assert ready.wait(60)
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
    proc.join()
    clock = Clock(start + 1)
    budget = Budget(
        BudgetScope("lease", max_tokens_per_session=1000), RATES, redis=redis_server.url, session_id="s", clock=clock
    )
    assert budget.summary()["limits"]["session_tokens"]["held"] == 800
    with pytest.raises(BudgetExceededError):
        budget.reserve("m", 200, 100)
    clock.advance(29)  # the lease ends at start + 30
    assert budget.summary()["limits"]["session_tokens"]["held"] == 0
    budget.reserve("m", 200, 100).commit(200, 100)
    assert budget.summary()["session"]["tokens"] == 300


def _duplicate_worker(url: str, go: Any, out: Any, via_commit: bool) -> None:
    budget = Budget(BudgetScope("idem"), RATES, redis=url, session_id="s")
    res = budget.reserve("m", 100, 100, request_id="req-42") if via_commit else None
    go.wait()
    record = res.commit(100, 50) if res is not None else budget.record(None, "m", 100, 50, request_id="rec-42")
    out.put(record.duplicate)


@pytest.mark.parametrize("via_commit", [True, False])
def test_same_request_id_from_two_processes_is_charged_once(redis_server: RedisServer, via_commit: bool) -> None:
    redis_server.client().flushall()
    ctx = context()
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_duplicate_worker, args=(redis_server.url, go, out, via_commit)) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(0.5 if via_commit else 0)  # let both reserve first (not a timing assertion)
    go.set()
    duplicates = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert duplicates == [False, True]
    s = Budget(BudgetScope("idem"), RATES, redis=redis_server.url).summary("s")
    assert s["session"]["tokens"] == 150 and s["session"]["requests"] == 1
    assert s["limits"] == {}
