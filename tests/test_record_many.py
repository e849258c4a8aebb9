"""``record_many()``: many record() calls in one engine call (on Redis one pipelined round trip), on
every backend (embedded, fakeredis, Redis, Cluster; sync and async)."""

from __future__ import annotations

import warnings

import pytest

from distbudget import AlertLevel, Budget, BudgetExceededError, BudgetScope, BudgetWarning, Limit, ModelRates
from tests.conftest import Backend, Clock, RedisServer

# 1,000 nano-USD per input token, 2,000 per output token: easy exact arithmetic.
RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002), "n": ModelRates(0.004, 0.004)}


def scope(name: str, **kw: object) -> BudgetScope:
    return BudgetScope(
        name,
        max_tokens_per_session=10_000,
        max_cost_per_day_usd=1.0,
        max_tokens_per_model={"m": 8_000},
        limits=[Limit("requests", 100, "1m")],
        **kw,  # type: ignore[arg-type]
    )


CALLS = [
    ("a", "m", 100, 50),
    {"session_id": "a", "model": "n", "input_tokens": 10, "output_tokens": 0, "metadata": {"k": "v"}},
    (None, "m", 7, 3, None, "req-1"),
    {"session_id": "b", "model": "m", "input_tokens": 40, "output_tokens": 2, "cached_input_tokens": 30},
]


def as_record_call(budget: object, call: object) -> object:
    if isinstance(call, dict):
        return budget.record(**call)  # type: ignore[attr-defined]
    return budget.record(*call)  # type: ignore[attr-defined]


def comparable(rec: object) -> tuple[object, ...]:
    return tuple(getattr(rec, f) for f in ("session_id", "model", "input_tokens", "output_tokens", "cost_nano_usd"))


def test_record_many_charges_like_record_one_by_one(backend: Backend, clock: Clock) -> None:
    many = backend.budget(scope("many"), RATES, clock=clock)
    one = backend.budget(scope("one"), RATES, clock=clock)
    records = many.record_many(CALLS)
    expected = [as_record_call(one, c) for c in CALLS]
    assert [comparable(r) for r in records] == [comparable(r) for r in expected]
    assert [r.metadata for r in records] == [r.metadata for r in expected]
    assert [r.request_id for r in records] == [None, None, "req-1", None]
    assert many.records == records
    for sid in ("a", "b"):
        a, b = many.summary(sid), one.summary(sid)
        for part in ("session", "day", "total", "per_model"):
            assert a[part] == b[part], (sid, part)
    assert many.session_id == one.session_id == "b"  # the last call's session is the current one
    ledger = many.ledger()
    assert [(e.session_id, e.model, e.tokens, e.cost_nano_usd) for e in ledger] == [
        (r.session_id, r.model, r.total_tokens, r.cost_nano_usd) for r in records
    ]
    assert [e.id for e in ledger] == [r.ledger_id for r in records]


def test_record_many_of_nothing(backend: Backend) -> None:
    budget = backend.budget(scope("none"), RATES, session_id="a")
    assert budget.record_many([]) == []
    assert budget.record_many(iter(())) == []
    assert budget.summary()["session"]["tokens"] == 0


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (("a", "m", -1, 0), ValueError),
        (("a", "m", 1.0, 0), TypeError),
        (("a", "unknown-model", 1, 0), KeyError),
        ({"session_id": "a", "model": "m", "input_tokens": 1}, TypeError),  # output_tokens missing
        ({"session_id": "a", "model": "m", "input_tokens": 1, "output_tokens": 1, "nope": 1}, TypeError),
        (("a", "m", 1, 1, "not a dict"), TypeError),
        ("a string", TypeError),
    ],
)
def test_a_bad_call_charges_nothing(backend: Backend, bad: object, error: type[Exception]) -> None:
    budget = backend.budget(scope("bad"), RATES, session_id="a")
    with pytest.raises(error):
        budget.record_many([("a", "m", 10, 10), bad, ("a", "m", 10, 10)])
    assert budget.summary()["session"]["tokens"] == 0
    assert budget.records == []
    with pytest.raises(TypeError):
        budget.record_many(("a", "m", 1, 1))  # one call, not an iterable of calls


