"""The embedded engine's record() fast path (``Accounting.fast_recording``, ``MemoryEngine.fast_record``)
is invisible: random operation sequences give the same records, errors, warnings, alerts, summaries and
ledgers with it as without it (the same budget with ``record`` overridden takes the usual path), and
threads recording at once lose nothing."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbudget import Budget, BudgetExceededError, BudgetScope, BudgetWarning, Limit, ModelRates, Usage
from distbudget.engines.memory import FastPlan, MemoryEngine
from tests._threads import run_threads
from tests.conftest import Clock

RATES = {
    "m": ModelRates(0.001, 0.002),
    "n": ModelRates(0.0035, 0.0111, reasoning_per_1k=0.02),
    "l": ModelRates(0.001, 0.002, long_context={1000: ModelRates(0.002, 0.004)}),
}
# mostly calls the fast path takes (it declines the others: the usual path then raises or charges)
SESSIONS = st.sampled_from(["a"] * 4 + ["b"] * 2 + [None, "", "x" * 300, 7])
MODELS = st.sampled_from(["m"] * 6 + ["n"] * 2 + ["l", "nope", 3])
TOKENS = st.one_of(*[st.integers(0, 60)] * 6, st.integers(0, 700), st.sampled_from([-1, 1.0, True, None, 2**53, 2**60]))
JUMPS = st.sampled_from([0, 0.5, 1, 9, 10, 59, 60, 61, 899, 900, 3599, 3600, 3661, 86399, 86400, 86401])

PLAIN = st.tuples(st.just("record"), SESSIONS, MODELS, TOKENS, TOKENS)
OPS = st.one_of(
    *[PLAIN] * 12,
    st.tuples(st.just("record_meta"), SESSIONS, MODELS, TOKENS, TOKENS, st.sampled_from([{}, {"k": 1}, None])),
    st.tuples(st.just("record_id"), SESSIONS, st.integers(0, 300), st.sampled_from(["r1", "r2"])),
    st.tuples(st.just("record_usage"), SESSIONS, st.integers(0, 300), st.integers(0, 300)),
    st.tuples(st.just("record_many"), st.lists(st.tuples(st.sampled_from(["a", "b"]), MODELS, TOKENS, TOKENS))),
    st.tuples(st.just("check"), st.sampled_from(["a", "b"]), st.integers(0, 500), st.integers(0, 500)),
    st.tuples(st.just("reserve"), st.sampled_from(["a", "b"]), st.integers(0, 500), st.integers(0, 500)),
    st.tuples(st.just("commit"), st.integers(0, 5), st.integers(0, 500), st.integers(0, 500)),
    st.tuples(st.just("release"), st.integers(0, 5)),
    st.tuples(st.just("reset"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("reset_model"), st.sampled_from(["m", "n"])),
    st.tuples(st.just("reset_scope"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("advance"), JUMPS),
    st.tuples(st.just("summary"), st.sampled_from(["a", "b"])),
    st.tuples(
        st.just("ledger"),
    ),
)


# (limit type, amount, window, model): per-minute requests, a rolling window of one model, an hour's
# cost, and a calendar day of model "l" (its plans are never fast: a calendar limit's period ends)
TEAM_LIMITS = [("requests", 60, "1m", None), ("tokens", 2000, "10s", "n"), ("cost", 0.008, "1h", None)]
TEAM_LIMITS += [("tokens", 2500, "calendar_day", "l")]


def make_scope(hard_stop: bool) -> BudgetScope:
    org = BudgetScope("org", max_tokens_per_day=9000, limits=[Limit("requests", 100, "1m")])
    limits = [
        Limit(kind, amount, window, model=model, tz="Europe/Berlin" if window == "calendar_day" else None)
        for kind, amount, window, model in TEAM_LIMITS
    ]
    caps = {"max_tokens_per_session": 3000, "max_cost_per_session_usd": 0.006, "max_tokens_per_day": 6000}
    return BudgetScope(
        "team", parent=org, hard_stop=hard_stop, alert_at_pct=0.7, alert_thresholds=[0.5, 0.9], limits=limits,
        max_tokens_per_model={"m": 4000}, **caps,
    )  # fmt: skip


class Usual(Budget):
    """The same budget without the fast path (record overridden: the usual path)."""

    def record(self, *args: Any, **kwargs: Any) -> Any:
        return Budget.record(self, *args, **kwargs)


def record_view(rec: Any) -> Any:
    fields = dict(vars(rec))
    fields["ledger_id"] = fields["ledger_id"] is not None  # the stream's ids are the real clock's ms
    return sorted(fields.items(), key=lambda kv: kv[0])


def outcome(fn: Any) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn()
        except BudgetExceededError as err:
            value = ("exceeded", str(err), None if err.record is None else record_view(err.record))
        except (ValueError, TypeError, KeyError) as err:
            value = ("invalid", type(err).__name__, str(err))
    if hasattr(value, "held_nano_usd"):  # a reservation (of either flavour)
        value = ("reserved", value.admitted, value.held_tokens, value.held_nano_usd)
    elif isinstance(value, list):
        value = [record_view(r) if hasattr(r, "cost_nano_usd") else r for r in value]
    elif hasattr(value, "cost_nano_usd"):
        value = record_view(value)
    # only the budget's own: a ResourceWarning of another test's garbage may land anywhere
    return value, [str(w.message) for w in caught if issubclass(w.category, BudgetWarning)]


RESETS = {"reset": "reset_session", "reset_model": "reset_model", "reset_scope": "reset"}


def run(
    budget: Any, clock: Clock, ops: list[tuple[Any, ...]], more: Callable[[tuple[Any, ...]], Any] | None = None
) -> list[Any]:
    """Each operation's outcome, then the alerts and the current session after it, and at the end
    the summaries, the ledger and ``records``. ``budget``: a ``Budget`` or an async one behind a
    ``SyncView``; ``more``: the outcome of the kinds of operation this loop does not know."""
    out: list[Any] = []
    holds: list[Any] = []
    for op in ops:
        kind = op[0]
        if kind == "record":
            out.append(outcome(lambda: budget.record(op[1], op[2], op[3], op[4])))
        elif kind == "record_meta":
            out.append(outcome(lambda: budget.record(op[1], op[2], op[3], op[4], op[5])))
        elif kind == "record_id":
            out.append(outcome(lambda: budget.record(op[1], "m", op[2], 5, request_id=op[3])))
        elif kind == "record_usage":
            out.append(outcome(lambda: budget.record(op[1], "n", Usage(op[2], op[3], reasoning_tokens=op[3] // 2))))
        elif kind == "record_many":
            out.append(outcome(lambda: budget.record_many(op[1])))
        elif kind == "check":
            out.append(outcome(lambda: budget.check("m", op[2], op[3], session_id=op[1])))
        elif kind == "reserve":

            def reserve() -> Any:
                res = budget.reserve("m", op[2], op[3], session_id=op[1])
                if res.admitted:
                    holds.append(res)
                return res

            out.append(outcome(reserve))
        elif kind in ("commit", "release"):
            if holds:
                res = holds[op[1] % len(holds)]
                if kind == "commit" and res.record is None:
                    out.append(outcome(lambda: res.commit(op[2], op[3])))
                else:
                    out.append(outcome(res.release))
        elif kind in RESETS:
            getattr(budget, RESETS[kind])(op[1])
        elif kind == "advance":
            clock.advance(op[1])
        elif kind in ("summary", "ledger"):
            out.append(budget.summary(op[1]) if kind == "summary" else ledger_view(budget))
        else:
            assert more is not None, kind
            out.append(more(op))
        out.append([(a.level, a.limit_type, a.used, a.session_id, a.model, a.timestamp) for a in budget.alerts])
        out.append(budget.session_id)
    out.extend([budget.summary("a"), budget.summary("b"), ledger_view(budget)])
    out.append([record_view(r) for r in budget.records])
    return out


def ledger_view(budget: Any) -> list[Any]:
    entries = budget.ledger()
    assert len({e.op for e in entries if e.op}) == len([e for e in entries if e.op])  # op ids unique
    assert [e.id for e in entries] == sorted({e.id for e in entries}, key=lambda i: tuple(map(int, i.split("-"))))
    return [(vars(e) | {"id": None, "op": None, "hold_id": e.hold_id is not None}) for e in entries]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=20, max_size=80), hard_stop=st.booleans(), ledger=st.sampled_from([0, 5, 1000]))
def test_fast_and_usual_paths_agree(ops: list[tuple[Any, ...]], hard_stop: bool, ledger: int) -> None:
    clocks = Clock(1_800_000_123.25), Clock(1_800_000_123.25)
    options: dict[str, Any] = {"session_ttl": 3600, "request_ttl": 600, "ledger_maxlen": ledger}
    fast = Budget(make_scope(hard_stop), RATES, clock=clocks[0], **options)
    usual = Usual(make_scope(hard_stop), RATES, clock=clocks[1], **options)
    assert fast.record is not Budget.record and type(usual).record is Usual.record
    assert run(fast, clocks[0], ops) == run(usual, clocks[1], ops)


def test_the_fast_path_is_taken_and_settled_before_anything_reads() -> None:
    budget = Budget(BudgetScope("s", max_tokens_per_session=10**9), RATES, session_id="a")
    budget.record("a", "m", 1, 1)  # the first call announces (the usual path)
    for _ in range(10):
        budget.record("a", "m", 100, 50)
    engine = budget.engine
    assert isinstance(engine, MemoryEngine)
    active = engine._active
    assert isinstance(active, FastPlan) and active.left[2] - active.r2 == 10  # pending, not in the counters yet
    assert budget.summary()["session"] == {"tokens": 1502, "cost_usd": 0.002003, "requests": 11}
    assert engine._active is None
    assert [e.tokens for e in budget.ledger()] == [2] + [150] * 10


def test_server_clock_timestamps_and_ledger_ids() -> None:
    budget = Budget(BudgetScope("s", max_tokens_per_session=10**9), RATES)
    records = [budget.record("a", "m", 10, 10) for _ in range(50)]
    ids = [tuple(map(int, r.ledger_id.split("-"))) for r in records if r.ledger_id]
    assert len(ids) == 50 and ids == sorted(set(ids))
    assert [e.id for e in budget.ledger()] == [r.ledger_id for r in records]
    assert all(abs(e.timestamp - r.timestamp) < 1e-6 for e, r in zip(budget.ledger(), records, strict=True))


def test_threads_recording_at_once_lose_nothing() -> None:
    scope = BudgetScope("s", max_tokens_per_session=10**12, max_tokens_per_day=10**12, alert_at_pct=0.99)
    budget = Budget(scope, RATES, session_id="a")
    budget.record("a", "m", 1, 0)
    n, threads = 2000, 4
    seen: list[Any] = []

    def work(k: int) -> None:
        for i in range(n):
            budget.record("a", "m", 3, 2)
            if k == 0 and i % 100 == 0:
                seen.append(budget.summary()["session"]["tokens"])

    run_threads(threads, work)
    total = 1 + 5 * n * threads
    assert budget.summary()["session"]["tokens"] == total
    assert budget.summary()["day"]["requests"] == 1 + n * threads
    assert seen == sorted(seen)
    assert len(budget.ledger()) == 1 + n * threads


def test_alerts_fire_once_at_the_threshold() -> None:
    budget = Budget(BudgetScope("s", max_tokens_per_session=1000, alert_at_pct=0.5), RATES, session_id="a")
    fired: list[Any] = []
    budget.on_alert(fired.append)
    for _ in range(9):
        budget.record("a", "m", 50, 50)
    assert [(a.level.value, a.used) for a in fired] == [("warning", 500.0)]
    budget.record("a", "m", 50, 50)
    assert [(a.level.value, a.used) for a in fired] == [("warning", 500.0), ("critical", 1000.0)]
