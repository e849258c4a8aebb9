"""The fast paths of issue 18, held to what they replace: a charge packed by the codec is byte for
byte the command redis-py would pack, and coalesced calls (``batch_window_us``) charge exactly what
the same calls charge one by one, each caller getting its own answer."""

from __future__ import annotations

from typing import Any

import pytest

from distbudget import Budget, BudgetScope, ModelRates
from tests.conftest import RedisServer

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
        assert codec.packed_charge(op, sha) == redis_py_packed(client, sha, call)