def test_a_bad_batch_leaves_the_current_session(backend: Backend) -> None:
    budget = backend.budget(scope("keep"), RATES)
    budget.record("x", "m", 1, 0)
    with pytest.raises(ValueError):
        budget.record_many([("y", "m", 1, 0), ("y", "m", -1, 0)])  # valid, then invalid
    assert budget.session_id == "x"
    assert budget.summary()["session"]["tokens"] == 1


def test_hard_stop_raises_after_charging_every_call(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("cap", max_tokens_per_session=100), RATES, session_id="a")
    alerts = []
    budget.on_alert(alerts.append)
    with pytest.raises(BudgetExceededError) as info:
        budget.record_many([(None, "m", 60, 0), (None, "m", 50, 0), (None, "m", 5, 0)])
    err = info.value
    assert err.limit_type == "session_tokens"
    assert err.used == 110
    assert err.record is not None
    assert err.record.total_tokens == 50  # the first call over the limit
    assert [r.total_tokens for r in budget.records] == [60, 50, 5]  # money spent is never dropped
    assert budget.summary()["session"]["tokens"] == 115
    assert [(a.level, a.limit_type) for a in alerts] == [
        (AlertLevel.WARNING, "session_tokens"),
        (AlertLevel.CRITICAL, "session_tokens"),
    ]


def test_soft_stop_warns_and_returns_every_record(backend: Backend) -> None:
    budget = backend.budget(BudgetScope("soft", max_tokens_per_session=100, hard_stop=False), RATES, session_id="a")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        records = budget.record_many([(None, "m", 90, 0), (None, "m", 20, 0), (None, "m", 1, 0)])
    assert [r.total_tokens for r in records] == [90, 20, 1]
    assert len([w for w in seen if w.category is BudgetWarning]) == 2


def test_request_ids_inside_one_batch_charge_once(backend: Backend) -> None:
    budget = backend.budget(scope("idem"), RATES, session_id="a")
    first, again, other = budget.record_many(
        [(None, "m", 10, 0, None, "r"), (None, "m", 99, 0, None, "r"), (None, "m", 1, 0, None, "s")]
    )
    assert not first.duplicate
    assert again.duplicate
    assert again.total_tokens == 99  # the call as made; the charge is the original's
    assert again.cost_nano_usd == first.cost_nano_usd
    assert not other.duplicate
    assert budget.summary()["session"]["tokens"] == 11
    (retried,) = budget.record_many([(None, "m", 10, 0, None, "r")])
    assert retried.duplicate
    assert budget.summary()["session"]["tokens"] == 11


def test_record_many_with_the_ledger_off(backend: Backend) -> None:
    budget = backend.budget(scope("noledger"), RATES, session_id="a", ledger_maxlen=0)
    records = budget.record_many([(None, "m", 1, 1)] * 3)
    assert [r.ledger_id for r in records] == [None, None, None]
    assert budget.ledger() == []
    assert budget.summary()["session"]["requests"] == 3


def test_record_many_survives_script_cache_loss(backend: Backend) -> None:
    if backend.kind != "redis":
        pytest.skip("SCRIPT FLUSH on a real server")
    budget = backend.budget(scope("flush"), RATES, session_id="a")
    budget.record_many([(None, "m", 1, 0)])
    backend.store.script_flush()
    budget.record_many([(None, "m", 1, 0), (None, "m", 2, 0)])  # NOSCRIPT: loaded, sent again
    assert budget.summary()["session"]["tokens"] == 4


def test_record_many_with_wait_replicas_sends_one_wait(redis_server: RedisServer) -> None:
    """With ``wait_replicas``, one WAIT follows the batch in the same round trip; on a server with
    no replica it times out, and every charge of the batch counts as under-replicated."""
    admin = redis_server.client()
    admin.flushall()
    budget = Budget(scope("waited"), RATES, redis=redis_server.url + "?wait_replicas=1&wait_timeout_ms=10")
    budget.record_many([(None, "m", 1, 0)])
    assert budget.engine.under_replicated == 1
    admin.config_resetstat()
    records = budget.record_many([(None, "m", 1, 0)] * 3)
    assert len(records) == 3
    stats = admin.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3
    assert 1 <= stats["cmdstat_wait"]["calls"] <= 2  # Redis counts a WAIT that blocked once more
    assert budget.engine.under_replicated == 4
    assert budget.summary()["session"]["tokens"] == 4
