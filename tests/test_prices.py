"""ModelRates and PriceBook: units, tiers, overrides, unknown models, stale tables (no Redis)."""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal

import pytest

from distbudget import BudgetWarning, InvalidInputError, ModelRates, UnknownModelError
from distbudget.pricing import PriceBook

NANO = 10**9


def test_default_rates_are_agent_budgets() -> None:
    r = ModelRates()
    assert (r.input_per_1k, r.output_per_1k) == (0.002, 0.002)
    assert r.cost_nano(1000, 1000) == 4_000_000  # $0.004


def test_per_million_equals_per_1k() -> None:
    a = ModelRates.per_million(input=2.5, output=10, cached_input=1.25, cache_write=3.125, reasoning=12)
    b = ModelRates(0.0025, 0.01, cached_input_per_1k=0.00125, cache_write_per_1k=0.003125, reasoning_per_1k=0.012)
    assert a == b
    assert a.cost_nano(1_000_000, 0) == int(2.5 * NANO)
    # Decimal and str are exact too; a rate below a cent per million is not rounded away
    assert ModelRates.per_million(Decimal("0.0375"), "0.15").cost_nano(1_000_000, 1_000_000) == 187_500_000


def test_every_token_kind_at_its_rate() -> None:
    r = ModelRates.per_million(input=3, output=15, cached_input=0.3, cache_write=3.75, cache_write_1h=6, reasoning=20)
    cost = r.cost_nano(
        10_000,
        2_000,
        cached_input_tokens=4_000,
        cache_write_tokens=1_000,
        reasoning_tokens=500,
        cache_write_1h_tokens=2_000,
    )
    # 3,000 plain in, 4,000 cached, 1,000 written (5 min), 2,000 written (1 h), 1,500 out, 500 reasoning
    expected = Decimal(3_000 * 3 + 4_000 * Decimal("0.3") + 1_000 * Decimal("3.75") + 2_000 * 6 + 1_500 * 15 + 500 * 20)
    assert cost == int(expected * 1000)  # USD per 1M tokens x tokens = micro-USD; x1000 = nano-USD


def test_fallback_rates() -> None:
    r = ModelRates.per_million(input=1, output=4, cache_write=2)
    # cached read -> input, 1 h write -> 5 min write, reasoning -> output
    # 1 plain x $1 + 1 cached x $1 + 1 written for 1 h x $2 + 1 reasoning x $4 (per 1M): 8 x 1,000 nano-USD
    assert r.cost_nano(3, 1, cached_input_tokens=1, cache_write_1h_tokens=1, reasoning_tokens=1) == 8_000


def test_token_kinds_must_fit() -> None:
    r = ModelRates.per_million(1, 1)
    with pytest.raises(InvalidInputError):
        r.cost_nano(10, 0, cached_input_tokens=5, cache_write_tokens=3, cache_write_1h_tokens=3)
    with pytest.raises(InvalidInputError):
        r.cost_nano(10, 5, reasoning_tokens=6)


def test_bad_rates_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        ModelRates.per_million(-1, 1)
    with pytest.raises(InvalidInputError):
        ModelRates.per_million(float("nan"), 1)
    with pytest.raises(InvalidInputError):
        ModelRates.per_million("lots", 1)
    with pytest.raises(TypeError):
        ModelRates.per_million(True, 1)
    flat = ModelRates.per_million(1, 1)
    with pytest.raises(InvalidInputError):
        ModelRates.per_million(1, 1, long_context={0: flat})
    with pytest.raises(TypeError):
        ModelRates.per_million(1, 1, long_context={1000: "cheap"})  # type: ignore[dict-item]
    with pytest.raises(InvalidInputError):  # a tier's rates are flat
        ModelRates.per_million(1, 1, long_context={1000: ModelRates.per_million(1, 1, long_context={2000: flat})})
    with pytest.raises(InvalidInputError):
        ModelRates.per_million(1, 1, service_tiers={"default": flat})


GEMINI_LIKE = ModelRates.per_million(
    1.25,
    10,
    cached_input=0.125,
    long_context={200_000: ModelRates.per_million(2.5, 15, cached_input=0.25)},
    service_tiers={
        "batch": ModelRates.per_million(0.625, 5, long_context={200_000: ModelRates.per_million(1.25, 7.5)}),
    },
)


def test_long_context_is_a_cliff() -> None:
    at = GEMINI_LIKE.cost_nano(200_000, 1_000)
    above = GEMINI_LIKE.cost_nano(200_001, 1_000)
    assert at == 200_000 * 1250 + 1_000 * 10_000  # nano-USD: tokens x (USD per 1M / 1M) x 1e9
    # one token more and the WHOLE request, output included, is priced at the higher rates
    assert above == 200_001 * 2500 + 1_000 * 15_000
    assert GEMINI_LIKE.cost_nano(250_000, 0, cached_input_tokens=100_000) == 150_000 * 2500 + 100_000 * 250
    # a reservation holds in the tier its input falls in
    assert GEMINI_LIKE.worst_case_nano(250_000, 1_000) == 250_000 * 2500 + 1_000 * 15_000


