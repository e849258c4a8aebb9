"""Eviction (issue 14): a server whose ``maxmemory-policy`` evicts keys is refused (unless
``allow_eviction=True``); a window whose bucket index (its ``z:`` sorted set) was lost while its hash
survived heals: it keeps every charge the hash holds and drains when they age out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from distbudget import (
    AsyncBudget,
    BackendError,
    Budget,
    BudgetExceededError,
    BudgetManager,
    BudgetScope,
    DistBudgetError,
    Limit,
    ModelRates,
    ServerConfigError,
)
from distbudget.engines.functions import acl_rules
from tests._servers import Cluster, RedisServer
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
    assert 0 < backend.store.pttl(index) <= (10 + 1 + 3600) * 1000  # rebuilt, with its hash's TTL
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


# ---- an evicting server is refused --------------------------------------------------------------------


@pytest.fixture
def lru_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, "--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")
    yield server
    server.stop()


def test_an_evicting_server_is_refused(lru_server: RedisServer) -> None:
    scope = BudgetScope("e", max_cost_per_session_usd=1)
    for options in ({}, {"on_backend_error": "allow"}):  # a configuration error, never an outage
        budget = Budget(scope, RATES, redis=lru_server.admin_url, **options)
        with pytest.raises(ServerConfigError, match=r"maxmemory-policy.*allkeys-lru.*noeviction") as info:
            budget.record("s", "m", 10, 0)
        assert "allow_eviction=True" in str(info.value) and isinstance(info.value, DistBudgetError)
        assert budget.backend_status["journaled"] == 0
    with pytest.raises(ServerConfigError):
        asyncio.run(AsyncBudget(scope, RATES, redis=lru_server.admin_url).record("s", "m", 10, 0))
    with pytest.raises(ServerConfigError):
        BudgetManager(redis=lru_server.admin_url).register(scope, RATES)
    assert lru_server.client().dbsize() == 0  # nothing was written


def test_a_worker_reads_the_policy_from_info(lru_server: RedisServer) -> None:
    """A worker may not run CONFIG GET: the policy comes from INFO memory, and nothing is refused
    on the server's side (its ACL LOG stays empty)."""
    admin = lru_server.client()
    admin.execute_command("ACL", "SETUSER", "w", "reset", "on", ">pw", *acl_rules("distbudget"))
    url = f"redis://w:pw@127.0.0.1:{lru_server.port}/0"
    with pytest.raises(ServerConfigError, match="allkeys-lru"):
        Budget(BudgetScope("e"), RATES, redis=url).record("s", "m", 10, 0)
    assert admin.execute_command("ACL", "LOG") == []


def test_allow_eviction_accepts_an_evicting_server(lru_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    budget = Budget(
        BudgetScope("e", max_tokens_per_session=100), RATES, redis=lru_server.admin_url, allow_eviction=True
    )
    with caplog.at_level(logging.WARNING, logger="distbudget"):
        budget.record("s", "m", 10, 0)
    assert "allow_eviction=True on an evicting server" in caplog.text
    assert budget.summary("s")["session"]["tokens"] == 10
    mgr = BudgetManager(redis=lru_server.admin_url, allow_eviction=True)
    mgr.register(BudgetScope("m"), RATES)
    with pytest.raises(TypeError, match="allow_eviction"):
        Budget(BudgetScope("e"), RATES, redis=lru_server.admin_url, allow_eviction="yes")


def test_the_policy_is_checked_again_after_a_reconnect(tmp_path: Path) -> None:
    """A server that comes back (a restart, a failover) is checked again before the next charge:
    the charge journaled during the outage is not replayed into an evicting server, and is replayed
    once the policy is fixed."""
    server = RedisServer(tmp_path)
    try:
        budget = Budget(BudgetScope("r", max_tokens_per_session=100), RATES, redis=server.admin_url)
        budget.record("s", "m", 10, 0)
        port = server.port
        server.stop()
        with pytest.raises(BackendError) as info:
            budget.record("s", "m", 5, 0)
        assert info.value.journaled
        server = RedisServer(tmp_path, "--maxmemory-policy", "volatile-lru", port=port)
        with pytest.raises(BackendError, match=r"1 charge.*stay journaled.*volatile-lru"):
            budget.flush_journal()
        assert server.client().dbsize() == 0  # nothing replayed, nothing dropped
        server.client().config_set("maxmemory-policy", "noeviction")
        assert budget.flush_journal() == 1  # fixed: accepted without restarting the worker
        assert budget.summary("s")["session"]["tokens"] == 5
    finally:
        server.stop()


def test_an_evicting_cluster_master_is_refused(redis_cluster: Cluster) -> None:
    node = redis_cluster.nodes[1]
    node.client().config_set("maxmemory-policy", "allkeys-lfu")
    try:
        with pytest.raises(ServerConfigError, match=f"127.0.0.1:{node.port}: allkeys-lfu"):
            Budget(BudgetScope("c"), RATES, redis=redis_cluster.url).record("s", "m", 1, 0)
    finally:
        node.client().config_set("maxmemory-policy", "noeviction")


@pytest.mark.parametrize("backend", STORES, indirect=True)
def test_holds_whose_leases_were_lost_still_expire(backend: Backend, clock: Clock) -> None:
    """The leases set lost while the holds survive: each hold keeps its money held until its own
    lease ends (the expiry its record carries), then frees it — never held forever."""
    clock.t = 1_800_000_000.0
    budget = backend.budget(BudgetScope("h", max_tokens_per_session=100), RATES, clock=clock, hold_ttl=30)
    budget.reserve("m", 50, 40, session_id="s")  # 90 held, never committed (a worker died)
    assert backend.store.delete(budget._core.keyspace.leases) == 1
    with pytest.raises(BudgetExceededError):
        budget.check("m", 20, session_id="s")  # still held
    clock.advance(29)
    with pytest.raises(BudgetExceededError):
        budget.reserve("m", 20, 0, session_id="s")
    clock.advance(2)  # its lease has ended
    assert budget.check("m", 100, session_id="s")
    assert budget.summary("s")["limits"]["session_tokens"]["held"] == 0


@pytest.mark.parametrize("backend", STORES, indirect=True)
def test_leases_whose_holds_were_lost_are_reaped(backend: Backend, clock: Clock) -> None:
    clock.t = 1_800_000_000.0
    budget = backend.budget(BudgetScope("h", max_tokens_per_session=100), RATES, clock=clock, hold_ttl=30)
    budget.reserve("m", 50, 40, session_id="s")
    assert backend.store.delete(budget._core.keyspace.holds) == 1  # the held money is gone with it
    assert budget.check("m", 100, session_id="s")
    clock.advance(31)
    budget.check("m", 1, session_id="s")
    assert backend.store.exists(budget._core.keyspace.leases) == 0  # the orphan lease was reaped
