"""The fast paths of issue 18, held to what they replace: a charge packed by the codec is byte for
byte the command redis-py would pack, and coalesced calls (``batch_window_us``) charge exactly what
the same calls charge one by one, each caller getting its own answer."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from distbudget import AsyncBudget, Budget, BudgetExceededError, BudgetScope, InvalidInputError, ModelRates
from tests._faults import AofRedis
from tests._threads import run_threads
from tests.conftest import RedisServer
from tests.test_failure_policy import MODEL, Books, big_scope

RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002)}


def scope(name: str) -> BudgetScope:
    return BudgetScope(name, max_tokens_per_session=10**9, max_cost_per_day_usd=10.0, max_tokens_per_model={"m": 10**9})


def redis_py_packed(client: Any, sha: str, call: Any) -> bytes:
    conn = client.connection_pool.get_connection()
    try:
        return b"".join(conn.pack_command("EVALSHA", sha, len(call.keys), *call.keys, *call.argv))
    finally:
        client.connection_pool.release(conn)


@pytest.mark.redis
def test_a_packed_charge_is_the_command_redis_py_would_send(redis_server: RedisServer) -> None:
    budget = Budget(scope("packed"), RATES, redis=redis_server.url, session_id="s")
    codec, client = budget.engine.codec, budget.engine.client
    hold = budget.reserve("m", 10, 10)._hold
    ops = [
        budget._core.record("s", "m", 300, 200).op,
        budget._core.record("s", "m", 1, 0, {"k": "v é"}, request_id="req-1").op,
        budget._core.record(None, "m", 0, 0).op,
        budget._core.commit(hold, 5, 5).op,
    ]
    for op in ops:
        call = codec.encode(op)
        sha = budget.engine.scripts[call.script].sha
        assert codec.packed_charge(op, b"EVALSHA", sha) == redis_py_packed(client, sha, call)
    for step in (budget._core.reserve("m", 10, 10), budget._core.check("m", 1, 1), budget._core.summary("s")):
        call = codec.encode(step.op)
        sha = budget.engine.scripts[call.script].sha
        assert codec.packed_call(call, b"EVALSHA", sha) == redis_py_packed(client, sha, call)


CALLS = 40  # per thread / task


def capped(name: str, cap: int) -> BudgetScope:
    """A session token cap the calls below cross part way: some callers get BudgetExceededError."""
    return BudgetScope(name, max_tokens_per_session=cap, max_tokens_per_model={"m": 10**9})


def check_books(budget: Any, outcomes: list[tuple[int, str, Any]], cap: int) -> None:
    """Every caller got its own answer (its own record, with its own tokens and ledger entry, or its
    own BudgetExceededError carrying its own record), and the totals are exactly what was charged."""
    keys = [k for k, _, _ in outcomes]
    assert len(set(keys)) == len(keys)
    for key, kind, answer in outcomes:
        record = answer if kind == "ok" else answer.record
        assert record.input_tokens == key  # the caller's own charge, not a neighbour's
        assert record.metadata == {"k": key}
        if kind == "over":
            assert answer.used > cap  # refused only once the cap was really crossed
    ledger_ids = [(a if k == "ok" else a.record).ledger_id for _, k, a in outcomes]
    assert len(set(ledger_ids)) == len(outcomes) and None not in ledger_ids
    total = sum(keys)
    assert budget["session"]["tokens"] == total
    assert budget["total"]["requests"] == len(outcomes)


@pytest.mark.redis
def test_coalesced_threads_each_get_their_own_answer(redis_server: RedisServer) -> None:
    cap = 16 * CALLS * 500
    budget = Budget(capped("threads", cap), RATES, redis=redis_server.url, session_id="s", batch_window_us=200)
    outcomes: list[tuple[int, str, Any]] = []
    lock = threading.Lock()

    def worker(first: int) -> None:
        for key in range(first, first + CALLS * 16, 16):  # unique input tokens per call: 1000..
            try:
                answer, kind = budget.record("s", "m", key, 0, {"k": key}), "ok"
            except BudgetExceededError as err:
                answer, kind = err, "over"
            with lock:
                outcomes.append((key, kind, answer))

    run_threads(16, lambda i: worker(1000 + i))
    assert len(outcomes) == 16 * CALLS
    assert {kind for _, kind, _ in outcomes} == {"ok", "over"}  # the cap was crossed part way
    check_books(budget.summary("s"), outcomes, cap)
    assert budget._core.records[-1] in [a if k == "ok" else a.record for _, k, a in outcomes]


@pytest.mark.redis
def test_coalesced_tasks_each_get_their_own_answer(redis_server: RedisServer) -> None:
    cap = 64 * CALLS * 500

    async def main() -> tuple[dict[str, Any], list[tuple[int, str, Any]]]:
        budget = AsyncBudget(capped("tasks", cap), RATES, redis=redis_server.url, session_id="s", batch_window_us=0)
        outcomes: list[tuple[int, str, Any]] = []

        async def task(first: int) -> None:
            for key in range(first, first + CALLS * 64, 64):
                try:
                    outcomes.append((key, "ok", await budget.record("s", "m", key, 0, {"k": key})))
                except BudgetExceededError as err:
                    outcomes.append((key, "over", err))

        await asyncio.gather(*(task(1000 + i) for i in range(64)))
        # reserve() coalesces too: holds admitted or refused, each its own
        holds = await asyncio.gather(*(budget.reserve("m", 10, 0) for _ in range(8)), return_exceptions=True)
        assert all(isinstance(h, BudgetExceededError) for h in holds)  # the session is over its cap
        return await budget.summary("s"), outcomes

    summary, outcomes = asyncio.run(main())
    assert len(outcomes) == 64 * CALLS
    assert {kind for _, kind, _ in outcomes} == {"ok", "over"}
    check_books(summary, outcomes, cap)


@pytest.mark.redis
def test_batch_window_us_is_checked(redis_server: RedisServer) -> None:
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(InvalidInputError, match="batch_window_us"):
            Budget(scope("bad"), RATES, redis=redis_server.url, batch_window_us=bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_an_outage_mid_batch_journals_each_charge_once(tmp_path: Path) -> None:
    """Redis killed -9 while 8 tasks record through the coalescer, then restarted: every charge
    made is in the ledger and the totals exactly once (replayed from the journal or not)."""
    server = AofRedis(tmp_path)
    try:

        async def main() -> dict[str, Any]:
            budget = AsyncBudget(
                big_scope("batch"),
                redis=server.url,
                on_backend_error="allow",
                fail_open_max_tokens=10**9,
                batch_window_us=100,
            )
            books, stop = Books(), asyncio.Event()

            async def task(first: int) -> None:
                key = first
                while not stop.is_set():
                    rid = f"req-{key}" if key % 2 else None
                    record = await budget.record("s1", MODEL, key, 7, request_id=rid)
                    books.add(key, record.total_tokens, record.cost_nano_usd, "journaled" if record.journaled else "ok")
                    key += 8
                    await asyncio.sleep(0.01)  # the journal's replay keeps up (not what is tested)

            async def until(predicate: Any) -> None:
                deadline = time.monotonic() + 20
                while not predicate():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(task(1000 + i)) for i in range(8)]
            await until(lambda: books.count("ok") >= 80)
            server.kill9()
            killed = time.monotonic()
            await until(lambda: books.count("journaled", killed) >= 40)
            up = await asyncio.to_thread(server.start)
            await until(lambda: books.count("ok", up) >= 40 and budget.backend_status["journaled"] == 0)
            stop.set()
            await asyncio.gather(*tasks)
            await budget.flush_journal()
            summary = await budget.summary()
            figures = books.audit(server, "batch", summary)
            status = summary["backend"]
            assert status["replayed"] + status["already_applied"] == status["journaled_total"] >= 40
            return figures

        figures = asyncio.run(main())
        assert figures["lost"] == figures["twice"] == 0
    finally:
        server.stop()


@pytest.mark.redis
def test_coalesced_calls_recover_from_a_script_flush(redis_server: RedisServer) -> None:
    """NOSCRIPT in a batch (SCRIPT FLUSH, a restart, a failover): those calls did not run; each is
    sent again alone once the script is loaded, nothing twice."""
    admin = redis_server.client()

    async def main() -> dict[str, Any]:
        budget = AsyncBudget(scope("flushed"), RATES, redis=redis_server.url, session_id="s", batch_window_us=0)
        await budget.record("s", "m", 1, 0)
        for _ in range(3):
            admin.script_flush()
            await asyncio.gather(*(budget.record("s", "m", 10, 0) for _ in range(32)))
            await asyncio.gather(*(budget.reserve("m", 1, 0) for _ in range(4)))
        return await budget.summary("s")

    assert asyncio.run(main())["session"]["tokens"] == 1 + 3 * 32 * 10
