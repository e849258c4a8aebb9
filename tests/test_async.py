"""The asyncio API under real concurrency: many tasks, cancellation, and a loop that never blocks.
(The whole behavioural suite also runs through the async API: see the ``-async`` backends.)"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import redis.asyncio

from distbudget import AsyncBudget, AsyncBudgetManager, BudgetExceededError, BudgetScope, ModelRates
from distbudget._core.money import NANO
from tests.conftest import RedisServer

RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002)}
CAP = 0.2


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_300_tasks_never_exceed_the_cap(redis_server: RedisServer) -> None:
    for use_redis in (False, True):

        async def main(use_redis: bool = use_redis) -> None:
            redis_server.client().flushall()
            # the library's own client for a URL: its pool makes 300 tasks queue for connections
            budget = AsyncBudget(
                BudgetScope("cap", max_cost_per_session_usd=CAP),
                RATES,
                redis=redis_server.url if use_redis else None,
                session_id="s",
            )
            committed: list[int] = []

            async def task(seed: int) -> None:
                rnd = random.Random(seed)
                while True:
                    try:
                        async with budget.reserve("m", 300, 300) as hold:
                            await asyncio.sleep(rnd.random() * 0.002)
                            record = await hold.commit(rnd.randint(100, 300), rnd.randint(0, 300))
                            committed.append(record.cost_nano_usd)
                    except BudgetExceededError as err:
                        if err.retry_after is None:
                            return
                        await asyncio.sleep(err.retry_after)

            await asyncio.gather(*(task(i) for i in range(300)))
            lim = (await budget.summary())["limits"]["session_cost_usd"]
            used = round(lim["used"] * NANO)
            assert used <= CAP * NANO
            assert used == sum(committed)
            assert used > CAP * NANO - RATES["m"].worst_case_nano(300, 300)
            assert lim["held"] == 0
            if use_redis:
                await budget.engine.client.aclose()

        run(main())


def test_cancelled_task_inside_async_with_frees_its_hold(redis_server: RedisServer) -> None:
    async def main() -> None:
        for client in (None, redis.asyncio.Redis(port=redis_server.port)):
            budget = AsyncBudget(
                BudgetScope("cancel", max_tokens_per_session=1000),
                RATES,
                redis=client,
                session_id=f"s-{client is None}",
            )
            entered = asyncio.Event()

            async def agent() -> None:
                async with budget.reserve("m", 400, 400):
                    entered.set()
                    await asyncio.sleep(3600)  # the LLM call that gets cancelled

            task = asyncio.create_task(agent())
            await entered.wait()
            assert (await budget.summary())["limits"]["session_tokens"]["held"] == 800
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await budget.summary())["limits"]["session_tokens"]["held"] == 0  # at once, no TTL wait
            if client is not None:
                await client.aclose()

    run(main())


def test_await_reserve_form_and_manager(redis_server: RedisServer) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis(port=redis_server.port)
        await client.flushall()
        mgr = AsyncBudgetManager(redis=client)
        await mgr.register(BudgetScope("team", max_tokens_per_day=1000))
        await mgr.register(BudgetScope("alice", parent="team", max_tokens_per_session=500), RATES)
        hold = await mgr.reserve("alice", "m", 100, 100, session_id="s")
        assert hold.admitted and hold.held_tokens == 200
        record = await hold.commit(100, 20)
        assert record.total_tokens == 120
        assert await mgr.check("alice", "m", 10, session_id="s")
        summaries = await mgr.all_summaries()
        assert summaries["team"]["day"]["tokens"] == 120
        assert (await mgr.summary("alice", "s"))["session"]["tokens"] == 120
        with pytest.raises(KeyError):
            await mgr.record("nobody", "s", "m", 1, 1)
        await client.aclose()

    run(main())


def test_event_loop_is_never_blocked(redis_server: RedisServer) -> None:
    """Redis is paused for 500 ms (CLIENT PAUSE) while a budget call waits on it: a ticker task on
    the same loop must keep ticking. A synchronous Redis call anywhere would stall it for 500 ms."""

    async def main() -> float:
        client = redis.asyncio.Redis(port=redis_server.port)
        admin = redis_server.client()
        budget = AsyncBudget(BudgetScope("loop", max_tokens_per_session=10**9), RATES, redis=client, session_id="s")
        await budget.record(None, "m", 1, 1)  # scripts loaded, connection up
        worst_gap = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal worst_gap
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                worst_gap = max(worst_gap, now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        admin.execute_command("CLIENT", "PAUSE", 500, "ALL")
        start = time.perf_counter()
        await asyncio.gather(budget.record(None, "m", 1, 1), budget.summary(), budget.check("m", 1))
        waited = time.perf_counter() - start
        stop.set()
        await tick
        await client.aclose()
        assert waited >= 0.4  # the calls really waited on the paused server
        return worst_gap

    worst_gap = run(main())
    assert isinstance(worst_gap, float)
    assert worst_gap < 0.25  # the loop kept running while Redis was paused
