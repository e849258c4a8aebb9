"""A fleet through the OpenAI SDK: 8 processes x 50 calls, each process one user, against one team cost
cap, per-user token caps and a team requests-per-minute limit, on a real Redis. Every cap holds, and
the ledger equals what the provider served (no call slipped through, none charged twice).

Time is injected: every worker's clock reads minute 0 for its first 25 calls and, after all workers
reached a barrier, minute 2 for the rest, so the RPM limit binds in the first minute and the team's
cost cap in the second."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from distbudget import BudgetExceededError, BudgetManager, BudgetScope, Limit
from tests._procs import context
from tests.integrations._llm_server import LLMServer
from tests.integrations.conftest import MODEL_RATES, OPENAI_MODEL, assert_ledger_matches, served_cost

WORKERS, CALLS, PHASE_CALLS = 8, 50, 25
T0 = 1_800_000_000.0
RPM = 60
TEAM_COST_NANO = 18_000_000  # $0.018: room for ~90 of these calls (60 in the first minute)
USER_TOKENS = {"u0": 150, "u1": 250}  # two tight users (~4 and ~7 calls); the others get 100,000
OTHER_USER_TOKENS = 100_000
MAX_OUTPUT = 20


def worker(index: int, redis_url: str, base_url: str, barrier: Any) -> dict[str, Any]:
    import openai

    from distbudget.integrations.openai import budgeted

    minute = [0.0]
    manager = BudgetManager(redis=redis_url, clock=lambda: T0 + 60 * minute[0])
    client = budgeted(openai.OpenAI(base_url=base_url, api_key="test", max_retries=0), manager, scope=f"u{index}")
    admitted = [0, 0]
    refused: Counter[str] = Counter()
    barrier.wait(timeout=120)  # every worker is ready before the first call: a fair race
    for call in range(CALLS):
        if call == PHASE_CALLS:
            barrier.wait(timeout=120)
            minute[0] = 2.0
        messages = [{"role": "user", "content": f"worker {index} call {call}: " + "lorem ipsum " * (call % 5)}]
        try:
            client.chat.completions.create(model=OPENAI_MODEL, messages=messages, max_tokens=MAX_OUTPUT)
        except BudgetExceededError as err:
            refused[err.limit_type] += 1
        else:
            admitted[call >= PHASE_CALLS] += 1
    return {"admitted": admitted, "refused": dict(refused)}


@pytest.mark.slow
def test_fleet_caps_hold_and_ledger_equals_served(llm: LLMServer, redis_server: Any, redis_client: Any) -> None:
    manager = BudgetManager(redis=redis_server.url, clock=lambda: T0)
    team = BudgetScope("team", max_cost_per_day_usd=TEAM_COST_NANO / 1e9, limits=[Limit("requests", RPM, "minute")])
    manager.register(team, MODEL_RATES)
    for i in range(WORKERS):
        cap = USER_TOKENS.get(f"u{i}", OTHER_USER_TOKENS)
        manager.register(BudgetScope(f"u{i}", max_tokens_per_day=cap, parent="team"), MODEL_RATES)

    ctx = context()
    barrier = ctx.Manager().Barrier(WORKERS)
    with ctx.Pool(WORKERS) as pool:
        results = pool.starmap(worker, [(i, redis_server.url, llm.base_url, barrier) for i in range(WORKERS)])

    admitted = [sum(r["admitted"][phase] for r in results) for phase in (0, 1)]
    refused: Counter[str] = Counter()
    for r in results:
        refused.update(r["refused"])
    served = list(llm.served)

    # nothing refused reached the provider, everything admitted did, once
    assert llm.requests == len(served) == sum(admitted)
    assert sum(admitted) + sum(refused.values()) == WORKERS * CALLS
    # the RPM limit holds in each minute, and bound in the first
    assert admitted[0] <= RPM and admitted[1] <= RPM
    assert admitted[0] == RPM
    # the team's cost cap holds, and bound in the second minute
    spent = sum(served_cost(s) for s in served)
    assert spent <= TEAM_COST_NANO
    assert admitted[1] < RPM and refused["day_cost_usd"] > 0
    # every user's token cap holds; the tight ones bound
    entries = manager.get("team").ledger()
    per_user = Counter[str]()
    for e in entries:
        per_user[e.scope] += e.tokens
    for i in range(WORKERS):
        assert per_user[f"u{i}"] <= USER_TOKENS.get(f"u{i}", OTHER_USER_TOKENS)
    assert refused["day_tokens"] > 0
    # the ledger is the provider's bill
    assert_ledger_matches(entries, llm)
    assert sum(e.cost_nano_usd for e in entries) == spent
    print(
        f"fleet: {WORKERS}x{CALLS} calls, admitted {admitted} per minute (RPM {RPM}), refused {dict(refused)}, "
        f"ledger {len(entries)} charges / {sum(e.tokens for e in entries)} tokens / {spent} nano-USD == server "
        f"{len(served)} calls / {sum(s.input_tokens + s.output_tokens for s in served)} tokens"
    )
