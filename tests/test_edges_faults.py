"""Issue 13, with real outages (``kill -9`` of an AOF redis-server, then a restart): bad input is
refused at the call whether Redis is up or not (never journaled to poison the replay), and the replay
never stalls on one entry: an entry that fails for a reason other than an outage is set aside in the
dead-letter list (logged with its ledger entry, counted in ``summary()["backend"]["rejected"]``) and
the charges behind it are applied."""

from __future__ import annotations

from typing import Any

import pytest

from distbudget import Budget, InvalidInputError
from distbudget._core.keys import KeySpace
from distbudget._core.ops import Record
from tests._faults import AofRedis
from tests.test_failure_policy import MODEL, big_scope, server  # noqa: F401  (server: the fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["allow", "deny", "raise"])
def test_bad_input_during_an_outage_is_refused_not_journaled(server: AofRedis, mode: str) -> None:  # noqa: F811
    budget = Budget(big_scope(), redis=server.url, on_backend_error=mode)
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    if mode != "raise":
        assert budget.record("s1", MODEL, 10, 0).journaled
    for call in (
        lambda: budget.record("s\ud800", MODEL, 11, 0),
        lambda: budget.record("s1", MODEL, 12, 0, {"note": "\udc00"}),
        lambda: budget.record("s1", MODEL, 13, 0, {"blob": "x" * 5000}),
        lambda: budget.record("s1", MODEL, 14, 0, request_id="r\ud800"),
        lambda: budget.reserve(MODEL, 15, 0, ttl=1e17),
    ):
        with pytest.raises(InvalidInputError):
            call()
    if mode != "raise":
        assert budget.record("s1", MODEL, 20, 0).journaled
    assert budget.backend_status["journaled"] == (0 if mode == "raise" else 2)
    server.start()
    budget.flush_journal()
    assert budget.summary("s1")["session"]["tokens"] == (1 if mode == "raise" else 31)
    assert budget.backend_status["rejected"] == 0


def test_replay_sets_aside_a_charge_redis_refuses_and_goes_on(
    server: AofRedis,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = Budget(big_scope(), redis=server.url, on_backend_error="allow")
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    for sid, tokens in (("s1", 10), ("s2", 20), ("s1", 30)):
        assert budget.record(sid, MODEL, tokens, 0).journaled
    server.start()
    with server.client() as admin:  # s2's session counter is no longer a hash: Redis refuses that charge
        admin.set(KeySpace("distbudget", "fleet").session("fleet", "s2"), "not a hash")
    budget.flush_journal()
    summary = budget.summary("s1")
    assert summary["total"]["tokens"] == 1 + 10 + 30 and summary["session"]["tokens"] == 41
    assert summary["backend"]["rejected"] == 1 and summary["backend"]["journaled"] == 0
    assert any("input_tokens" in r.getMessage() and "20" in r.getMessage() for r in caplog.records)
    assert budget.record("s1", MODEL, 5, 0).total_tokens == 5  # and the budget goes on


def test_replay_sets_aside_an_entry_that_fails_in_the_client_and_goes_on(
    server: AofRedis,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure that is no Redis error at all (here a charge the client cannot encode, injected into
    the engine: the public API refuses such input up front) is set aside too; it used to propagate out
    of every later call of the engine, and the charges queued behind it were lost at exit."""
    budget = Budget(big_scope(), redis=server.url, on_backend_error="allow")
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    for tokens in (10, 20, 30):
        assert budget.record("s1", MODEL, tokens, 0).journaled
    server.start()
    execute = budget.engine.execute

    def poisoned(op: Any) -> Any:
        if isinstance(op, Record) and op.amounts[0] == 20:
            "\ud800".encode()  # what a lone surrogate did inside redis-py
        return execute(op)

    budget.engine.execute = poisoned  # type: ignore[method-assign]
    budget.flush_journal()
    assert budget.summary()["total"]["tokens"] == 1 + 10 + 30
    assert budget.backend_status["rejected"] == 1
    assert any("UnicodeEncodeError" in r.getMessage() or "surrogate" in r.getMessage() for r in caplog.records)
