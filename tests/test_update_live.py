"""``BudgetManager.update(name, **fields)``: only the named fields change, on every backend; a cap
lowered under current usage fires its alert at once and exactly once across the fleet; a change made
in one process reaches workers in other processes within the registry refresh interval."""

from __future__ import annotations

import time
from typing import Any

import pytest

from distbudget import BudgetExceededError, BudgetManager, BudgetScope, Limit, ModelRates
from distbudget._exceptions import InvalidInputError
from tests._procs import context
from tests.conftest import Backend, Clock

RATES = {"house-model": ModelRates.per_million(1_000, 1_000)}  # 1,000 tokens = $1


def test_only_the_named_fields_change(backend: Backend, clock: Clock) -> None:
    m = backend.manager(clock=clock)
    m.register(BudgetScope("team", max_cost_per_day_usd=10.0, limits=[Limit("requests", 50, "1m")]), RATES)
    budget = m.update("team", max_cost_per_day_usd=3.0)
    assert budget.scope.max_cost_per_day_usd == 3.0
    assert budget.scope.limits == [Limit("requests", 50, "1m")]
    budget.record("s", "house-model", 1_000, 0)  # the custom rates survived the update
    assert m.get("team").summary()["day"]["cost_usd"] == pytest.approx(1.0)
    m.update("team", hard_stop=False, alert_at_pct=0.5)
    scope = backend.manager(clock=clock).get("team").scope
    assert (scope.max_cost_per_day_usd, scope.hard_stop, scope.alert_at_pct) == (3.0, False, 0.5)
    with pytest.raises(KeyError):
        m.update("nobody", hard_stop=False)
    with pytest.raises(InvalidInputError):
        m.update("team", max_cost_per_day_usd=-5)
    assert backend.manager(clock=clock).get("team").scope.max_cost_per_day_usd == 3.0  # nothing written


def test_a_cap_lowered_under_usage_alerts_once_fleet_wide(backend: Backend, clock: Clock) -> None:
    first, second = backend.manager(clock=clock), backend.manager(clock=clock)
    first.register(BudgetScope("team", max_cost_per_day_usd=10.0, alert_at_pct=None), RATES)
    first.record("team", "s", "house-model", 6_000, 0)  # $6 of $10: no alert
    assert first.get("team").alerts == []
    first.update("team", max_cost_per_day_usd=4.0)  # now at 150 %
    second.update("team", max_cost_per_day_usd=4.0)  # a second worker applies the same change
    fired = [a for mgr in (first, second) for a in mgr.get("team").alerts]
    assert [(a.level.value, a.limit_type, a.used, a.limit) for a in fired] == [("critical", "day_cost_usd", 6.0, 4.0)]
    with pytest.raises(BudgetExceededError):
        second.check("team", "house-model", 1)


def _worker(url: str, ttl: float, seen: Any, ready: Any) -> None:
    manager = BudgetManager(redis=url, registry_ttl=ttl)
    manager.get("team")
    ready.put(True)
    while manager.get("team").scope.max_tokens_per_day != 500:
        time.sleep(0.005)
    seen.put(time.monotonic())


@pytest.mark.redis
@pytest.mark.parametrize("ttl", [0.05, 1.0])
def test_an_update_reaches_three_other_processes(redis_server: Any, redis_client: Any, ttl: float) -> None:
    url = redis_server.url
    BudgetManager(redis=url).register(BudgetScope("team", max_tokens_per_day=1_000))
    ctx = context()
    seen, ready = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, ttl, seen, ready)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        start = time.monotonic()
        BudgetManager(redis=url).update("team", max_tokens_per_day=500)
        delays = [seen.get(timeout=30) - start for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert len(delays) == 3
    print(f"update propagation to 3 processes (registry_ttl {ttl} s): max {max(delays) * 1000:.0f} ms")


@pytest.mark.redis
def test_cli_update(redis_server: Any, redis_client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from distbudget.cli import main

    url = redis_server.url
    BudgetManager(redis=url).register(BudgetScope("team", max_cost_per_day_usd=10.0), RATES)
    args = ["update", "team", "max_cost_per_day_usd=2.5", "hard_stop=false", "--redis", url, "--yes"]
    assert main(args) == 0
    assert "max_cost_per_day_usd" in capsys.readouterr().out
    assert (
        main(["update", "team", 'limits=[{"metric": "cost", "value": 50, "window": "month"}]', "--redis", url, "--yes"])
        == 0
    )
    scope = BudgetManager(redis=url).get("team").scope
    assert (scope.max_cost_per_day_usd, scope.hard_stop) == (2.5, False)
    assert scope.limits == [Limit("cost", 50, "month")]
    assert main(["update", "team", "max_cost_per_day_usd=-1", "--redis", url, "--yes"]) == 2
    assert main(["update", "team", "nonsense", "--redis", url]) == 2
