"""PriceBook.from_litellm against LiteLLM's own file, the bundled snapshot, and budgets that charge it.

The file (MIT) is not in this repository: CI finds it in ``shared/data`` beside the clone, and the
tests that read it skip when it is absent.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from distbudget import BudgetScope, InvalidInputError, ModelRates, UnknownModelError
from distbudget.pricing import PriceBook
from tests.conftest import Backend

LITELLM_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "litellm_model_prices.json"
needs_file = pytest.mark.skipif(
    not LITELLM_PATH.is_file(),
    reason=f"LiteLLM price file not found at {LITELLM_PATH} (CI puts shared/ beside the repo)",
)

# 20 models across providers and hosts, each with its rate kinds (cache writes, 1 h writes,
# reasoning, batch, long-context tiers, tiered_pricing) where the file has them.
MODELS = [
    "gpt-5.1",
    "gpt-5.4",
    "gpt-6-sol",
    "gpt-4o",
    "o3",
    "azure/eu/gpt-5.1",
    "claude-sonnet-4-6",
    "claude-sonnet-5",
    "claude-opus-4-7",
    "claude-haiku-4-5",
    "us.anthropic.claude-sonnet-4-6",
    "vertex_ai/claude-opus-4-7",
    "gemini-3.5-flash",
    "gemini-2.5-flash",
    "gemini/gemini-2.5-pro",
    "deepseek/deepseek-chat",
    "deepseek/deepseek-reasoner",
    "mistral/mistral-large-latest",
    "xai/grok-4.5",
    "dashscope/qwen-flash",
]
# The models of issue 16 that raised UnknownModelError with the old 34-model table.
CURRENT = ["gpt-5.1", "gpt-5.2", "gpt-5.4", "gpt-6-sol", "claude-sonnet-4-6", "claude-sonnet-5", "claude-opus-4-7"]
CURRENT += ["gemini-3.5-flash"]


@pytest.fixture(scope="module")
def litellm() -> dict[str, Any]:
    with LITELLM_PATH.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.from_litellm(LITELLM_PATH)


def nano(usd: Decimal) -> int:
    return int((usd * 10**9).to_integral_value(rounding=ROUND_HALF_UP))


def rate(entry: dict[str, Any], field: str) -> Decimal:
    return Decimal(repr(entry[field]))


@needs_file
@pytest.mark.parametrize("model", MODELS)
def test_costs_equal_the_files_per_token_fields(model: str, litellm: dict[str, Any], book: PriceBook) -> None:
    e = litellm[model]
    if "input_cost_per_token" not in e:  # priced by bands only: the first band is the base price
        e = e["tiered_pricing"][0]
    r = book.rates_for(model)
    inp, out = rate(e, "input_cost_per_token"), rate(e, "output_cost_per_token")
    # plain (10,000 in, 2,000 out: below every long-context threshold of the file)
    assert r.cost_nano(10_000, 2_000) == nano(10_000 * inp + 2_000 * out)
    kinds = 0
    if "cache_read_input_token_cost" in e:  # 6,000 of the input read from the cache
        cached = rate(e, "cache_read_input_token_cost")
        assert r.cost_nano(10_000, 2_000, cached_input_tokens=6_000) == nano(4_000 * inp + 6_000 * cached + 2_000 * out)
        kinds += 1
    if "cache_creation_input_token_cost" in e:  # 3,000 written to the cache (5 min)
        write = rate(e, "cache_creation_input_token_cost")
        assert r.cost_nano(10_000, 0, cache_write_tokens=3_000) == nano(7_000 * inp + 3_000 * write)
        kinds += 1
    if "cache_creation_input_token_cost_above_1hr" in e:  # ... and for 1 hour
        write_1h = rate(e, "cache_creation_input_token_cost_above_1hr")
        assert r.cost_nano(10_000, 0, cache_write_1h_tokens=3_000) == nano(7_000 * inp + 3_000 * write_1h)
        kinds += 1
    if "output_cost_per_reasoning_token" in e:  # 1,500 of the output were reasoning
        reasoning = rate(e, "output_cost_per_reasoning_token")
        assert r.cost_nano(0, 2_000, reasoning_tokens=1_500) == nano(500 * out + 1_500 * reasoning)
        kinds += 1
    if "input_cost_per_token_batches" in e:  # the Batch API
        b_in, b_out = rate(e, "input_cost_per_token_batches"), rate(e, "output_cost_per_token_batches")
        assert r.cost_nano(10_000, 2_000, service_tier="batch") == nano(10_000 * b_in + 2_000 * b_out)
        kinds += 1
    for tier in ("flex", "priority"):
        if f"input_cost_per_token_{tier}" in e and f"output_cost_per_token_{tier}" in e:
            t_in, t_out = rate(e, f"input_cost_per_token_{tier}"), rate(e, f"output_cost_per_token_{tier}")
            assert r.cost_nano(10_000, 2_000, service_tier=tier) == nano(10_000 * t_in + 2_000 * t_out)
            kinds += 1
    assert kinds or model == "dashscope/qwen-flash"  # every other model checks more than the plain rates


@needs_file
def test_the_twenty_cover_every_kind(litellm: dict[str, Any]) -> None:
    fields = {f for m in MODELS for f in litellm[m]}
    for f in (
        "cache_read_input_token_cost",
        "cache_creation_input_token_cost",
        "cache_creation_input_token_cost_above_1hr",
        "output_cost_per_reasoning_token",
        "input_cost_per_token_batches",
        "input_cost_per_token_flex",
        "input_cost_per_token_priority",
        "input_cost_per_token_above_200k_tokens",
        "input_cost_per_token_above_272k_tokens",
        "tiered_pricing",
    ):
        assert f in fields, f
    providers = {litellm[m]["litellm_provider"] for m in MODELS}
    assert len(providers) >= 10, providers


@needs_file
def test_a_250k_prompt_is_priced_wholly_at_the_200k_tier(litellm: dict[str, Any], book: PriceBook) -> None:
    e = litellm["gemini/gemini-2.5-pro"]
    r = book.rates_for("gemini/gemini-2.5-pro")
    high_in, high_out = (
        rate(e, "input_cost_per_token_above_200k_tokens"),
        rate(e, "output_cost_per_token_above_200k_tokens"),
    )
    assert high_in == 2 * rate(e, "input_cost_per_token")
    cost = r.cost_nano(250_000, 4_000)
    assert cost == nano(250_000 * high_in + 4_000 * high_out)  # $0.685, not the excess alone
    excess_only = nano(
        200_000 * rate(e, "input_cost_per_token") + 50_000 * high_in + 4_000 * rate(e, "output_cost_per_token")
    )
    assert excess_only < cost * 0.7  # what pricing the excess alone would have understated
    # cached reads above the threshold are priced at that tier's cache rate; batch has its own tier
    cached_high = rate(e, "cache_read_input_token_cost_above_200k_tokens")
    assert r.cost_nano(250_000, 0, cached_input_tokens=200_000) == nano(50_000 * high_in + 200_000 * cached_high)
    batch_high = rate(e, "input_cost_per_token_above_200k_tokens_batches")
    assert r.cost_nano(250_000, 0, service_tier="batch") == nano(250_000 * batch_high)
    # at the threshold itself: the base rates
    assert r.cost_nano(200_000, 0) == nano(200_000 * rate(e, "input_cost_per_token"))


@needs_file
def test_tiered_pricing_bands_are_cliffs_too(litellm: dict[str, Any], book: PriceBook) -> None:
    bands = litellm["dashscope/qwen-flash"]["tiered_pricing"]
    low, high = bands[0], bands[1]
    threshold = int(high["range"][0])
    r = book.rates_for("dashscope/qwen-flash")
    assert r.cost_nano(threshold, 0) == nano(threshold * rate(low, "input_cost_per_token"))
    assert r.cost_nano(threshold + 1, 10) == nano(
        (threshold + 1) * rate(high, "input_cost_per_token") + 10 * rate(high, "output_cost_per_token")
    )


@needs_file
def test_a_name_resolves_through_provider_prefix_and_dated_snapshot(litellm: dict[str, Any], book: PriceBook) -> None:
    for name in ("openai/gpt-4o-2024-08-06", "OpenAI/GPT-4o-2024-08-06"):
        assert book.model_id(name) == "gpt-4o"
        e = litellm["gpt-4o-2024-08-06"]  # its own entry prices it
        assert book.rates_for(name).cost_nano(1_000, 1_000) == nano(
            1_000 * rate(e, "input_cost_per_token") + 1_000 * rate(e, "output_cost_per_token")
        )
    assert book.model_id("anthropic/claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert book.model_id("bedrock/us.anthropic.claude-sonnet-4-6") == "claude-sonnet-4-6"


@needs_file
def test_the_bundled_snapshot_prices_like_the_file(book: PriceBook) -> None:
    bundled = PriceBook()
    assert set(book.table.rates) <= set(bundled.table.rates)
    differ = [m for m, r in book.table.rates.items() if bundled.table.rates[m] != r]
    assert not differ
    # the same ids, except where a curated name (kept for models the file no longer lists, such as
    # claude-3-haiku) is the more general name of the file's dated or hosted spellings
    curated = {m for m, p in bundled.table.rates.items() if m not in book.table.rates}
    for name in book.table.rates:
        if book.table.ids[name] != bundled.table.ids[name]:
            assert bundled.table.ids[name] in curated, name


@needs_file
def test_a_file_is_dated_by_its_modification_day(book: PriceBook) -> None:
    mtime = dt.datetime.fromtimestamp(LITELLM_PATH.stat().st_mtime, dt.timezone.utc).date()
    assert book.as_of == mtime
    assert PriceBook.from_litellm(LITELLM_PATH, as_of="2026-10-01").as_of == dt.date(2026, 10, 1)


@pytest.mark.parametrize("model", CURRENT)
def test_current_models_are_in_the_snapshot(model: str) -> None:
    assert PriceBook().model_id(model) == model


def test_gpt_5_3_is_not_in_the_file() -> None:
    # LiteLLM lists gpt-5.3-codex and gpt-5.3-chat-latest only; guessing would be a wrong price.
    with pytest.raises(UnknownModelError):
        PriceBook().rates_for("gpt-5.3")
    assert PriceBook().model_id("gpt-5.3-chat-latest") == "gpt-5.3-chat-latest"


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no token-priced"):
        PriceBook.from_litellm({"sample_spec": {"mode": "chat", "input_cost_per_token": "0.0"}})
    bad = {
        "m": {
            "mode": "chat",
            "input_cost_per_token": 1e-06,
            "output_cost_per_token": 1e-06,
            "cache_read_input_token_cost": -1,
        }
    }
    with pytest.raises(InvalidInputError, match=r"m\.cache_read_input_token_cost"):
        PriceBook.from_litellm(bad)
    broken = tmp_path / "prices.json"
    broken.write_text("{not json", "utf-8")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        PriceBook.from_litellm(broken)
    with pytest.raises(TypeError):
        PriceBook.from_litellm(42)  # type: ignore[arg-type]


# ---- budgets charge the snapshot --------------------------------------------------------------


def test_budget_records_a_current_model_at_the_snapshot_price(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("e2e-prices", max_cost_per_day_usd=10))
    rec = budget.record("s", "gpt-5.1", 10_000, 2_000)  # raised UnknownModelError before
    # gpt-5.1: $1.25 in / $10 out per 1M
    assert rec.cost_usd == pytest.approx(0.0125 + 0.02)
    rec = budget.record(
        "s", "openai/claude-sonnet-4-6", 10_000, 1_000, cached_input_tokens=8_000, cache_write_tokens=1_000
    )
    # claude-sonnet-4-6: $3 in, $0.30 cache read, $3.75 cache write, $15 out per 1M
    assert rec.cost_usd == pytest.approx((1_000 * 3 + 8_000 * 0.3 + 1_000 * 3.75 + 1_000 * 15) / 1e6)
    assert budget.estimate("gemini-3.5-flash", 1_000_000, 0) == pytest.approx(1.5)
    assert budget.summary()["day"]["cost_usd"] == pytest.approx(0.0325 + 0.02415)


def test_registered_rates_keep_their_tiers(backend: Backend) -> None:
    """Custom rates stored in the shared registry come back whole: 1 h cache writes, long-context
    and service tiers (a worker that finds the scope by name prices exactly like the admin)."""
    tiered = ModelRates.per_million(
        1,
        4,
        cache_write_1h=2,
        long_context={100_000: ModelRates.per_million(2, 8)},
        service_tiers={"batch": ModelRates.per_million(0.5, 2, long_context={100_000: ModelRates.per_million(1, 4)})},
    )
    admin = backend.manager()
    admin.register(BudgetScope("priced-team", max_cost_per_day_usd=100), {"in-house": tiered})
    worker = backend.manager()  # registers nothing: reads the registry
    rec = worker.record("priced-team", "s", "in-house", 150_000, 1_000)
    assert rec.cost_usd == pytest.approx((150_000 * 2 + 1_000 * 8) / 1e6)  # the cliff tier
    assert ModelRates.from_dict(tiered.to_dict()) == tiered
    assert ModelRates.from_dict(ModelRates(0.001, 0.002).to_dict()) == ModelRates(0.001, 0.002)
    with pytest.raises(InvalidInputError, match="unknown rate fields"):
        ModelRates.from_dict({"input_per_1k": 1, "output_per_1k": 1, "colour": "red"})
