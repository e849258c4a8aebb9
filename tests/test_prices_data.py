"""Checks for the built-in price table ``distbudget/data/prices.json``.

The table is loaded by path (not through ``importlib.resources``) so that these
tests run even before the package itself is importable.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

PRICES_PATH = Path(__file__).resolve().parents[1] / "distbudget" / "data" / "prices.json"
LITELLM_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "litellm_model_prices.json"

TOP_LEVEL_KEYS = {"as_of", "unit", "note", "models", "aliases"}
REQUIRED_RATE_KEYS = ("input", "output")
OPTIONAL_RATE_KEYS = ("cached_input", "cache_write", "reasoning")
ALLOWED_MODEL_KEYS = {"provider", *REQUIRED_RATE_KEYS, *OPTIONAL_RATE_KEYS}
PROVIDERS = {"openai", "anthropic", "google"}

# Model names used by the seed library; each must resolve directly or via an alias.
SEED_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "claude-3-opus",
    "claude-3-sonnet",
    "claude-3-haiku",
    "gemini-1.5-pro",
    "gemini-1.5-flash",
)

# Our rate key -> LiteLLM field (LiteLLM stores USD per single token).
LITELLM_FIELDS = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cached_input": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
}

# Known, deliberate differences from the LiteLLM table, keyed by
# (LiteLLM entry name, our rate key). Each value is the one-line reason.
# Keep this as small as possible: an entry here means we knowingly disagree.
LITELLM_ALLOWED_DIFFERENCES: dict[tuple[str, str], str] = {}


def _load_prices() -> dict:
    with PRICES_PATH.open(encoding="utf-8") as fh:
        return json.load(fh)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _resolve(data: dict, name: str) -> str | None:
    if name in data["models"]:
        return name
    return data["aliases"].get(name)


def test_top_level_schema() -> None:
    data = _load_prices()
    assert set(data) == TOP_LEVEL_KEYS
    assert data["unit"] == "USD per 1M tokens"
    assert isinstance(data["note"], str) and data["note"].strip()
    assert isinstance(data["models"], dict) and data["models"]
    assert isinstance(data["aliases"], dict)


def test_as_of_is_a_date() -> None:
    data = _load_prices()
    as_of = dt.date.fromisoformat(data["as_of"])
    assert as_of.year >= 2024


def test_model_entries_schema() -> None:
    data = _load_prices()
    for name, entry in data["models"].items():
        assert isinstance(name, str) and name == name.strip() and name, name
        assert isinstance(entry, dict), name
        unknown = set(entry) - ALLOWED_MODEL_KEYS
        assert not unknown, f"{name}: unknown keys {sorted(unknown)}"
        assert entry.get("provider") in PROVIDERS, f"{name}: bad provider"
        for key in REQUIRED_RATE_KEYS:
            value = entry.get(key)
            assert _is_number(value) and value >= 0, f"{name}.{key} = {value!r}"
        for key in OPTIONAL_RATE_KEYS:
            value = entry.get(key)
            assert value is None or (_is_number(value) and value >= 0), f"{name}.{key} = {value!r}"


def test_aliases_point_at_models() -> None:
    data = _load_prices()
    models = data["models"]
    for alias, target in data["aliases"].items():
        assert isinstance(alias, str) and alias, alias
        assert alias not in models, f"alias {alias!r} shadows a model key"
        assert target in models, f"alias {alias!r} -> unknown model {target!r}"


@pytest.mark.parametrize("name", SEED_MODELS)
def test_seed_model_names_resolve(name: str) -> None:
    assert _resolve(_load_prices(), name) is not None, name


def _litellm_candidates(name: str, provider: str) -> list[str]:
    # LiteLLM keys Gemini Developer API models as "gemini/<name>" and Vertex AI
    # ones by the bare name; both are checked for Google models.
    names = [name]
    if provider == "google":
        names.append(f"gemini/{name}")
    return names


def test_rates_match_litellm_table() -> None:
    if not LITELLM_PATH.is_file():
        pytest.skip(f"LiteLLM price table not found at {LITELLM_PATH}")
    with LITELLM_PATH.open(encoding="utf-8") as fh:
        litellm = json.load(fh)

    data = _load_prices()
    names_by_model: dict[str, list[str]] = {m: [m] for m in data["models"]}
    for alias, target in data["aliases"].items():
        names_by_model[target].append(alias)

    mismatches: list[str] = []
    used_allowances: set[tuple[str, str]] = set()
    compared = 0
    for model, entry in data["models"].items():
        for name in names_by_model[model]:
            for key in _litellm_candidates(name, entry["provider"]):
                ref = litellm.get(key)
                if not isinstance(ref, dict):
                    continue
                if not (_is_number(ref.get("input_cost_per_token")) and _is_number(ref.get("output_cost_per_token"))):
                    continue
                compared += 1
                for ours_key, ref_field in LITELLM_FIELDS.items():
                    ours = entry.get(ours_key)
                    theirs = ref.get(ref_field)
                    if not _is_number(theirs):
                        # LiteLLM lacks this rate; nothing to compare.
                        continue
                    theirs_per_m = theirs * 1e6
                    if ours is not None and math.isclose(ours, theirs_per_m, rel_tol=1e-9, abs_tol=1e-12):
                        continue
                    if (key, ours_key) in LITELLM_ALLOWED_DIFFERENCES:
                        used_allowances.add((key, ours_key))
                        continue
                    mismatches.append(f"{model} via {key!r}: {ours_key} ours={ours!r} litellm={theirs_per_m!r}")
                # A distinct reasoning-token rate in LiteLLM must be mirrored.
                reasoning = ref.get("output_cost_per_reasoning_token")
                if _is_number(reasoning) and not math.isclose(reasoning, ref["output_cost_per_token"], rel_tol=1e-9):
                    ours = entry.get("reasoning")
                    if ours is None or not math.isclose(ours, reasoning * 1e6, rel_tol=1e-9):
                        if (key, "reasoning") in LITELLM_ALLOWED_DIFFERENCES:
                            used_allowances.add((key, "reasoning"))
                        else:
                            mismatches.append(
                                f"{model} via {key!r}: reasoning ours={ours!r} litellm={reasoning * 1e6!r}"
                            )

    assert compared > 0, "no model of ours was found in the LiteLLM table"
    assert not mismatches, "rates differ from LiteLLM:\n" + "\n".join(mismatches)
    stale = set(LITELLM_ALLOWED_DIFFERENCES) - used_allowances
    assert not stale, f"allow-list entries no longer needed: {sorted(stale)}"
