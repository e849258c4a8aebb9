"""PriceBook.from_genai_prices() prices like genai-prices' own calculator (optional extra)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

import pytest

from distbudget.pricing import PriceBook

genai_prices = pytest.importorskip("genai_prices", reason="the genai-prices extra is not installed")

# (provider, model) across providers, with long-context tiers and cache rates among them
MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-5.1"),
    ("anthropic", "claude-sonnet-4-6"),
    ("anthropic", "claude-opus-4-7"),
    ("google", "gemini-2.5-pro"),
    ("google", "gemini-3.5-flash"),
    ("deepseek", "deepseek-chat"),
    ("mistral", "mistral-large-latest"),
]


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.from_genai_prices()


def theirs(provider: str, model: str, **usage: int) -> int:
    # today at noon UTC: the book holds list prices, not a provider's off-peak discount (DeepSeek
    # halves its prices at night UTC, which made this test depend on the hour it ran)
    noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    usage_ = genai_prices.Usage(**usage)
    price = genai_prices.calc_price(usage_, model, provider_id=provider, genai_request_timestamp=noon).total_price
    return int((price * 10**9).to_integral_value(rounding=ROUND_HALF_UP))


@pytest.mark.parametrize(("provider", "model"), MODELS)
def test_costs_equal_genai_prices(provider: str, model: str, book: PriceBook) -> None:
    r = book.rates_for(f"{provider}/{model}")
    assert r.cost_nano(10_000, 2_000) == theirs(provider, model, input_tokens=10_000, output_tokens=2_000)
    assert r.cost_nano(10_000, 2_000, cached_input_tokens=6_000) == theirs(
        provider, model, input_tokens=10_000, output_tokens=2_000, cache_read_tokens=6_000
    )
    # above any long-context threshold: the whole request at the tier (genai-prices bills cliffs too)
    assert r.cost_nano(250_000, 1_000) == theirs(provider, model, input_tokens=250_000, output_tokens=1_000)


def test_tiers_and_names(book: PriceBook) -> None:
    pro = book.rates_for("gemini-2.5-pro")
    assert [t for t, _ in pro.long_context] == [200_000]
    assert pro.cost_nano(250_000, 0) > 2 * pro.cost_nano(125_000, 0)  # the cliff
    assert book.model_id("openai/gpt-4o-2024-08-06") == "gpt-4o"
    batch = book.rates_for("gpt-4o").cost_nano(1_000_000, 0, service_tier="batch")
    assert batch == book.rates_for("gpt-4o").cost_nano(1_000_000, 0) // 2
    assert Decimal(book.rates_for("gpt-4o").cost_nano(1_000_000, 0)) / 10**9 == Decimal("2.5")
