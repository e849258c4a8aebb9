"""Fixtures of the integration tests: the local LLM provider (``_llm_server.py``), the engines a
budget runs on (embedded, and the suite's real Redis), rates that price every kind of token
differently (so a cost equal to the provider's proves each kind was counted as such), and the
ledger-versus-server comparison."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from distbudget import ModelRates
from tests.integrations._llm_server import LLMServer, Served

# LiteLLM fetches its model price map from the internet at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Every kind of token priced differently: a cost that matches proves cached, cache-write (5 min and
# 1 h) and reasoning tokens were each charged as such.
RATES = ModelRates(
    input_per_1k=0.002,
    output_per_1k=0.008,
    cached_input_per_1k=0.0005,
    cache_write_per_1k=0.003,
    reasoning_per_1k=0.012,
    cache_write_1h_per_1k=0.005,
)
OPENAI_MODEL = "gpt-4o"
ANTHROPIC_MODEL = "claude-haiku-4-5"
COMPLETION_MODEL = "gpt-3.5-turbo-instruct"
MODEL_RATES = {
    OPENAI_MODEL: RATES,
    ANTHROPIC_MODEL: RATES,
    COMPLETION_MODEL: RATES,
    "openai/gpt-4o": RATES,
    "anthropic/claude-haiku-4-5": RATES,
}


@pytest.fixture(scope="session")
def llm_server() -> Iterator[LLMServer]:
    server = LLMServer().start()
    yield server
    server.stop()


@pytest.fixture
def llm(llm_server: LLMServer) -> LLMServer:
    llm_server.reset()
    return llm_server


@pytest.fixture(params=["embedded", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """None (the embedded engine) or the suite's real Redis (flushed), as the budgets' ACL user."""
    if request.param == "embedded":
        return None
    request.getfixturevalue("redis_client")  # flushes
    url: str = request.getfixturevalue("redis_server").url
    return url


def served_cost(served: Served) -> int:
    return RATES.cost_nano(
        served.input_tokens,
        served.output_tokens,
        served.cached_input_tokens,
        served.cache_write_tokens - served.cache_write_1h_tokens,
        served.reasoning_tokens,
        cache_write_1h_tokens=served.cache_write_1h_tokens,
    )


def assert_ledger_matches(entries: list[Any], server: LLMServer) -> None:
    """The ledger holds one exact (not estimated) charge per call the server answered, with its
    tokens and its cost."""
    charges = [e for e in entries if e.kind == "charge"]
    served = list(server.served)
    assert len(charges) == len(served) > 0
    assert not [e for e in charges if e.metadata.get("estimated")]
    assert sorted((e.input_tokens, e.output_tokens, e.cost_nano_usd) for e in charges) == sorted(
        (s.input_tokens, s.output_tokens, served_cost(s)) for s in served
    )
