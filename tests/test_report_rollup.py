"""Report rollups over ledger entries (distbudget/_core/report.py): grouping, time range, what
counts, output formats, streaming in bounded memory. Entries are built in the ledger's own wire
format (charge_entry + parse_entry), as the engines store them."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import tracemalloc
from collections.abc import Iterator

import pytest

from distbudget._core import ledger as L
from distbudget._core.report import Rollup, check_by, render, rollup, total_of
from distbudget._exceptions import InvalidInputError

US = 1_000_000
JAN_31_2330_UTC = dt.datetime(2026, 1, 31, 23, 30, tzinfo=dt.timezone.utc).timestamp()


def charge(
    ts: float,
    *,
    scope: str = "team",
    path: tuple[str, ...] = ("team", "org"),
    session: str = "s1",
    model: str = "gpt-4o",
    inp: int = 100,
    out: int = 10,
    extra: tuple[int, int, int] = (0, 0, 0),
    cost: int = 1_000,
    n: int = 0,
) -> L.LedgerEntry:
    head = L.head("charge", scope, list(path), session, model)
    d = L.charge_entry(head, inp, out, extra, None, None, None)
    fields = {"d": d, "ts": str(round(ts * US)), "t": str(inp + out), "c": str(cost), "r": "1"}
    return L.parse_entry(f"{int(ts * 1000)}-{n}", fields)


def reset(ts: float, scope: str = "team") -> L.LedgerEntry:
    d = L.reset_entry("scope", scope, [scope, "org"], None, None)
    return L.parse_entry(f"{int(ts * 1000)}-0", {"d": d, "ts": str(round(ts * US)), "t": "5", "c": "5", "r": "5"})


def refusal(ts: float, model: str = "gpt-4o") -> L.LedgerEntry:
    d = json.dumps({"kind": "refusal", "scope": "team", "path": ["team", "org"], "session_id": "s1", "model": model})
    return L.parse_entry(f"{int(ts * 1000)}-9", {"d": d, "ts": str(round(ts * US)), "t": "0", "c": "0", "r": "0"})


def test_totals_by_kind_with_no_groups() -> None:
    entries = [
        charge(1000.0, inp=1_000, out=200, extra=(300, 50, 80), cost=7_000),
        charge(1001.0, inp=10, out=5, cost=11),
        reset(1002.0),
    ]
    (row,) = rollup(entries, "team")
    assert (row.requests, row.tokens, row.input_tokens, row.output_tokens) == (2, 1_215, 1_010, 205)
    assert (row.cached_input_tokens, row.cache_write_tokens, row.reasoning_tokens) == (300, 50, 80)
    assert row.cost_nano_usd == 7_011 and row.cost_usd == pytest.approx(7.011e-6)
    assert row.day is row.model is row.session is None


def test_groups_by_day_in_a_time_zone_and_model() -> None:
    entries = [
        charge(JAN_31_2330_UTC - 3600, model="gpt-4o", cost=1),  # 23:30 Berlin, Jan 31
        charge(JAN_31_2330_UTC, model="gpt-4o", cost=2),  # 00:30 Berlin, Feb 1
        charge(JAN_31_2330_UTC + 60, model="claude-sonnet-4-5", cost=4),
        charge(JAN_31_2330_UTC + 120, model="gpt-4o", cost=8),
    ]
    rows = rollup(entries, "team", by=("model", "day"), tz="Europe/Berlin")
    got = [(r.day, r.model, r.requests, r.cost_nano_usd) for r in rows]
    assert got == [
        ("2026-01-31", "gpt-4o", 1, 1),
        ("2026-02-01", "claude-sonnet-4-5", 1, 4),
        ("2026-02-01", "gpt-4o", 2, 10),
    ]
    utc = rollup(entries, "team", by="day")
    assert [(r.day, r.requests) for r in utc] == [("2026-01-31", 4)]


def test_sessions_scopes_and_what_counts() -> None:
    entries = [
        charge(10.0, scope="team", path=("team", "org"), session="a"),
        charge(11.0, scope="bot", path=("bot", "team", "org"), session="b"),  # a child's charge counts
        charge(12.0, scope="other", path=("other", "org"), session="a"),  # a sibling's does not
        reset(13.0),
        refusal(14.0),
    ]
    rows = rollup(entries, "team", by=("session", "scope"))
    assert [(r.session, r.scope, r.requests, r.refusals) for r in rows] == [
        ("a", "team", 1, 0),
        ("b", "bot", 1, 0),
        ("s1", "team", 0, 1),
    ]
    org = Rollup("org").add_all(entries)
    assert org.total.requests == 3 and org.total.refusals == 1


def test_since_is_inclusive_until_exclusive() -> None:
    entries = [charge(float(t), n=t) for t in range(100, 110)]
    r = Rollup("team", since=103, until=dt.datetime.fromtimestamp(107, dt.timezone.utc)).add_all(entries)
    assert r.total.requests == 4  # 103, 104, 105, 106
    with pytest.raises(InvalidInputError, match="before since"):
        Rollup("team", since=5, until=4)
    with pytest.raises(InvalidInputError, match="aware"):
        Rollup("team", since=dt.datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        Rollup("team", until="yesterday")


def test_bad_groups() -> None:
    assert check_by("model, day") == ("day", "model")
    assert check_by(None) == ()
    with pytest.raises(InvalidInputError, match="cannot group"):
        check_by(("hour",))
    with pytest.raises(InvalidInputError, match="twice"):
        check_by("day,day")
    with pytest.raises(TypeError):
        check_by(3)


def test_formats() -> None:
    entries = [charge(JAN_31_2330_UTC, model="gpt-4o", cost=1_500_000_000), charge(JAN_31_2330_UTC + 1, model="o3")]
    r = Rollup("team", by="model").add_all(entries)
    rows = r.rows()
    as_json = json.loads(render(rows, r.by, "json"))
    assert [(d["model"], d["requests"], d["cost_usd"]) for d in as_json] == [("gpt-4o", 1, 1.5), ("o3", 1, 1e-6)]
    as_csv = list(csv.DictReader(io.StringIO(render(rows, r.by, "csv"))))
    assert as_csv[0]["model"] == "gpt-4o" and as_csv[0]["cost_usd"] == "1.5"
    table = render(rows, r.by, "table", r.total).splitlines()
    assert table[0].split()[:3] == ["model", "requests", "tokens"] and "cost_nano_usd" not in table[0]
    assert as_json[0]["cost_nano_usd"] == 1_500_000_000
    assert table[-1].split()[:3] == ["total", "2", "220"]
    with pytest.raises(InvalidInputError):
        render(rows, r.by, "xml")


def test_streams_in_bounded_memory() -> None:
    """Entries through a generator: memory grows with the rows, not the entries."""
    N = 20_000

    def entries() -> Iterator[L.LedgerEntry]:
        path = ("team", "org")
        for i in range(N):
            yield L.LedgerEntry(f"{i}-0", "charge", "team", path, f"s{i % 3}", f"m{i % 5}", 3, i, 1, 1.7e9 + i)

    tracemalloc.start()
    try:
        r = Rollup("team", by=("model", "session")).add_all(entries())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(r.rows()) == 15
    assert r.total.requests == N and r.total.tokens == 3 * N and r.total.cost_nano_usd == sum(range(N))
    assert sum(row.cost_nano_usd for row in r.rows()) == r.total.cost_nano_usd
    assert peak < 2_000_000, peak  # a list of N entries alone would take ~10 MB


def test_total_of_rows_equals_the_rollups_total() -> None:
    entries = [charge(float(t), model=f"m{t % 3}", extra=(1, 2, 3), cost=t, n=t) for t in range(100, 130)]
    r = Rollup("team", by="model").add_all(entries)
    assert total_of(r.rows()) == r.total
