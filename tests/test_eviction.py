"""Eviction (issue 14): a window whose bucket index (its ``z:`` sorted set) was lost while its hash
survived heals: it keeps every charge the hash holds and drains when they age out."""

from __future__ import annotations

import pytest

from distbudget import BudgetExceededError, BudgetScope, Limit, ModelRates
from tests.conftest import Backend, Clock

RATES = {"m": ModelRates(0.001, 0.002)}
STORES = ["fakeredis", "redis", "cluster"]


def _window_budget(backend: Backend, clock: Clock) -> tuple[object, str]:
    clock.t = 1_800_000_000.0
    budget = backend.budget(BudgetScope("w", limits=[Limit("tokens", 100, "10s")]), RATES, clock=clock)
    _hash, index = budget._core.keyspace.window("w", 10, None)
    return budget, index


@pytest.mark.parametrize("backend", STORES, indirect=True)
def test_a_window_whose_index_was_lost_keeps_its_charges_and_drains(backend: Backend, clock: Clock) -> None:
    budget, index = _window_budget(backend, clock)
    budget.record("s", "m", 60, 0)
    clock.advance(3)
    budget.record("s", "m", 40, 0)
    assert backend.store.delete(index) == 1  # evicted, or deleted by hand
    with pytest.raises(BudgetExceededError) as info:
        budget.check("m", 1)
    # the charges the hash holds still count, and the refusal says when the first bucket leaves
    assert info.value.retry_after == pytest.approx(8)
    hash_ttl = backend.store.pttl(index.replace(":z:", ":w:", 1))  # read first: the index's is read later
    # rebuilt, with its hash's TTL (fakeredis's clock moves between two commands of a script: 1 ms slack)
    assert 0 < backend.store.pttl(index) <= hash_ttl + 1
    clock.advance(8)  # the first bucket has left the window: its 60 tokens are freed
    assert budget.check("m", 60)
    with pytest.raises(BudgetExceededError):
        budget.check("m", 61)
    clock.advance(3)  # both have left
    assert budget.check("m", 100)
    assert budget.summary("s")["limits"]["10s_tokens"]["used"] == 0


@pytest.mark.parametrize("backend", STORES, indirect=True)
def test_a_window_whose_index_was_lost_then_charged_again_drains(backend: Backend, clock: Clock) -> None:
    """A charge in a new bucket re-creates the index with that bucket alone: the older buckets the
    hash holds are put back when they are due to age out, never left in the totals forever."""
    budget, index = _window_budget(backend, clock)
    budget.record("s", "m", 50, 0)
    backend.store.delete(index)
    clock.advance(5)
    budget.record("s", "m", 30, 0)  # a new bucket: the index now holds it alone
    clock.advance(6)  # the first bucket has left
    assert budget.check("m", 70)
    with pytest.raises(BudgetExceededError):
        budget.check("m", 71)
    clock.advance(5)
    assert budget.summary("s")["limits"]["10s_tokens"]["used"] == 0


@pytest.mark.parametrize("backend", STORES, indirect=True)
def test_a_window_whose_hash_was_lost_is_not_refused(backend: Backend, clock: Clock) -> None:
    """The hash holds the amounts: when it is lost they are (the reason distbudget refuses an
    evicting server); what is left, the index, never blocks the window."""
    budget, index = _window_budget(backend, clock)
    budget.record("s", "m", 100, 0)
    backend.store.delete(index.replace(":z:", ":w:", 1))
    assert budget.check("m", 100)
    clock.advance(2)
    budget.record("s", "m", 100, 0)
    with pytest.raises(BudgetExceededError) as info:
        budget.check("m", 1)
    assert info.value.retry_after == pytest.approx(11)
    clock.advance(11)
    assert budget.check("m", 100)
