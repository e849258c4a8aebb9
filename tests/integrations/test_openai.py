"""The ``openai`` SDK, budgeted: real HTTP against the local provider, the ledger against what it served."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import openai
import pytest

from distbudget import AsyncBudget, Budget, BudgetExceededError, BudgetManager, BudgetScope
from distbudget.integrations.openai import budgeted
from tests._servers import free_port
from tests.integrations._llm_server import DEFAULT_OUTPUT, LLMServer
from tests.integrations.conftest import MODEL_RATES, OPENAI_MODEL, assert_ledger_matches

CAPS = [8, 16, None]  # None: no cap in the request (the hold is the default maximum)


def _client(llm: LLMServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm.base_url, api_key="test", **kw)


def _aclient(llm: LLMServer, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=llm.base_url, api_key="test", **kw)


def _request(api: str, i: int, cap: int | None, stream: bool) -> dict[str, Any]:
    if api == "chat":
        req: dict[str, Any] = {"model": OPENAI_MODEL, "messages": [{"role": "user", "content": f"question {i} " * i}]}
        if cap is not None:
            req["max_completion_tokens" if i % 2 else "max_tokens"] = cap
    else:
        req = {"model": OPENAI_MODEL, "input": f"question {i} " * i, "instructions": "be brief"}
        if cap is not None:
            req["max_output_tokens"] = cap
    return {**req, "stream": stream} if stream else req


def _create(client: Any, api: str) -> Any:
    return client.chat.completions.create if api == "chat" else client.responses.create


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_sync_ledger_equals_served(llm: LLMServer, redis_url: str | None, api: str, stream: bool) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    client = budgeted(_client(llm), budget, session_id="run-1")
    for i, cap in enumerate(CAPS, 1):
        result = _create(client, api)(**_request(api, i, cap, stream))
        if stream:
            chunks = list(result)
            assert len(chunks) > 2
        else:
            assert result.usage is not None
    assert_ledger_matches(budget.ledger(), llm)
    assert {e.session_id for e in budget.ledger()} == {"run-1"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_async_ledger_equals_served(llm: LLMServer, redis_url: str | None, api: str, stream: bool) -> None:
    async def main() -> list[Any]:
        budget = AsyncBudget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
        client = budgeted(_aclient(llm), budget, session_id="run-1")

        async def one(i: int, cap: int | None) -> None:
            result = await _create(client, api)(**_request(api, i, cap, stream))
            if stream:
                async with result as events:
                    assert len([e async for e in events]) > 2

        await asyncio.gather(*(one(i, cap) for i, cap in enumerate(CAPS * 2, 1)))
        return await budget.ledger()

    assert_ledger_matches(asyncio.run(main()), llm)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_over_the_cap_no_request_is_sent(llm: LLMServer, redis_url: str | None, api: str) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=1000), MODEL_RATES, redis=redis_url)
    client = budgeted(_client(llm), budget)
    with pytest.raises(BudgetExceededError):  # no cap: the model's maximum output is held, over 1000
        _create(client, api)(**_request(api, 1, None, False))
    with pytest.raises(BudgetExceededError):
        _create(client, api)(**_request(api, 1, 2000, True))
    assert llm.requests == 0
    assert [e.kind for e in budget.ledger()] == ["refusal"] * 2  # nothing charged
    _create(client, api)(**_request(api, 1, 100, False))  # a call that fits goes through
    assert llm.requests == 1


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_stream_closed_early_is_charged_an_estimate(llm: LLMServer, redis_url: str | None, api: str) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    client = budgeted(_client(llm), budget)
    stream = _create(client, api)(**_request(api, 3, 200, True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    with _create(client, api)(**_request(api, 3, 200, True)) as stream:  # left inside a with block
        next(iter(stream))
    entries = budget.ledger()
    assert len(entries) == 2 == len(llm.served)
    for entry in entries:
        assert entry.metadata["estimated"] is True
        assert entry.metadata["estimate_reason"] == "stream closed early"
        assert entry.input_tokens > 0 and entry.cost_nano_usd > 0
        assert entry.output_tokens < 200  # what arrived, not the hold


def test_async_stream_closed_early_is_charged_an_estimate(llm: LLMServer, redis_url: str | None) -> None:
    async def main() -> list[Any]:
        budget = AsyncBudget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
        client = budgeted(_aclient(llm), budget)
        stream = await client.chat.completions.create(**_request("chat", 2, 100, True))
        got = 0
        async for _ in stream:
            got += 1
            if got == 4:
                break
        await stream.close()
        return await budget.ledger()

    (entry,) = asyncio.run(main())
    assert entry.metadata["estimated"] is True
    assert entry.tokens > 0 and entry.cost_nano_usd > 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_server_error_then_success_is_charged_once(llm: LLMServer, redis_url: str | None, stream: bool) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    client = budgeted(_client(llm, max_retries=2), budget)
    llm.fail_next = [500, 503]
    result = client.chat.completions.create(**_request("chat", 1, 12, stream))
    if stream:
        list(result)
    assert llm.requests == 3 and len(llm.served) == 1  # the SDK retried twice, one answer served
    assert_ledger_matches(budget.ledger(), llm)


def test_error_answer_releases_the_hold(llm: LLMServer, redis_url: str | None) -> None:
    # 300 tokens a day; each call holds about 150: a hold left behind would refuse the second call
    budget = Budget(BudgetScope("team", max_tokens_per_day=300), MODEL_RATES, redis=redis_url)
    client = budgeted(_client(llm, max_retries=0), budget)
    llm.fail_next = [400]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**_request("chat", 1, 120, False))
    assert budget.ledger() == []
    client.chat.completions.create(**_request("chat", 1, 120, False))
    client.chat.completions.create(**_request("chat", 1, 100, False))
    assert_ledger_matches(budget.ledger(), llm)


def test_session_and_scope_per_call(llm: LLMServer, redis_url: str | None) -> None:
    manager = BudgetManager(redis=redis_url)
    manager.register(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES)
    for user in ("alice", "bob"):
        manager.register(BudgetScope(user, max_cost_per_day_usd=1.0, parent="team"), MODEL_RATES)
    client = budgeted(_client(llm), manager, scope="alice", session_id="s-default")
    client.chat.completions.create(**_request("chat", 1, 8, False))
    client.chat.completions.create(**_request("chat", 1, 8, False), budget_session_id="s-7", budget_scope="bob")
    client.with_session("s-9", scope="bob").responses.create(**_request("responses", 1, 8, False))
    client.with_options(timeout=30).chat.completions.create(**_request("chat", 1, 8, False))
    entries = manager.get("team").ledger()
    assert [(e.scope, e.session_id) for e in entries] == [
        ("alice", "s-default"),
        ("bob", "s-7"),
        ("bob", "s-9"),
        ("alice", "s-default"),
    ]
    assert_ledger_matches(entries, llm)
    with pytest.raises(TypeError, match="scope"):
        budgeted(_client(llm), manager).chat.completions.create(**_request("chat", 1, 8, False))
    assert llm.requests == 4


def test_everything_else_passes_through(llm: LLMServer) -> None:
    raw = _client(llm)
    client = budgeted(raw, Budget(BudgetScope("team"), MODEL_RATES))
    assert client.base_url == raw.base_url
    assert client.unbudgeted is raw
    assert client.models is raw.models
    assert client.chat.completions.with_raw_response is not None
    with pytest.raises(TypeError):
        budgeted(_client(llm), AsyncBudget(BudgetScope("team")))  # a sync client needs a sync budget
    with pytest.raises(TypeError):
        budgeted(object(), Budget(BudgetScope("team")))


def test_output_cap_without_one_in_the_request(llm: LLMServer) -> None:
    # the model's maximum output from the price snapshot (gpt-4o: 16,384) is held
    budget = Budget(BudgetScope("team", max_tokens_per_day=16_000), MODEL_RATES)
    client = budgeted(_client(llm), budget, default_max_output_tokens=200)
    with pytest.raises(BudgetExceededError):
        client.chat.completions.create(**_request("chat", 1, None, False))
    # a model the snapshot has no maximum for: the configurable default (here ~220 tokens held)
    local = {"my-local-model": MODEL_RATES[OPENAI_MODEL]}
    budget = Budget(BudgetScope("team", max_tokens_per_day=600), local)
    client = budgeted(_client(llm), budget, default_max_output_tokens=200)
    client.chat.completions.create(**{**_request("chat", 1, None, False), "model": "my-local-model"})
    assert llm.requests == 1 and llm.served[0].output_tokens == DEFAULT_OUTPUT
    (entry,) = budget.ledger()
    assert entry.output_tokens == DEFAULT_OUTPUT and entry.metadata.get("estimated") is None


def test_sync_stream_dropped_unclosed_is_charged_when_collected(llm: LLMServer) -> None:
    budget = Budget(BudgetScope("team"), MODEL_RATES)
    client = budgeted(_client(llm), budget)
    stream = client.chat.completions.create(**_request("chat", 2, 50, True))
    next(stream)
    next(stream)
    del stream
    gc.collect()
    (entry,) = budget.ledger()
    assert entry.metadata["estimated"] is True and entry.metadata["estimate_reason"] == "stream dropped unclosed"
    assert entry.input_tokens > 0


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_interrupted_stream_is_charged_an_estimate(llm: LLMServer, redis_url: str | None, api: str) -> None:
    budget = Budget(BudgetScope("team"), MODEL_RATES, redis=redis_url)
    client = budgeted(_client(llm), budget)
    llm.cut_stream_after = 6  # the provider's connection drops after 6 events, before any usage
    received = 0
    try:
        for _ in _create(client, api)(**_request(api, 2, 60, True)):
            received += 1
    except openai.APIError:
        pass  # the SDK may raise on the cut or just end the stream: either way the stream ended early
    assert received <= 6
    (entry,) = budget.ledger()
    assert entry.metadata["estimated"] is True
    assert entry.metadata["estimate_reason"] in ("stream interrupted", "stream ended before its usage")
    assert entry.input_tokens > 0 and 0 < entry.output_tokens < 60


def test_unreachable_provider_releases_the_hold(redis_url: str | None) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=300), MODEL_RATES, redis=redis_url)
    client = budgeted(openai.OpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="t", max_retries=1), budget)
    for _ in range(3):  # each would hold ~160 of 300: a hold left behind would refuse the next
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(**_request("chat", 1, 150, False))
    assert budget.ledger() == []
