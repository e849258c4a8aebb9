"""``Usage``: every provider's shape to one normal form (input includes cache reads and writes)."""

from __future__ import annotations

from typing import Any

import anthropic.types as at
import openai.types as ot
import openai.types.responses as rt
import pytest

from distbudget import Budget, BudgetScope, InvalidInputError, ModelRates, Usage


def test_openai_chat_and_responses_shapes() -> None:
    chat = ot.CompletionUsage(
        prompt_tokens=100,
        completion_tokens=40,
        total_tokens=140,
        prompt_tokens_details={"cached_tokens": 64},
        completion_tokens_details={"reasoning_tokens": 25},
    )
    assert Usage.from_openai(chat) == Usage(100, 40, cached_input_tokens=64, reasoning_tokens=25)
    bare = ot.CompletionUsage(prompt_tokens=10, completion_tokens=2, total_tokens=12)  # details are None
    assert bare.prompt_tokens_details is None
    assert Usage.from_openai(bare) == Usage(10, 2)
    responses = rt.ResponseUsage(
        input_tokens=50,
        output_tokens=30,
        total_tokens=80,
        input_tokens_details={"cached_tokens": 20, "cache_write_tokens": 5},
        output_tokens_details={"reasoning_tokens": 10},
    )
    assert Usage.from_openai(responses) == Usage(
        50, 30, cached_input_tokens=20, cache_write_tokens=5, reasoning_tokens=10
    )
    as_json: dict[str, Any] = {"usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None}}
    assert Usage.from_openai(as_json) == Usage(5, 1)  # a response (JSON) carrying its usage


def test_anthropic_cache_is_added_to_input() -> None:
    usage = at.Usage(
        input_tokens=12,
        output_tokens=30,
        cache_read_input_tokens=1000,
        cache_creation_input_tokens=300,
        cache_creation={"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
    )
    u = Usage.from_anthropic(usage)
    assert u == Usage(1312, 30, cached_input_tokens=1000, cache_write_tokens=300, cache_write_1h_tokens=100)
    assert u.cache_write_5m_tokens == 200 and u.total_tokens == 1342
    assert Usage.from_anthropic(at.Usage(input_tokens=7, output_tokens=3)) == Usage(7, 3)  # cache fields None


def test_litellm_and_langchain_shapes() -> None:
    litellm_usage = {
        "prompt_tokens": 40,
        "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 16, "cache_write_tokens": None},
        "cache_creation_input_tokens": 8,
    }
    assert Usage.from_litellm(litellm_usage) == Usage(40, 9, cached_input_tokens=16, cache_write_tokens=8)
    logged = {"prompt_tokens": 40, "completion_tokens": 9, "metadata": {"usage_object": litellm_usage}}
    assert Usage.from_litellm(logged) == Usage(40, 9, cached_input_tokens=16, cache_write_tokens=8)
    metadata = {
        "input_tokens": 350,
        "output_tokens": 240,
        "total_tokens": 590,
        "input_token_details": {"cache_read": 100, "cache_creation": 200, "ephemeral_1h_input_tokens": 50},
        "output_token_details": {"reasoning": 200},
    }
    assert Usage.from_langchain(metadata) == Usage(
        350, 240, cached_input_tokens=100, cache_write_tokens=200, reasoning_tokens=200, cache_write_1h_tokens=50
    )


@pytest.mark.parametrize(
    ("build", "source"),
    [
        (Usage.from_openai, None),
        (Usage.from_openai, {"foo": 1}),
        (Usage.from_openai, {"prompt_tokens": -1, "completion_tokens": 0}),
        (Usage.from_openai, {"prompt_tokens": 1.5, "completion_tokens": 0}),
        (
            Usage.from_openai,
            {"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 11}},
        ),
        (
            Usage.from_openai,
            {"prompt_tokens": 10, "completion_tokens": 1, "completion_tokens_details": {"reasoning_tokens": 2}},
        ),
        (Usage.from_anthropic, {"output_tokens": True}),
        (Usage.from_litellm, {"total_tokens": 3}),
        (Usage.from_langchain, {}),
    ],
)
def test_bad_usage_is_refused(build: Any, source: Any) -> None:
    with pytest.raises(InvalidInputError):
        build(source)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidInputError, match="from_anthropic"):
        Usage(10, 5, cached_input_tokens=8, cache_write_tokens=4)  # the natural Anthropic mistake
    with pytest.raises(InvalidInputError):
        Usage(10, 5, cache_write_tokens=2, cache_write_1h_tokens=3)
    with pytest.raises(InvalidInputError):
        Usage("10", 5)  # type: ignore[arg-type]


def test_record_and_commit_take_a_usage(redis_url: str | None) -> None:
    """Every part priced at its own rate, 1-hour cache writes included, on both engines."""
    rates = ModelRates.per_million(3.0, 15.0, cached_input=0.3, cache_write=3.75, cache_write_1h=6.0, reasoning=20.0)
    budget = Budget(BudgetScope("t"), {"claude-haiku-4-5": rates}, redis=redis_url)
    u = Usage(1312, 30, cached_input_tokens=1000, cache_write_tokens=300, cache_write_1h_tokens=100)
    # 12 plain input, 1000 read, 200 written for 5 min, 100 for 1 h, 30 output
    expected = 12 * 3000 + 1000 * 300 + 200 * 3750 + 100 * 6000 + 30 * 15000  # nano-USD
    assert budget.record("s", "claude-haiku-4-5", u).cost_nano_usd == expected
    with budget.reserve("claude-haiku-4-5", 2000, 100) as hold:
        assert hold.commit(u, metadata={"k": "v"}).cost_nano_usd == expected
    assert [e.cost_nano_usd for e in budget.ledger()] == [expected, expected]
    with pytest.raises(TypeError):
        budget.record("s", "claude-haiku-4-5", u, 30)  # a Usage comes alone
    with pytest.raises(TypeError):
        budget.record("s", "claude-haiku-4-5", 10)  # numbers need output_tokens
    assert len(budget.ledger()) == 2  # the refused calls wrote nothing


def test_charge_args() -> None:
    from distbudget._core.usage import charge_args

    u = Usage(100, 20, cached_input_tokens=50, cache_write_tokens=10, reasoning_tokens=5)
    assert charge_args(u, None) == (100, 20, 50, 10, 5, 0)
    assert charge_args(7, 3, 1, 2, 0) == (7, 3, 1, 2, 0, 0)
    with pytest.raises(TypeError):
        charge_args(u, 20)
    with pytest.raises(TypeError):
        charge_args(u, None, cached_input_tokens=1)
    with pytest.raises(TypeError):
        charge_args(7, None)
