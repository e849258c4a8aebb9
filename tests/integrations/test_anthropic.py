"""The ``anthropic`` SDK, budgeted: cache reads and writes are additive to ``input_tokens`` and priced
as such; ``message_delta`` usage is cumulative (the server sends two: summing would overcharge)."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from distbudget import AsyncBudget, Budget, BudgetExceededError, BudgetScope
from distbudget.integrations.anthropic import budgeted
from tests.integrations._llm_server import LLMServer
from tests.integrations.conftest import ANTHROPIC_MODEL, MODEL_RATES, assert_ledger_matches

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK warns about model names

MODES = ["create", "create-stream", "stream"]


def _request(i: int, cap: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": [{"type": "text", "text": f"question {i} " * i}]}]
    return {"model": ANTHROPIC_MODEL, "max_tokens": cap, "system": "be brief", "messages": messages}


def _call(client: Any, mode: str, request: dict[str, Any]) -> None:
    if mode == "create":
        assert client.messages.create(**request).usage.cache_read_input_tokens > 0
    elif mode == "create-stream":
        assert len(list(client.messages.create(**request, stream=True))) > 4
    else:
        with client.messages.stream(**request) as stream:
            assert "".join(stream.text_stream)


async def _acall(client: Any, mode: str, request: dict[str, Any]) -> None:
    if mode == "create":
        await client.messages.create(**request)
    elif mode == "create-stream":
        events = await client.messages.create(**request, stream=True)
        assert len([e async for e in events]) > 4
    else:
        async with client.messages.stream(**request) as stream:
            message = await stream.get_final_message()
            assert message.usage.output_tokens == request["max_tokens"]


@pytest.mark.parametrize("mode", MODES)
def test_sync_ledger_equals_served(llm: LLMServer, redis_url: str | None, mode: str) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    client = budgeted(anthropic.Anthropic(base_url=llm.url, api_key="test"), budget, session_id="run-1")
    for i, cap in enumerate((8, 20, 33), 1):
        _call(client, mode, _request(i, cap))
    assert_ledger_matches(budget.ledger(), llm)
    # the provider's input_tokens were only the uncached part: the ledger holds all of it
    assert sum(e.input_tokens for e in budget.ledger()) == sum(s.input_tokens for s in llm.served)
    assert all(s.cache_write_tokens and s.cached_input_tokens for s in llm.served)


@pytest.mark.parametrize("mode", MODES)
def test_async_ledger_equals_served(llm: LLMServer, redis_url: str | None, mode: str) -> None:
    async def main() -> list[Any]:
        budget = AsyncBudget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
        client = budgeted(anthropic.AsyncAnthropic(base_url=llm.url, api_key="test"), budget)
        await asyncio.gather(*(_acall(client, mode, _request(i, 10 + i)) for i in range(1, 7)))
        return await budget.ledger()

    assert_ledger_matches(asyncio.run(main()), llm)


@pytest.mark.parametrize("mode", MODES)
def test_over_the_cap_no_request_is_sent(llm: LLMServer, redis_url: str | None, mode: str) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=500), MODEL_RATES, redis=redis_url)
    client = budgeted(anthropic.Anthropic(base_url=llm.url, api_key="test"), budget)
    with pytest.raises(BudgetExceededError):
        _call(client, mode, _request(1, 1000))
    assert llm.requests == 0 and [e.kind for e in budget.ledger()] == ["refusal"]  # nothing charged


def test_streams_closed_early_are_charged_an_estimate(llm: LLMServer, redis_url: str | None) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    client = budgeted(anthropic.Anthropic(base_url=llm.url, api_key="test"), budget)
    events = client.messages.create(**_request(2, 300), stream=True)
    for i, _ in enumerate(events):
        if i == 4:
            break
    events.close()
    with client.messages.stream(**_request(2, 300)) as stream:
        for i, _ in enumerate(stream):
            if i == 4:
                break
    entries = budget.ledger()
    assert len(entries) == 2 == len(llm.served)
    served_input = llm.served[0].input_tokens
    for entry in entries:
        assert entry.metadata["estimated"] is True
        # message_start reported the input (with its cache parts): that much is known exactly
        assert entry.input_tokens == served_input
        assert 0 < entry.output_tokens < 300


def test_server_error_then_success_is_charged_once(llm: LLMServer, redis_url: str | None) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    client = budgeted(anthropic.Anthropic(base_url=llm.url, api_key="test", max_retries=2), budget)
    llm.fail_next = [500]
    with client.messages.stream(**_request(1, 16)) as stream:
        stream.until_done()
    llm.fail_next = [529]  # Anthropic's "overloaded"
    client.messages.create(**_request(1, 16))
    assert llm.requests == 4 and len(llm.served) == 2
    assert_ledger_matches(budget.ledger(), llm)
