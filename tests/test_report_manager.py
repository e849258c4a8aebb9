"""``BudgetManager.report`` on every backend and ``distbudget report``: the ledger rolled up into
rows by day / model / session; totals equal the counters; 20,000 ledger entries stream (a page at a time)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
import tracemalloc
from typing import Any

import pytest

from distbudget import BudgetManager, BudgetScope, ModelRates
from distbudget._core.money import usd_to_nano
from distbudget._exceptions import InvalidInputError
from tests.conftest import Backend, Clock

RATES = {"a": ModelRates.per_million(1, 2), "b": ModelRates.per_million(3, 4)}
DAY1 = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc).timestamp()


def fill(m: Any, clock: Clock) -> None:
    m.register(BudgetScope("org"))
    m.register(BudgetScope("team", parent="org"), RATES)
    clock.t = DAY1
    m.record("team", "s1", "a", 1_000, 100)
    m.record("team", "s2", "b", 2_000, 200)
    clock.t = DAY1 + 86400
    m.record("team", "s1", "a", 3_000, 300)


def test_rows_by_day_and_model(backend: Backend, clock: Clock) -> None:
    m = backend.manager(clock=clock)
    fill(m, clock)
    rows = m.report("team", by=("day", "model"))
    got = [(r.day, r.model, r.requests, r.input_tokens, r.output_tokens) for r in rows]
    assert got == [
        ("2026-03-01", "a", 1, 1_000, 100),
        ("2026-03-01", "b", 1, 2_000, 200),
        ("2026-03-02", "a", 1, 3_000, 300),
    ]
    total = m.get("team").summary()["total"]
    assert sum(r.tokens for r in rows) == total["tokens"] == 6_600
    assert sum(r.cost_usd for r in rows) == pytest.approx(total["cost_usd"])
    assert [r.requests for r in m.report("org", by="session")] == [2, 1]  # a child's charges count
    one_day = m.report("team", since=DAY1 - 3600, until=DAY1 + 3600)
    assert [(r.requests, r.tokens) for r in one_day] == [(2, 3_300)]
    with pytest.raises(InvalidInputError):
        m.report("team", by=("hour",))
    with pytest.raises(KeyError):
        m.report("nobody")


@pytest.mark.redis
def test_cli_report_formats(
    redis_server: Any, redis_client: Any, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    from distbudget.cli import main

    m = BudgetManager(redis=redis_server.url, clock=clock)
    fill(m, clock)
    base = ["report", "team", "--redis", redis_server.url, "--by", "day,model"]
    assert main([*base, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["day"], r["model"], r["tokens"]) for r in rows] == [
        ("2026-03-01", "a", 1_100),
        ("2026-03-01", "b", 2_200),
        ("2026-03-02", "a", 3_300),
    ]
    assert main([*base, "--format", "csv"]) == 0
    assert [r["model"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["a", "b", "a"]
    assert main([*base, "--format", "table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["day", "model", "requests"] and table[-1].split()[:2] == ["total", "3"]


@pytest.mark.redis
def test_20k_ledger_entries_stream_and_equal_the_counters(redis_server: Any, redis_client: Any, clock: Clock) -> None:
    n = 20_000  # 20 pages of the ledger (LEDGER_PAGE = 1,000): the peak is a page's, whatever n
    m = BudgetManager(redis=redis_server.url, clock=clock, ledger_maxlen=200_000)
    m.register(BudgetScope("big"), RATES)
    budget = m.get("big")
    clock.t = DAY1
    for start in range(0, n, n // 20):
        budget.record_many((f"s{i % 7}", "ab"[i % 2], 10 + i % 3, i % 5) for i in range(start, start + n // 20))
        clock.advance(3600)  # 1,000 calls an hour: 20 hours, two days
    t0 = time.perf_counter()
    rows = m.report("big", by=("day", "model", "session"))
    elapsed = time.perf_counter() - t0
    tracemalloc.start()  # a second pass, traced: tracemalloc slows every allocation
    try:
        assert m.report("big", by=("day", "model", "session")) == rows
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = budget.summary()["total"]
    assert sum(r.requests for r in rows) == total["requests"] == n
    assert sum(r.tokens for r in rows) == total["tokens"]
    assert sum(r.cost_nano_usd for r in rows) == usd_to_nano(total["cost_usd"], "cost")
    assert len(rows) == 2 * 2 * 7
    assert peak < 5_000_000, peak  # the entries alone would take ~20 MB held in a list (~2.2 MB measured)
    print(f"report over {n:,} ledger entries: {elapsed:.2f} s, peak {peak / 1e6:.1f} MB (tracemalloc)")
