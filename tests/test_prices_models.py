"""The model resolver (issue 13, "Model identity"): one canonical id per model, whatever the spelling."""

from __future__ import annotations

import pytest

from distbudget._core.models import canonical_model, name_forms
from distbudget.pricing import PriceBook


class Catalog:
    """A stand-in book: exact names -> canonical ids."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids

    def canonical_id(self, exact_name: str) -> str | None:
        return self.ids.get(exact_name)


BOOK = Catalog({"gpt-4o": "gpt-4o", "gpt-4o-2024-05-13": "gpt-4o", "claude-sonnet-4-5": "claude-sonnet-4-5"})


@pytest.mark.parametrize(
    "name",
    [
        "gpt-4o",
        "GPT-4o",
        "openai/gpt-4o",
        "OpenAI/GPT-4o",
        "azure/gpt-4o",
        "azure/eu/gpt-4o",
        "openrouter/openai/gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4o-latest",
        "openai/gpt-4o-2024-11-20",
        "gpt-4o-2024-05-13",
    ],
)
def test_spellings_of_one_model(name: str) -> None:
    assert canonical_model(name, BOOK) == "gpt-4o"


@pytest.mark.parametrize(
    "name",
    [
        "claude-sonnet-4-5-20250929",
        "anthropic/claude-sonnet-4-5-20250929",
        "claude-sonnet-4-5@20250929",  # Vertex AI
        "anthropic.claude-sonnet-4-5-20250929-v1:0",  # Bedrock
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",  # Bedrock cross-region
        "bedrock/us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "claude-sonnet-4-5-latest",
    ],
)
def test_dated_and_hosted_snapshots(name: str) -> None:
    assert canonical_model(name, BOOK) == "claude-sonnet-4-5"


@pytest.mark.parametrize("name", ["gpt4o", "gpt-4", "gpt-4o-mini", "claude-sonnet-4", "", "gpt-4o/extra"])
def test_other_names_are_unknown(name: str) -> None:
    assert canonical_model(name, BOOK) is None


def test_forms_go_from_specific_to_general() -> None:
    forms = list(dict.fromkeys(name_forms("Azure/GPT-4o-2024-08-06")))
    assert forms == [
        "Azure/GPT-4o-2024-08-06",
        "azure/gpt-4o-2024-08-06",
        "azure/gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4o",
    ]
    # version digits that are part of a name are kept
    for name in ("gpt-5.4", "gemini-3.5-flash", "claude-opus-4-7", "o3-mini", "gpt-4"):
        assert list(dict.fromkeys(name_forms(name))) == [name]


@pytest.mark.parametrize(
    ("name", "model_id"),
    [
        ("openai/gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-latest", "gpt-4o"),
        ("azure/gpt-5.1", "gpt-5.1"),
        ("anthropic/claude-opus-4-7-20260416", "claude-opus-4-7"),
        ("us.anthropic.claude-sonnet-4-6", "claude-sonnet-4-6"),
        ("gemini/gemini-2.5-pro", "gemini-2.5-pro"),
        ("vertex_ai/gemini-3.5-flash", "gemini-3.5-flash"),
        # agent-budget's names: kept from the curated table, dated spellings resolve to them
        ("claude-3-opus", "claude-3-opus"),
        ("claude-3-opus-20240229", "claude-3-opus"),
        ("bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("gemini-1.5-pro-002", "gemini-1.5-pro"),
    ],
)
def test_bundled_snapshot_ids(name: str, model_id: str) -> None:
    assert PriceBook().model_id(name) == model_id


def test_a_dated_snapshot_keeps_its_own_price_under_the_family_id() -> None:
    book = PriceBook()
    assert book.model_id("gpt-4o-2024-05-13") == "gpt-4o"
    # gpt-4o-2024-05-13 was sold at $5 / $15 per 1M, gpt-4o at $2.50 / $10
    assert book.rates_for("gpt-4o-2024-05-13").cost_nano(1_000_000, 0) == 5 * 10**9
    assert book.rates_for("gpt-4o").cost_nano(1_000_000, 0) == 2_500_000_000


def test_provider_prices_win_over_the_family() -> None:
    book = PriceBook()
    # Azure's EU data zone charges 10% over OpenAI's list price; the id is still gpt-5.1
    assert book.model_id("azure/eu/gpt-5.1") == "gpt-5.1"
    assert book.rates_for("azure/eu/gpt-5.1").cost_nano(1_000_000, 0) == 1_375_000_000
    assert book.rates_for("gpt-5.1").cost_nano(1_000_000, 0) == 1_250_000_000
