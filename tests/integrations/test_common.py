"""What every integration shares: the estimate before the call, the output cap held, timeouts."""

from __future__ import annotations

import openai
import pytest

from distbudget import Budget, BudgetExceededError, BudgetScope, InvalidInputError
from distbudget.integrations import _common as C
from distbudget.integrations.openai import budgeted
from tests.integrations._llm_server import LLMServer
from tests.integrations.conftest import MODEL_RATES, OPENAI_MODEL


def test_input_estimate_without_tiktoken_encodings_is_conservative() -> None:
    # tiktoken is installed; where it cannot download its encodings (no internet) the byte estimate
    text = "The quick brown fox jumps over the lazy dog. " * 10
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    estimate = C.estimate_request_tokens(OPENAI_MODEL, messages)
    body = len(("be brief\n" + text).encode())
    encoding = C._encoding(OPENAI_MODEL)
    counted = len(encoding.encode("be brief\n" + text)) if encoding else -(-body // C.BYTES_PER_TOKEN)
    assert estimate == counted + 2 * C.MESSAGE_OVERHEAD + C.REQUEST_OVERHEAD
    if encoding is not None:
        return
    assert estimate > body / 4 + 2 * 4 + 3  # above OpenAI's own rule of thumb for English
    # multi-byte text: a token per 3 bytes is about one per CJK character
    assert C.estimate_text_tokens("claude-haiku-4-5", "日本語のテキスト") == 8
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    with_image = C.estimate_request_tokens(OPENAI_MODEL, [{"role": "user", "content": [image]}])
    assert with_image == C.IMAGE_TOKENS + C.MESSAGE_OVERHEAD + C.REQUEST_OVERHEAD  # not 33,000 tokens of base64


def test_output_cap() -> None:
    assert C.output_cap(OPENAI_MODEL, 77, 4096) == 77
    assert C.output_cap("no-such-model", None, 1234) == 1234
    assert C.output_cap("gpt-4o", None, 1234) == 16_384  # the price snapshot's maximum
    assert C.output_cap("openai/GPT-4o-2024-08-06", None, 1234) == 16_384  # names resolve as prices do
    assert C.output_cap("claude-haiku-4-5", None, 1234) == 64_000
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(InvalidInputError):
            C.output_cap(OPENAI_MODEL, bad, 4096)


def test_bad_call_arguments_send_nothing(llm: LLMServer) -> None:
    client = budgeted(openai.OpenAI(base_url=llm.base_url, api_key="t"), Budget(BudgetScope("t"), MODEL_RATES))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidInputError):
        client.chat.completions.create(model=OPENAI_MODEL, messages=messages, max_tokens=-5)
    with pytest.raises(InvalidInputError):
        client.chat.completions.create(model=OPENAI_MODEL, messages=messages, n=0)
    with pytest.raises(InvalidInputError):
        client.chat.completions.create(model="", messages=messages)
    with pytest.raises(TypeError):
        client.chat.completions.create(model=OPENAI_MODEL, messages=messages, budget_metadata=["x"])
    with pytest.raises(TypeError):
        budgeted(openai.OpenAI(api_key="t"), Budget(BudgetScope("t")), default_max_output_tokens=1.5)  # type: ignore[arg-type]
    assert llm.requests == 0


def test_n_choices_hold_n_outputs(llm: LLMServer) -> None:
    budget = Budget(BudgetScope("t", max_tokens_per_day=250), MODEL_RATES)
    client = budgeted(openai.OpenAI(base_url=llm.base_url, api_key="t"), budget)
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=OPENAI_MODEL, messages=messages, max_tokens=100)  # ~110 held: fits
    with pytest.raises(BudgetExceededError, match="day_tokens"):
        client.chat.completions.create(model=OPENAI_MODEL, messages=messages, max_tokens=100, n=2)  # ~210 > 250-110
    assert llm.requests == 1


def test_timeout_charges_the_input_estimate_flagged(llm: LLMServer) -> None:
    budget = Budget(BudgetScope("t"), MODEL_RATES)
    client = budgeted(openai.OpenAI(base_url=llm.base_url, api_key="t", max_retries=0, timeout=0.3), budget)
    llm.response_delay = 2.0  # the provider works on it (and bills it) past the client's timeout
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9)
    (entry,) = budget.ledger()
    assert entry.metadata["estimated"] is True and entry.metadata["estimate_reason"] == C.TIMED_OUT
    assert entry.input_tokens > 0 and entry.output_tokens == 0


def test_estimate_reads_a_schema_class() -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        city_name_in_full: str
        population_estimate: int

    with_schema = C.estimate_request_tokens(OPENAI_MODEL, [{"role": "user", "content": "hi"}], Answer)
    assert with_schema > C.estimate_request_tokens(OPENAI_MODEL, [{"role": "user", "content": "hi"}]) + 5
