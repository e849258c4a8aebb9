"""Differential test: random operation sequences (records, checks, reservations, resets of a session,
a model or the scope, clock jumps across window and bucket edges and calendar periods) give identical results, alerts,
summaries and ledgers on the embedded engine and on a real Redis running the Lua scripts."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbudget import Budget, BudgetExceededError, BudgetScope, Limit, ModelRates, Reservation
from tests.conftest import Clock, RedisServer

RATES = {"m": ModelRates(0.001, 0.002), "n": ModelRates(0.0035, 0.0111, reasoning_per_1k=0.02)}
SESSIONS = st.sampled_from(["a", "b", "{odd}:*"])
MODELS = st.sampled_from(["m", "n"])
TOKENS = st.integers(0, 400)
JUMPS = st.sampled_from([0, 0.5, 1, 9, 10, 11, 59, 60, 61, 899, 900, 901, 3600, 43200, 86399, 86400, 86401, 604800])
# What both engines can model: the injected clock drives windows, periods, holds' leases and alert
# re-arming on both, but Redis expires keys (an idle session after session_ttl + slack, a request id
# after request_ttl) by its own real time, while the embedded engine expires them by the injected
# clock. So a sequence's clock moves at most HORIZON in all (7 days, the default session_ttl; the
# request ids' TTL is longer): a jump past it is skipped (on both engines alike), and neither engine
# ever expires a key the other keeps.
HORIZON = 7 * 86400

OPS = st.one_of(
    st.tuples(st.just("record"), SESSIONS, MODELS, TOKENS, TOKENS, st.sampled_from([None, "r1", "r2", "r3"])),
    st.tuples(st.just("check"), SESSIONS, MODELS, TOKENS, TOKENS),
    st.tuples(st.just("reserve"), SESSIONS, MODELS, TOKENS, TOKENS),
    st.tuples(st.just("commit"), st.integers(0, 5), TOKENS, TOKENS),
    st.tuples(st.just("release"), st.integers(0, 5)),
    st.tuples(st.just("reset"), SESSIONS),
    st.tuples(st.just("reset_model"), MODELS),
    st.tuples(st.just("reset_scope"), SESSIONS),
    st.tuples(st.just("advance"), JUMPS),
    st.tuples(st.just("summary"), SESSIONS),
)


def make_scope() -> BudgetScope:
    org = BudgetScope(
        "org",
        max_tokens_per_day=6000,
        limits=[Limit("requests", 12, "1m"), Limit("tokens", 9000, "month", tz="America/New_York")],
    )
    return BudgetScope(
        "team",
        parent=org,
        alert_at_pct=0.75,
        alert_thresholds=[0.5, 0.9],
        max_tokens_per_session=2000,
        max_cost_per_session_usd=0.004,
        max_tokens_per_day=5000,
        max_tokens_per_model={"m": 3000},
        limits=[
            Limit("requests", 5, "1m"),
            Limit("tokens", 1500, "10s", model="n"),
            Limit("cost", 0.005, "1h"),
            Limit("tokens", 2500, "calendar_day", tz="Europe/Berlin"),
            Limit("cost", 0.006, "week", model="m"),
        ],
    )


def outcome(fn: Any) -> Any:
    try:
        value = fn()
    except BudgetExceededError as err:
        rec = err.record
        return (
            "exceeded",
            err.scope,
            err.limit_type,
            err.used,
            err.limit,
            err.retry_after,
            None if rec is None else (rec.cost_nano_usd, rec.total_tokens),
        )
    if isinstance(value, Reservation):
        return ("reserved", value.admitted, value.held_tokens, value.held_nano_usd)
    if hasattr(value, "cost_nano_usd"):
        return ("record", value.cost_nano_usd, value.total_tokens, value.duplicate, value.over_hold, value.session_id)
    return value


def advance(clock: Clock, seconds: float, start: float) -> None:
    """Move the clock on, unless that would take it more than HORIZON past ``start`` (skipped)."""
    if clock() + seconds - start <= HORIZON:
        clock.advance(seconds)


def run(budget: Budget, clock: Clock, ops: list[tuple[Any, ...]]) -> list[Any]:
    out: list[Any] = []
    holds: list[Reservation] = []
    start = clock()
    for op in ops:
        kind = op[0]
        if kind == "record":
            _, sid, model, i, o, rid = op
            out.append(outcome(lambda: budget.record(sid, model, i, o, request_id=rid)))
        elif kind == "check":
            _, sid, model, i, o = op
            out.append(outcome(lambda: budget.check(model, i, o, session_id=sid)))
        elif kind == "reserve":
            _, sid, model, i, o = op
            res = outcome(lambda: budget.reserve(model, i, o, session_id=sid))
            out.append(res)
            if res[0] == "reserved":
                holds.append(budget._last_reservation)  # type: ignore[attr-defined]
        elif kind in ("commit", "release"):
            if not holds:
                continue
            res = holds[op[1] % len(holds)]
            if kind == "commit" and res.record is None:
                out.append(outcome(lambda: res.commit(op[2], op[3])))
            else:
                out.append(("released", res.release()))
        elif kind == "reset":
            budget.reset_session(op[1])
        elif kind == "reset_model":
            budget.reset_model(op[1])
        elif kind == "reset_scope":
            budget.reset(op[1])
        elif kind == "advance":
            advance(clock, op[1], start)
        else:
            out.append(budget.summary(op[1]))
        out.append([(a.level, a.limit_type, a.used, a.session_id) for a in budget.alerts])
    out.append(budget.summary("a"))
    out.append(budget.summary("b"))
    ledger = budget.ledger()
    out.append(
        [(e.kind, e.what, e.scope, e.session_id, e.model, e.tokens, e.cost_nano_usd, e.timestamp) for e in ledger]
    )
    return out


class Tracking(Budget):
    """Keeps the last reservation so the driver can commit/release it (reserve may raise)."""

    def reserve(self, *args: Any, **kwargs: Any) -> Reservation:
        res = super().reserve(*args, **kwargs)
        self._last_reservation = res
        return res


@settings(
    max_examples=int(os.environ.get("DIFF_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(OPS, min_size=1, max_size=45))
def test_embedded_and_redis_agree(redis_server: RedisServer, ops: list[tuple[Any, ...]]) -> None:
    client = redis_server.client()
    client.flushall()
    options = {"hold_ttl": 120, "request_ttl": 30 * 86400}
    clocks = Clock(1_800_000_123.25), Clock(1_800_000_123.25)
    embedded = Tracking(make_scope(), RATES, clock=clocks[0], **options)  # type: ignore[arg-type]
    on_redis = Tracking(make_scope(), RATES, clock=clocks[1], redis=client, **options)  # type: ignore[arg-type]
    assert run(embedded, clocks[0], ops) == run(on_redis, clocks[1], ops)
    client.close()


# ---- extremes (issue 13): both engines refuse the same inputs, before anything is written -------------

HUGE = 2**53 - 1
EXTREME_RATES = {"m": ModelRates(0.001, 0.002), "h": ModelRates(4_000_000, 0.0), "gpt-4o": ModelRates(0.0025, 0.01)}
EXTREME_TOKENS = st.sampled_from([0, 1, 1000, 2**31, 2**40, 2**52, HUGE - 1, HUGE, HUGE + 1])
EXTREME_TTLS = st.sampled_from([None, 0.0004, 0.001, 1.0, 600.0, 315_360_000.0, 315_360_001.0, 9.3e12, 2**63 - 1])
EXTREME_OPS = st.one_of(
    st.tuples(st.just("record"), st.sampled_from(["m", "h", "gpt-4o"]), EXTREME_TOKENS, EXTREME_TOKENS),
    st.tuples(st.just("check"), st.sampled_from(["m", "h", "gpt-4o"]), EXTREME_TOKENS, EXTREME_TOKENS),
    st.tuples(st.just("reserve"), st.sampled_from(["m", "h"]), EXTREME_TOKENS, EXTREME_TOKENS, EXTREME_TTLS),
    st.tuples(st.just("commit"), st.integers(0, 3), EXTREME_TOKENS, EXTREME_TOKENS),
    st.tuples(st.just("advance"), st.sampled_from([0.0005, 1, 600, 86400])),
)


def extreme_outcome(fn: Any) -> Any:
    try:
        return outcome(fn)
    except (ValueError, TypeError) as err:  # InvalidInputError is a ValueError
        return ("invalid", type(err).__name__)


def run_extremes(budget: Budget, clock: Clock, ops: list[tuple[Any, ...]]) -> list[Any]:
    out: list[Any] = []
    holds: list[Any] = []
    start = clock()
    for op in ops:
        kind = op[0]
        if kind == "record":
            out.append(extreme_outcome(lambda: budget.record("a", op[1], op[2], op[3])))
        elif kind == "check":
            out.append(extreme_outcome(lambda: budget.check(op[1], op[2], op[3])))
        elif kind == "reserve":
            got = extreme_outcome(lambda: budget.reserve(op[1], op[2], op[3], ttl=op[4]))
            out.append(got)
            if got[0] == "reserved":
                holds.append(budget._last_reservation)  # type: ignore[attr-defined]
        elif kind == "commit" and holds:
            res = holds[op[1] % len(holds)]
            if res.record is None:
                out.append(extreme_outcome(lambda: res.commit(op[2], op[3])))
        elif kind == "advance":
            advance(clock, op[1], start)
        out.append(budget.summary("a"))
    out.append([(e.kind, e.tokens, e.cost_nano_usd) for e in budget.ledger()])
    return out


@settings(
    max_examples=int(os.environ.get("DIFF_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(EXTREME_OPS, min_size=1, max_size=12))
def test_embedded_and_redis_agree_at_the_extremes(redis_server: RedisServer, ops: list[tuple[Any, ...]]) -> None:
    client = redis_server.client()
    client.flushall()
    scope = BudgetScope("x", max_cost_per_day_usd=1.0, max_tokens_per_session=2**52, limits=[Limit("cost", 5e6, "1h")])
    clocks = Clock(1_800_000_000.0), Clock(1_800_000_000.0)
    embedded = Tracking(scope, EXTREME_RATES, clock=clocks[0], request_ttl=86400)  # type: ignore[arg-type]
    on_redis = Tracking(scope, EXTREME_RATES, clock=clocks[1], redis=client, request_ttl=86400)  # type: ignore[arg-type]
    results = run_extremes(embedded, clocks[0], ops), run_extremes(on_redis, clocks[1], ops)
    assert results[0] == results[1]
    for summary in results[1]:
        if isinstance(summary, dict):  # never a negative or inexact counter
            assert 0 <= summary["day"]["cost_usd"] * 10**9 <= HUGE and 0 <= summary["session"]["tokens"] <= HUGE
    client.close()
