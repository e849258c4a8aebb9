"""LangChain, budgeted by a callback handler: a real ``ChatOpenAI`` against the local provider."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAI

from distbudget import AsyncBudget, Budget, BudgetExceededError, BudgetManager, BudgetScope
from distbudget.integrations.langchain import AsyncBudgetCallbackHandler, BudgetCallbackHandler
from tests.integrations._llm_server import LLMServer
from tests.integrations.conftest import COMPLETION_MODEL, MODEL_RATES, OPENAI_MODEL, assert_ledger_matches


def _chat(llm: LLMServer, handler: Any, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model=OPENAI_MODEL, base_url=llm.base_url, api_key="test", callbacks=[handler], **kw)


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_chat_model_ledger_equals_served(llm: LLMServer, redis_url: str | None, stream: bool) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    handler = BudgetCallbackHandler(budget, session_id="run-1")
    for i, cap in enumerate((8, 30), 1):
        model = _chat(llm, handler, max_tokens=cap, stream_usage=True)
        if stream:
            chunks = list(model.stream(f"question {i}"))
            assert len(chunks) > 3
        else:
            assert model.invoke(f"question {i}").usage_metadata["input_token_details"]["cache_read"] > 0
    model = _chat(llm, handler, max_completion_tokens=12)
    model.batch(["one", "two"])  # one run (one hold, one commit) per prompt
    assert_ledger_matches(budget.ledger(), llm)
    assert not handler.holds


def test_async_chat_model_ledger_equals_served(llm: LLMServer, redis_url: str | None) -> None:
    async def main() -> list[Any]:
        budget = AsyncBudget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
        # an HTTP client of this event loop (langchain-openai caches a default one across loops)
        http = httpx.AsyncClient()
        model = _chat(llm, AsyncBudgetCallbackHandler(budget), max_tokens=9, stream_usage=True, http_async_client=http)
        await asyncio.gather(*(model.ainvoke(f"question {i}") for i in range(5)))
        async for _ in model.astream("streamed"):
            pass
        await http.aclose()
        return await budget.ledger()

    assert_ledger_matches(asyncio.run(main()), llm)


def test_completion_llm_on_llm_start(llm: LLMServer, redis_url: str | None) -> None:
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    model = OpenAI(
        model=COMPLETION_MODEL,
        base_url=llm.base_url,
        api_key="test",
        max_tokens=14,
        callbacks=[BudgetCallbackHandler(budget)],
    )
    model.invoke("Say something")  # a plain LLM: on_llm_start, usage from llm_output's token_usage
    assert_ledger_matches(budget.ledger(), llm)
    with pytest.raises(BudgetExceededError):
        OpenAI(
            model=COMPLETION_MODEL,
            base_url=llm.base_url,
            api_key="t",
            max_tokens=10**6,
            callbacks=[BudgetCallbackHandler(budget)],
        ).invoke("x")
    assert llm.requests == 1


def test_stream_without_usage_is_charged_an_estimate(llm: LLMServer) -> None:
    budget = Budget(BudgetScope("team"), MODEL_RATES)
    for _ in _chat(llm, BudgetCallbackHandler(budget), max_tokens=20, stream_usage=False).stream("hello"):
        pass
    (entry,) = budget.ledger()
    assert entry.metadata["estimated"] is True and entry.metadata["estimate_reason"] == "the model reported no usage"
    assert entry.input_tokens > 0 and entry.output_tokens > 0  # the text it streamed, estimated


def test_over_the_cap_the_model_is_not_called(llm: LLMServer, redis_url: str | None) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=300), MODEL_RATES, redis=redis_url)
    model = _chat(llm, BudgetCallbackHandler(budget), max_tokens=500)
    with pytest.raises(BudgetExceededError):
        model.invoke("hello")
    with pytest.raises(BudgetExceededError):
        _chat(llm, BudgetCallbackHandler(budget)).invoke("hello")  # no cap: the model maximum is held
    assert llm.requests == 0 and [e.kind for e in budget.ledger()] == ["refusal"] * 2  # nothing charged


def test_error_releases_and_scope_per_run(llm: LLMServer, redis_url: str | None) -> None:
    manager = BudgetManager(redis=redis_url)
    manager.register(BudgetScope("team", max_tokens_per_day=400), MODEL_RATES)
    manager.register(BudgetScope("alice", parent="team"), MODEL_RATES)
    handler = BudgetCallbackHandler(manager, scope="team")
    model = _chat(llm, handler, max_tokens=150, max_retries=0)
    llm.fail_next = [400]
    with pytest.raises(openai.BadRequestError):
        model.invoke("hello")
    assert not handler.holds
    # each holds ~160 of 400: a hold the error left behind would refuse the second
    model.invoke("hello", config={"metadata": {"budget_scope": "alice", "budget_session_id": "s-3"}})
    model.invoke("hello")
    entries = manager.get("team").ledger()
    assert [(e.scope, e.session_id) for e in entries][:2] == [("alice", "s-3"), ("team", "default")]
    assert_ledger_matches(entries, llm)
