"""asyncio cancellation: a task cancelled while it awaits ``AsyncBudget.reserve()`` gets
``CancelledError`` and leaves no hold, on every supported Python (redis-py sends commands under
``asyncio.wait_for`` before 3.12, which can swallow a cancellation that arrives as the send ends)."""

from __future__ import annotations

import asyncio

from distbudget import AsyncBudget, BudgetScope, ModelRates
from tests.conftest import RedisServer

RATES = {"m": ModelRates(0.001, 0.002)}


def test_tasks_cancelled_while_awaiting_reserve_raise_and_hold_nothing(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    scope = BudgetScope("cancelled", max_tokens_per_day=1_000_000)

    async def main() -> tuple[list[BaseException | None], int, dict[str, object]]:
        budget = AsyncBudget(scope, RATES, redis=redis_server.url, session_id="s")
        await budget.summary()  # connected, scripts loaded: the tasks below only reserve
        bodies = 0

        async def worker(where: list[str]) -> None:
            nonlocal bodies
            where.append("reserving")
            async with budget.reserve("m", 100, 100) as hold:
                where.append("reserved")
                bodies += 1
                await hold.commit(100, 100)

        outcomes: list[BaseException | None] = []
        for attempt in range(1000):  # cancel each task at a different point, keep those inside reserve
            where: list[str] = []
            task = asyncio.create_task(worker(where))
            for _ in range(attempt % 8 + 1):
                await asyncio.sleep(0)
            inside = where == ["reserving"]
            task.cancel()
            try:
                await task
                outcome: BaseException | None = None
            except BaseException as exc:  # CancelledError is the expected outcome
                outcome = exc
            if inside:
                outcomes.append(outcome)
            if len(outcomes) == 50:
                break
        return outcomes, bodies, await budget.summary()  # bodies: tasks cancelled after reserve returned

    outcomes, bodies, summary = asyncio.run(main())
    ran = [o for o in outcomes if not isinstance(o, asyncio.CancelledError)]
    assert not ran, f"{len(ran)} of 50 cancelled reserves did not raise CancelledError: {ran[:3]}"
    assert len(outcomes) == 50
    day = summary["limits"]["day_tokens"]  # type: ignore[index]
    assert (day["used"], day["held"]) == (200 * bodies, 0)  # only the bodies that ran committed; no hold
