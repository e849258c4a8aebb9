"""The fleet-wide price book (one per prefix, pushed once, used by every worker), per-scope rate
overrides inherited down the tree, ``prices=`` on budgets and managers, ``service_tier=`` on
charges, and ``distbudget prices push FILE`` / ``prices show MODEL``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from distbudget import BudgetScope, ModelRates, UnknownModelError
from distbudget.pricing import PriceBook
from tests.conftest import Backend, Clock

M = 1_000_000
TTL = 0.001  # the shortest registry_ttl: the refresh runs on the wall clock, waited for below


def refresh_due() -> None:
    time.sleep(2 * TTL)  # the one wait: a worker re-reads the registry (and the book) on its own clock


def litellm(input_per_token: float) -> dict[str, Any]:
    return {
        "acme-large": {
            "litellm_provider": "acme",
            "mode": "chat",
            "input_cost_per_token": input_per_token,
            "output_cost_per_token": 1.5e-05,
            "input_cost_per_token_batches": input_per_token / 2,
            "output_cost_per_token_batches": 7.5e-06,
        }
    }


def test_a_pushed_book_prices_every_worker(backend: Backend, clock: Clock) -> None:
    admin = backend.manager(clock=clock, registry_ttl=TTL)
    admin.register(BudgetScope("team"))
    worker = backend.manager(clock=clock, registry_ttl=TTL)
    with pytest.raises(UnknownModelError):
        worker.record("team", "s", "acme-large", 1_000, 0)
    assert admin.push_prices(PriceBook.from_litellm(litellm(3e-06), as_of="2026-11-01")) == 1
    refresh_due()
    assert worker.record("team", "s", "acme/acme-large", M, 0).cost_usd == pytest.approx(3.0)
    assert admin.push_prices(PriceBook.from_litellm(litellm(5e-06), as_of="2026-11-02")) == 2
    refresh_due()
    assert worker.record("team", "s", "acme-large", M, 0).cost_usd == pytest.approx(5.0)
    assert worker.prices().as_of.isoformat() == "2026-11-02"


def test_overrides_are_inherited_down_the_tree(backend: Backend, clock: Clock) -> None:
    m = backend.manager(clock=clock)
    m.register(BudgetScope("org"), {"house-model": ModelRates.per_million(2, 2)})
    m.register(BudgetScope("team", parent="org"), {"other-model": ModelRates.per_million(9, 9)})
    m.register(BudgetScope("bot", parent="team"))
    assert m.record("bot", "s", "house-model", M, 0).cost_usd == pytest.approx(2.0)  # the org's override
    assert m.record("bot", "s", "other-model", M, 0).cost_usd == pytest.approx(9.0)  # the team's
    m.update("team", rates={"house-model": ModelRates.per_million(1, 1)})
    assert backend.manager(clock=clock).record("bot", "s", "house-model", M, 0).cost_usd == pytest.approx(1.0)


def test_prices_and_service_tier(backend: Backend, clock: Clock) -> None:
    book = PriceBook.from_litellm(litellm(3e-06))
    b = backend.budget(BudgetScope("solo"), prices=book, clock=clock)
    assert b.record("s", "acme-large", M, 0).cost_usd == pytest.approx(3.0)
    assert b.record("s", "acme-large", M, 0, service_tier="batch").cost_usd == pytest.approx(1.5)
    with b.reserve("acme-large", M, 0) as r:
        assert r.commit(M, 0, service_tier="batch").cost_usd == pytest.approx(1.5)
    m = backend.manager(clock=clock, prices=book)
    m.register(BudgetScope("team"))
    assert m.record("team", "s", "acme-large", M, 0).cost_usd == pytest.approx(3.0)


@pytest.mark.redis
def test_cli_push_and_show(
    redis_server: Any, redis_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distbudget.cli import main

    path = tmp_path / "prices.json"
    path.write_text(json.dumps(litellm(3e-06)))
    assert main(["prices", "push", str(path), "--as-of", "2026-11-01", "--redis", redis_server.url]) == 0
    assert "revision 1" in capsys.readouterr().out
    assert main(["prices", "show", "acme/acme-large", "--redis", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert "acme-large" in out and "3" in out and "2026-11-01" in out and "per 1M" in out
