"""A pytest plugin that runs agent-budget's own test suite against distbudget.

The seed's suite (``shared/peers/agent-budget/tests/test_core.py``, MIT, kept outside this repository)
imports ``agent_budget.core``; this plugin makes that name distbudget before the suite is collected, so
the seed's tests run unmodified. The two deliberate deviations (documented in "Coming from
agent-budget") are expected failures, strict: if one starts passing, the run fails and the docs are due
an update.
"""

from __future__ import annotations

import sys
import types

import pytest

import distbudget

DEVIATIONS = {
    "test_02_model_rates_known_model": "distbudget bundles current list prices (gpt-4o is $2.50/$10 per 1M), "
    "the seed a 2024 table ($5/$15)",
    "test_03_model_rates_unknown_model_uses_defaults": "an unknown model raises UnknownModelError instead of "
    "being charged silently at $0.002/1K (pass rates= or default_rates=)",
}

_package = types.ModuleType("agent_budget")
_package.core = distbudget  # type: ignore[attr-defined]
sys.modules["agent_budget"] = _package
sys.modules["agent_budget.core"] = distbudget


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = DEVIATIONS.get(item.name)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