def test_service_tiers() -> None:
    assert GEMINI_LIKE.cost_nano(1_000, 1_000, service_tier="batch") == 1_000 * 625 + 1_000 * 5_000
    assert GEMINI_LIKE.cost_nano(300_000, 0, service_tier="batch") == 300_000 * 1250
    for standard in (None, "default", "standard", "auto"):
        assert GEMINI_LIKE.cost_nano(1_000, 0, service_tier=standard) == 1_000 * 1250
    # a tier this model does not sell: its standard price (the provider bills it so)
    assert GEMINI_LIKE.cost_nano(1_000, 0, service_tier="priority") == 1_000 * 1250
    with pytest.raises(InvalidInputError, match="unknown service_tier"):
        GEMINI_LIKE.cost_nano(1_000, 0, service_tier="prioirty")
    with pytest.raises(TypeError):
        GEMINI_LIKE.cost_nano(1_000, 0, service_tier=1)  # type: ignore[arg-type]
    assert GEMINI_LIKE.estimate_cost(1_000_000, 0, service_tier="batch") == pytest.approx(1.25)


# ---- PriceBook ---------------------------------------------------------------------------------


def test_override_applies_to_every_spelling() -> None:
    mine = ModelRates.per_million(1, 2)
    book = PriceBook({"gpt-4o": mine})
    for name in ("gpt-4o", "GPT-4o", "openai/gpt-4o", "gpt-4o-2024-08-06", "azure/gpt-4o-2024-08-06", "gpt-4o-latest"):
        assert book.rates_for(name) is mine, name
        assert book.model_id(name) == "gpt-4o"
    assert book.rates_for("gpt-4o-mini") is not mine  # another model


def test_custom_models_resolve_like_table_ones() -> None:
    mine = ModelRates.per_million(1, 2)
    book = PriceBook({"My-Model": mine})
    assert book.rates_for("openai/my-model") is mine
    assert book.rates_for("my-model-2026-01-01") is mine
    assert book.model_id("MY-MODEL") == "my-model"
    assert "my-model" in book.models()


def test_unknown_model_raises_or_uses_default_with_one_warning() -> None:
    with pytest.raises(UnknownModelError, match=r"BudgetManager\.register\(scope, rates=") as err:
        PriceBook().rates_for("gpt4o")  # a typo: no form of it is known
    assert "ModelRates.per_million" in str(err.value)
    fallback = ModelRates.per_million(5, 5)
    book = PriceBook(default_rates=fallback)
    with pytest.warns(BudgetWarning, match="no known price"):
        assert book.rates_for("in-house-llm") is fallback
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert book.rates_for("in-house-llm") is fallback  # once per model


def test_a_book_layers_over_another() -> None:
    litellm = PriceBook.from_litellm(
        {"m-1": {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}}, as_of="2026-11-01"
    )
    mine = ModelRates.per_million(9, 9)
    layered = PriceBook({"other": mine}, table=litellm)
    assert layered.rates_for("m-1") == ModelRates.per_million(1, 2)
    assert layered.rates_for("other") is mine
    assert layered.as_of == dt.date(2026, 11, 1)
    with pytest.raises(UnknownModelError):
        layered.rates_for("gpt-4o")  # the table replaces the bundled one


def test_bad_book_arguments() -> None:
    with pytest.raises(TypeError):
        PriceBook({"m": (1, 2)})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        PriceBook(["m"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PriceBook(default_rates=0.002)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        PriceBook(max_age_days=-1)


def test_stale_book_warns_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    entry = {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}
    caplog.set_level(logging.WARNING, logger="distbudget.prices")
    old = PriceBook.from_litellm({"m": entry}, as_of="2019-03-04")
    assert old.stale
    PriceBook.from_litellm({"m": entry}, as_of="2019-03-04")
    PriceBook(table=old)  # every budget layers its own rates over the book: still one warning
    stale = [r for r in caplog.records if "2019-03-04" in r.getMessage()]
    assert len(stale) == 1
    assert "older than 60 days" in stale[0].getMessage()
    caplog.clear()
    # the age is configurable; a fresh or undated book says nothing
    PriceBook.from_litellm({"m": entry}, as_of="2019-03-05", max_age_days=365_000)
    PriceBook.from_litellm({"m": entry}, as_of=dt.date.today())
    PriceBook.from_litellm({"m": entry})
    assert not caplog.records
    assert PriceBook.from_litellm({"m": entry}).as_of is None


def test_for_model_uses_the_bundled_snapshot() -> None:
    assert ModelRates.for_model("openai/gpt-4o-2024-08-06") == ModelRates.for_model("gpt-4o")
    with pytest.raises(UnknownModelError):
        ModelRates.for_model("some-unknown-model")  # the seed returned its defaults: a documented deviation
