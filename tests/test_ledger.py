"""The usage ledger and resets (issue 4): every charge and reset is appended to the tree's capped
stream in the same atomic step; charges minus resets equal the counters while nothing was trimmed."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from distbudget import BudgetExceededError, BudgetManager, BudgetScope, InvalidInputError, Limit, ModelRates
from tests._threads import run_threads
from tests.conftest import Backend, Clock, RedisServer

RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002), "n": ModelRates(0.004, 0.004)}


def _tree(backend: Backend, **kw: Any) -> Any:
    mgr = backend.manager(**kw)
    mgr.register(BudgetScope("team", max_tokens_per_day=1_000_000), RATES)
    mgr.register(
        BudgetScope("alice", parent="team", max_tokens_per_model={"n": 10_000}, limits=[Limit("tokens", 5000, "1h")]),
        RATES,
    )
    mgr.register(BudgetScope("bob", parent="team"), RATES)
    return mgr


def _balance(entries: list[Any], scope: str) -> tuple[int, int, int]:
    """Charges counting against ``scope`` minus its resets (scope-wide ones)."""
    t = c = r = 0
    for e in entries:
        sign = 1 if e.kind == "charge" else -1 if e.what == "scope" and e.scope == scope else 0
        t, c, r = t + sign * e.tokens, c + sign * e.cost_nano_usd, r + sign * e.requests
    return t, c, r


def test_charges_are_in_the_ledger_and_sum_to_the_counters(backend: Backend) -> None:
    mgr = _tree(backend)
    a = mgr.record("alice", "s1", "m", 100, 50, {"task": "t1"}, request_id="req-1", cached_input_tokens=10)
    mgr.record("alice", "s1", "m", 100, 50, request_id="req-1")  # a retry: charged (and logged) once
    mgr.record("bob", "s2", "n", 300, 0)
    with mgr.reserve("alice", "n", 100, 100, session_id="s3") as hold:
        hold.commit(100, 20)
    entries = mgr.get("team").ledger()
    assert [(e.kind, e.scope, e.model) for e in entries] == [
        ("charge", "alice", "m"),
        ("charge", "bob", "n"),
        ("charge", "alice", "n"),
    ]
    first = entries[0]
    assert first.id == a.ledger_id
    assert (first.session_id, first.input_tokens, first.output_tokens, first.tokens) == ("s1", 100, 50, 150)
    assert first.cost_nano_usd == a.cost_nano_usd and first.metadata == {"task": "t1"}
    assert first.request_id == "req-1" and first.path == ("alice", "team")
    assert entries[2].hold_id is not None
    for scope in ("team", "alice", "bob"):
        total = mgr.summary(scope)["total"]
        t, c, r = _balance(mgr.get(scope).ledger(), scope)
        assert (t, r) == (total["tokens"], total["requests"])
        assert c / 1e9 == pytest.approx(total["cost_usd"])
    assert [r.model for r in mgr.records("alice")] == ["m", "n"]  # only what counts against alice
    assert mgr.records("bob")[0].total_tokens == 300
    assert mgr.records("alice", since=first.id)[0].model == "n"  # since an id: after it
    assert len(mgr.records("team", limit=2)) == 2


def test_resets_are_atomic_and_in_the_ledger(backend: Backend, clock: Clock) -> None:
    mgr = _tree(backend, clock=clock)
    mgr.record("alice", "s1", "m", 1000, 0)
    mgr.record("alice", "s2", "n", 2000, 0)
    mgr.record("alice", "s2", "n", 500, 0)
    alice = mgr.get("alice")
    alice.reset_session("s1")
    assert mgr.summary("alice", "s1")["session"]["tokens"] == 0
    assert mgr.summary("alice", "s2")["session"]["tokens"] == 2500  # other sessions keep theirs
    alice.reset_model("n")
    summary = mgr.summary("alice", "s2")
    assert "n" not in summary["per_model"] and summary["per_model"]["m"]["tokens"] == 1000
    assert summary["limits"]["model_n_tokens"]["used"] == 0
    assert summary["total"]["tokens"] == 3500  # a model reset clears only the model's counters
    alice.reset()
    summary = mgr.summary("alice", "s2")
    assert summary["total"]["tokens"] == summary["day"]["tokens"] == summary["session"]["tokens"] == 0
    assert summary["limits"]["hour_tokens"]["used"] == 0
    assert mgr.summary("team")["total"]["tokens"] == 3500  # ancestors keep the usage
    resets = [(e.what, e.tokens, e.session_id, e.model) for e in alice.ledger() if e.kind == "reset"]
    assert resets == [("session", 1000, "s1", None), ("model", 2500, None, "n"), ("scope", 3500, "s2", None)]
    mgr.record("alice", "s2", "m", 100, 0)  # counting again from zero
    assert _balance(alice.ledger(), "alice")[0] == mgr.summary("alice")["total"]["tokens"] == 100


def test_export_writes_json_lines(backend: Backend, tmp_path: Any) -> None:
    mgr = _tree(backend)
    for i in range(5):
        mgr.record("bob", f"s{i}", "m", 100 * (i + 1), 10)
    path = tmp_path / "ledger.jsonl"
    assert mgr.export_ledger("bob", str(path)) == 5
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(row["tokens"] for row in rows) == mgr.summary("bob")["total"]["tokens"] == 1550
    assert rows[0]["kind"] == "charge" and rows[0]["scope"] == "bob" and rows[0]["cost_usd"] > 0
    buffer = io.StringIO()
    assert mgr.get("bob").export_ledger(buffer, since=rows[2]["id"]) == 2


def test_no_ledger_when_turned_off(backend: Backend) -> None:
    mgr = _tree(backend, ledger_maxlen=0)
    mgr.record("bob", "s", "m", 10, 10)
    mgr.get("bob").reset()
    assert mgr.get("bob").ledger() == []
    if backend.store is not None:
        assert not any(b"ledger" in key for key in backend.store.scan_iter(count=1000))


def test_bad_ledger_arguments_raise(backend: Backend) -> None:
    mgr = _tree(backend)
    with pytest.raises(ValueError):
        mgr.records("bob", since="yesterday")
    with pytest.raises(InvalidInputError):
        mgr.records("bob", limit=0)
    with pytest.raises(TypeError):
        mgr.records("bob", since=[1])
    with pytest.raises(InvalidInputError):
        BudgetManager(ledger_maxlen=-1).register(BudgetScope("x"))
    with pytest.raises(InvalidInputError):
        mgr.get("bob").reset_model("")


def test_a_refused_reservation_is_a_refusal_in_the_ledger_and_charges_nothing(backend: Backend) -> None:
    mgr = _tree(backend)
    with pytest.raises(BudgetExceededError):
        mgr.reserve("alice", "m", 4000, 4000)
    [entry] = mgr.get("team").ledger()
    assert (entry.kind, entry.operation, entry.scope, entry.limit_scope, entry.limit_type) == (
        "refusal",
        "reserve",
        "alice",
        "alice",
        "hour_tokens",
    )
    assert (entry.input_tokens, entry.output_tokens) == (4000, 4000)  # what it asked for
    assert (entry.tokens, entry.cost_nano_usd, entry.requests) == (0, 0, 0)  # what it charged
    assert mgr.records("team") == []  # no charge
    assert mgr.summary("team")["total"]["tokens"] == 0


def test_the_ledger_is_capped(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    mgr = BudgetManager(redis=client, ledger_maxlen=100)
    budget = mgr.register(BudgetScope("capped"), RATES)
    for _ in range(1000):
        budget.record("s", "m", 1, 1)
    length = client.xlen("distbudget:{capped}:ledger")
    assert 100 <= length < 300  # MAXLEN ~: trimmed by whole stream nodes
    assert budget.ledger()[-1].tokens == 2


def test_ledger_is_complete_under_concurrency(redis_server: RedisServer) -> None:
    """8 threads x 4 clients record 2,000 charges in all: the ledger holds each exactly once and
    sums to the counters."""
    redis_server.client().flushall()
    mgr = BudgetManager(redis=redis_server.url)
    mgr.register(BudgetScope("org"), RATES)
    for u in ("x", "y"):
        mgr.register(BudgetScope(u, parent="org"), RATES)

    def work(k: int) -> None:
        m = BudgetManager(redis=redis_server.url)
        for i in range(250):
            m.record("x" if i % 2 else "y", f"s{k}", "m", 10 + k, i)

    run_threads(8, work)
    entries = mgr.get("org").ledger()
    assert len(entries) == 2000 and len({e.op for e in entries}) == 2000
    total = mgr.summary("org")["total"]
    assert sum(e.tokens for e in entries) == total["tokens"]
    assert sum(e.cost_nano_usd for e in entries) == round(total["cost_usd"] * 1e9)
