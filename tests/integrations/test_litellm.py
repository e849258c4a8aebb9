"""LiteLLM, budgeted: ``completion``/``acompletion(..., budget=)`` through LiteLLM's real provider code to
the local OpenAI- and Anthropic-compatible endpoints, and the proxy's ``BudgetLogger`` hooks driven as
the proxy drives them (pre-call hook, then the call with the logger registered as a LiteLLM callback)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import litellm
import pytest
from litellm.proxy._types import UserAPIKeyAuth

from distbudget import AsyncBudget, AsyncBudgetManager, Budget, BudgetExceededError, BudgetScope
from distbudget.integrations.litellm import BudgetLogger, acompletion, completion
from tests.integrations._llm_server import LLMServer
from tests.integrations.conftest import MODEL_RATES, assert_ledger_matches

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _request(llm: LLMServer, provider: str, i: int, cap: int) -> dict[str, Any]:
    if provider == "openai":
        target = {"model": "openai/gpt-4o", "api_base": llm.base_url}
    else:
        target = {"model": "anthropic/claude-haiku-4-5", "api_base": llm.url}
    messages = [{"role": "user", "content": f"question {i} " * i}]
    return {**target, "api_key": "test", "messages": messages, "max_tokens": cap}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_completion_ledger_equals_served(llm: LLMServer, redis_url: str | None, provider: str, stream: bool) -> None:
    llm.mid_stream_delta = False  # LiteLLM stops an Anthropic stream at the first message_delta
    budget = Budget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)
    for i, cap in enumerate((8, 21), 1):
        reply = completion(**_request(llm, provider, i, cap), stream=stream, budget=budget, budget_session_id="r-1")
        if stream:
            assert len(list(reply)) > 3
        else:
            assert reply.usage.prompt_tokens > 0
    assert_ledger_matches(budget.ledger(), llm)
    assert {e.session_id for e in budget.ledger()} == {"r-1"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_acompletion_ledger_equals_served(llm: LLMServer, redis_url: str | None, stream: bool) -> None:
    async def main() -> list[Any]:
        budget = AsyncBudget(BudgetScope("team", max_cost_per_day_usd=5.0), MODEL_RATES, redis=redis_url)

        async def one(i: int) -> None:
            reply = await acompletion(**_request(llm, "openai", i, 5 + i), stream=stream, budget=budget)
            if stream:
                assert len([c async for c in reply]) > 3

        await asyncio.gather(*(one(i) for i in range(1, 5)))
        return await budget.ledger()

    assert_ledger_matches(asyncio.run(main()), llm)


def test_completion_over_the_cap_sends_nothing(llm: LLMServer, redis_url: str | None) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=300), MODEL_RATES, redis=redis_url)
    with pytest.raises(BudgetExceededError):
        completion(**_request(llm, "openai", 1, 500), budget=budget)
    assert llm.requests == 0 and [e.kind for e in budget.ledger()] == ["refusal"]  # nothing charged


async def _until(predicate: Any) -> None:
    """LiteLLM runs its success callbacks in tasks of their own: wait (bounded) until they ran."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"LiteLLM never called the logger: {predicate}")


def test_proxy_logger_holds_commits_and_releases(llm: LLMServer, redis_url: str | None) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        manager = AsyncBudgetManager(redis=redis_url)
        await manager.register(BudgetScope("team-a", max_cost_per_day_usd=5.0), MODEL_RATES)
        await manager.register(BudgetScope("alice", max_tokens_per_day=400, parent="team-a"), MODEL_RATES)
        logger = BudgetLogger(manager, scope_from=("metadata.budget_scope", "user_id"), scope_names={"u-1": "alice"})
        alice = UserAPIKeyAuth(user_id="u-1", team_id="team-a")
        saved = litellm.callbacks
        litellm.callbacks = [logger]
        try:

            async def proxied(key: UserAPIKeyAuth, cap: int) -> Any:
                data = {**_request(llm, "openai", 2, cap), "litellm_call_id": str(uuid.uuid4())}
                data = await logger.async_pre_call_hook(key, None, data, "completion")
                try:
                    return await litellm.acompletion(**data)
                except Exception as exc:
                    await logger.async_post_call_failure_hook(data, exc, key)
                    raise

            await proxied(alice, 40)
            await proxied(UserAPIKeyAuth(user_id="u-2", metadata={"budget_scope": "team-a"}), 30)
            await _until(lambda: not logger.holds)
            llm.fail_next = [400]
            with pytest.raises(litellm.BadRequestError):
                await proxied(alice, 150)
            assert not logger.holds
            served = llm.requests
            with pytest.raises(BudgetExceededError) as refused:  # alice: 400 tokens a day
                await proxied(alice, 500)
            assert getattr(refused.value, "status_code", None) == 429
            assert llm.requests == served  # refused in the hook: nothing reached the provider
            await proxied(alice, 150)  # fits only because the failed call's hold was released
            await _until(lambda: not logger.holds)
        finally:  # LiteLLM keeps one logger per class: unregister it so the next test's logger is called
            litellm.callbacks = saved
            litellm.logging_callback_manager.remove_callback_from_all_lists(logger)
        team = await manager.get("team-a")
        return await team.ledger(), [(e.kind, e.scope) for e in await team.ledger()]

    entries, scopes = asyncio.run(main())
    assert scopes == [("charge", "alice"), ("charge", "team-a"), ("refusal", "alice"), ("charge", "alice")]
    assert_ledger_matches(entries, llm)
