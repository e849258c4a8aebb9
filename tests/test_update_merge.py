"""The merge behind ``BudgetManager.update`` (distbudget/_core/update.py): only the named fields
change, the result is validated as a whole, and the swap refuses a stale read."""

from __future__ import annotations

import json

import pytest

from distbudget._core import registry as R
from distbudget._core.prices import ModelRates
from distbudget._core.scope import BudgetScope, Limit
from distbudget._core.update import merge, parse_assignments, swap
from distbudget._exceptions import InvalidInputError

RATES = {"my-model": ModelRates.per_million(3, 15)}


def config() -> str:
    scope = BudgetScope(
        "team",
        max_cost_per_day_usd=10.0,
        limits=[Limit("requests", 100, "1m")],
        alert_at_pct=0.5,
        parent="org",
    )
    return R.scope_config(scope, RATES)


def test_only_the_named_fields_change() -> None:
    old = config()
    new = merge(old, {"max_cost_per_day_usd": 2.5})
    scope, rates = R.from_chain([new])
    assert scope.max_cost_per_day_usd == 2.5
    assert scope.limits == [Limit("requests", 100, "1m")]
    assert scope.alert_at_pct == 0.5
    assert rates == RATES  # custom rates kept: the bug of re-registering without rates=
    assert json.loads(new)["parent"] == "org"
    before, after = json.loads(old), json.loads(new)
    before["scope"].pop("max_cost_per_day_usd"), after["scope"].pop("max_cost_per_day_usd")
    assert before == after


def test_limits_thresholds_rates_and_hard_stop() -> None:
    cheap = {"my-model": ModelRates.per_million(1, 2)}
    new = merge(
        config(),
        {"limits": [Limit("cost", 50, "1h")], "alert_thresholds": [0.25], "rates": cheap, "hard_stop": False},
    )
    scope, rates = R.from_chain([new])
    assert scope.limits == [Limit("cost", 50, "1h")] and scope.alert_thresholds == [0.25]
    assert scope.hard_stop is False and rates == cheap
    assert R.from_chain([merge(new, {"rates": None})])[1] is None


def test_bad_changes_are_refused_before_anything_is_written() -> None:
    old = config()
    with pytest.raises(InvalidInputError, match="at least one"):
        merge(old, {})
    with pytest.raises(InvalidInputError, match="parent"):
        merge(old, {"parent": "elsewhere"})
    with pytest.raises(InvalidInputError, match="cannot update"):
        merge(old, {"name": "x"})
    with pytest.raises(InvalidInputError, match="cannot update"):
        merge(old, {"max_cost_per_year": 1})
    with pytest.raises(InvalidInputError):
        merge(old, {"max_cost_per_day_usd": -1})
    with pytest.raises(InvalidInputError):
        merge(old, {"alert_at_pct": 2})
    with pytest.raises(TypeError):
        merge(old, {"hard_stop": "no"})
    with pytest.raises(TypeError):
        merge(old, {"limits": [{"metric": "cost"}]})
    with pytest.raises(TypeError):
        merge(old, {"rates": {"m": 3}})
    with pytest.raises(InvalidInputError, match="two limits"):
        merge(old, {"limits": [Limit("cost", 1, "day")]})  # clashes with max_cost_per_day_usd


def test_swap_refuses_a_stale_read() -> None:
    old = config()
    org = R.scope_config(BudgetScope("org"), None)
    table = {"org": org, "team": old}
    first, second = merge(old, {"hard_stop": False}), merge(old, {"alert_at_pct": 0.9})
    assert swap(table, "team", old, first) == [first, org]  # the chain, as the registry's 'chain' reads
    assert swap(table, "team", old, second) == ["changed"]  # merged from a stale read: refused
    assert swap(table, "team", first, merge(first, {"alert_at_pct": 0.9}))
    scope, _ = R.from_chain([table["team"]])
    assert scope.hard_stop is False and scope.alert_at_pct == 0.9  # both updates landed
    assert swap(table, "gone", old, first) == []


def test_cli_assignments() -> None:
    got = parse_assignments(
        [
            "max_cost_per_day_usd=2.5",
            "hard_stop=false",
            "alert_at_pct=null",
            'limits=[{"metric": "cost", "value": 50, "window": "month", "tz": "Europe/Berlin"}]',
            'rates={"house": {"input": 3, "output": 15}}',
        ]
    )
    assert got == {
        "max_cost_per_day_usd": 2.5,
        "hard_stop": False,
        "alert_at_pct": None,
        "limits": [Limit("cost", 50, "month", tz="Europe/Berlin")],
        "rates": {"house": ModelRates.per_million(3, 15)},
    }
    for bad in (
        ["nonsense"],
        ["=3"],
        ["hard_stop=1", "hard_stop=2"],
        ["limits=5"],
        ['limits=[{"x": 1}]'],
        ["rates=[]"],
    ):
        with pytest.raises(InvalidInputError):
            parse_assignments(bad)
    with pytest.raises(InvalidInputError, match="cannot update"):
        parse_assignments(["colour=blue"])


def test_limits_without_a_time_zone_are_stored_as_before() -> None:
    entry = json.loads(config())
    assert entry["scope"]["limits"] == [{"metric": "requests", "model": None, "name": None, "value": 100, "window": 60}]
    calendar = R.scope_config(BudgetScope("x", limits=[Limit("cost", 5, "month", tz="Europe/Berlin")]), None)
    assert json.loads(calendar)["scope"]["limits"][0]["tz"] == "Europe/Berlin"
    assert R.from_chain([calendar])[0].limits == [Limit("cost", 5, "month", tz="Europe/Berlin")]
