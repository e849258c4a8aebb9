"""Redis Cluster faults, on real clusters of our own (``tests/_servers.py``): a node that stalls while a
``record_many`` pipeline waits for its replies (a busy Lua script longer than the client's socket
timeout: the client gives up, the node runs the charges afterwards), a slot moved behind the client's
back, and every node stopped (budgets meet their failure policy; alert listeners wait it out).

The books are checked as in ``test_failure_policy.py``: every charge counted exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distbudget import AsyncBudget, BackendError, Budget, BudgetScope
from distbudget.alerts import AlertListener, AsyncAlertListener
from tests._servers import Cluster, RedisServer, wait_for

pytestmark = pytest.mark.slow

MODEL = "gpt-4o"
# Runs on the node holding KEYS[1] for ARGV[1] µs without answering anyone (as a fork, a slow disk or
# a big DEL can stall a node).
SPIN = (
    "local t = redis.call('TIME') "
    "while true do local n = redis.call('TIME') "
    "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > tonumber(ARGV[1]) then break end end return 1"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("faulty-cluster"))
    yield cl
    cl.stop()


def node_of(cluster: Cluster, key: str) -> RedisServer:
    """The node that holds ``key`` (as a Cluster client maps it)."""
    port = cluster.client().get_node_from_key(key).port
    return next(n for n in cluster.nodes if n.port == port)


def stall(node: RedisServer, key: str, seconds: float) -> threading.Thread:
    admin = node.client(socket_timeout=seconds + 5)
    thread = threading.Thread(target=lambda: admin.eval(SPIN, 1, key, int(seconds * 1_000_000)))
    thread.start()
    time.sleep(0.1)  # the spin has started: the node answers nobody until it ends
    return thread


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_record_many_whose_replies_time_out_is_counted_once(cluster: Cluster, api: str) -> None:
    """The node runs the whole pipeline after the client gave up on it: nothing may send it again
    (redis-py's ClusterPipeline re-sends a node's commands one by one after a timeout), and the
    journaled charges are found in the ledger on replay."""
    name = f"stalled-{api}"
    scope = BudgetScope(name, max_tokens_per_session=10**9)
    url = cluster.url + "?socket_timeout=0.3"
    batch = [("s", MODEL, 10 + i, 0) for i in range(50)]
    key = f"distbudget:{{{name}}}:t:{name}"
    if api == "sync":
        budget = Budget(scope, redis=url, on_backend_error="allow")
        budget.record("s", MODEL, 1, 0)  # scripts loaded, slot map read
        spin = stall(node_of(cluster, key), key, 1.0)
        records = budget.record_many(batch)
        spin.join()
        status = budget.backend_status
        assert all(r.journaled for r in records)
        assert (status["journaled"], status["ambiguous"]) == (50, 50)  # each may have run: looked up
        assert budget.flush_journal() == 50
        summary = budget.summary()
    else:

        async def run() -> tuple[list[bool], dict[str, object]]:
            budget = AsyncBudget(scope, redis=url, on_backend_error="allow")
            await budget.record("s", MODEL, 1, 0)
            spin = stall(node_of(cluster, key), key, 1.0)
            records = await budget.record_many(batch)
            await asyncio.to_thread(spin.join)
            assert budget.backend_status["ambiguous"] == 50
            assert await budget.flush_journal() == 50
            return [r.journaled for r in records], await budget.summary()

        journaled, summary = asyncio.run(run())
        assert all(journaled)
    status = summary["backend"]  # type: ignore[index]
    # the node ran those it had read when the client gave up (found in the ledger), not the others
    assert status["already_applied"] > 0 and status["already_applied"] + status["replayed"] == 50
    assert status["journaled"] == 0
    assert summary["total"]["requests"] == 51  # type: ignore[index]
    assert cluster.client().xlen(f"distbudget:{{{name}}}:ledger") == 51
    assert summary["total"]["tokens"] == 1 + sum(10 + i for i in range(50))  # type: ignore[index]


def move_slot(cluster: Cluster, key: str) -> None:
    """Give the (empty) slot of ``key`` to another node, behind the clients' backs."""
    src = node_of(cluster, key)
    dst = next(n for n in cluster.nodes if n.port != src.port)
    dst_id = dst.client().execute_command("CLUSTER", "MYID").decode()
    slot = cluster.client().keyslot(key)
    for node in cluster.nodes:
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_record_many_follows_moved_slots(cluster: Cluster, api: str) -> None:
    """The batch reaches a node that no longer owns the tree's slot: MOVED (the scripts did not run)
    is followed, each charge counted once."""
    name = f"moved-{api}"
    scope = BudgetScope(name, max_tokens_per_session=10**9)
    batch = [("s", MODEL, 10 + i, 0) for i in range(20)]
    key = f"distbudget:{{{name}}}:t:{name}"
    if api == "sync":
        budget = Budget(scope, redis=cluster.url)
        assert budget.check(MODEL, 1)  # the client has read the slot map
        move_slot(cluster, key)
        assert not any(r.journaled for r in budget.record_many(batch))
        total = budget.summary()["total"]
    else:

        async def run() -> dict[str, object]:
            budget = AsyncBudget(scope, redis=cluster.url)
            assert await budget.check(MODEL, 1)
            move_slot(cluster, key)
            assert not any(r.journaled for r in await budget.record_many(batch))
            return (await budget.summary())["total"]  # type: ignore[no-any-return]

        total = asyncio.run(run())
    assert total == {"tokens": sum(10 + i for i in range(20)), "cost_usd": total["cost_usd"], "requests": 20}
    assert cluster.client().xlen(f"distbudget:{{{name}}}:ledger") == 20


def test_every_node_down_meets_the_failure_policy(tmp_path: Path) -> None:
    """With the whole Cluster unreachable, calls meet the failure policy (the Cluster client's own
    errors are not RedisErrors); a budget can still be made under "deny" / "allow" (its client is
    connected at its first call) and fails with BackendError under "raise"."""
    cl = Cluster(tmp_path)
    try:
        scope = BudgetScope("everywhere", max_tokens_per_session=10**9)
        budget = Budget(scope, redis=cl.url, on_backend_error="allow")
        assert budget.check(MODEL, 1)  # connected (the nodes keep no data across the restart below)
        for node in cl.nodes:
            node.stop()
        assert budget.record("s", MODEL, 10, 0).journaled
        time.sleep(0.55)  # the next attempt to reach the Cluster is due
        assert all(r.journaled for r in budget.record_many([("s", MODEL, 20, 0), ("s", MODEL, 30, 0)]))
        assert budget.backend_status["journaled"] == 3
        with pytest.raises(BackendError, match="cannot connect to the Redis Cluster"):
            Budget(scope, redis=cl.url)  # on_backend_error="raise": fails at once
        late = Budget(scope, redis=cl.url, on_backend_error="deny")  # a worker starting during the outage
        assert late.record("s", MODEL, 40, 0).journaled
        for node in cl.nodes:
            node.start()
        assert wait_for(lambda: all(cl._state_ok(n) for n in cl.nodes), timeout=30)

        def flushed(b: Budget) -> bool:
            try:
                b.flush_journal()
            except BackendError:
                return False
            return True

        assert wait_for(lambda: flushed(budget) and flushed(late), timeout=20)
        assert budget.summary()["total"]["tokens"] == 10 + 20 + 30 + 40
        assert late.summary()["total"]["requests"] == 4
    finally:
        cl.stop()


def test_alert_listeners_outlive_a_cluster_outage(tmp_path: Path) -> None:
    """Every node down: redis-py's Cluster clients raise RedisClusterException (not a RedisError),
    then CLUSTERDOWN while the nodes come back. Both listeners retry with backoff, as after a lost
    connection, and hear the alerts raised once the cluster serves again."""
    cl = Cluster(tmp_path)
    heard: list[str | None] = []
    heard_async: list[str | None] = []
    listener = AlertListener(redis=cl.url, block_ms=100).start(lambda a: heard.append(a.session_id))
    alisteners: list[AsyncAlertListener] = []

    async def consume() -> None:
        alisteners.append(AsyncAlertListener(redis=cl.url, block_ms=100))
        async for alert in alisteners[0]:
            heard_async.append(alert.session_id)

    athread = threading.Thread(target=lambda: asyncio.run(consume()), daemon=True)
    athread.start()
    try:
        scope = BudgetScope("listened", max_tokens_per_session=100)
        Budget(scope, redis=cl.url).record("before", MODEL, 90, 0)  # a warning, heard by both
        assert wait_for(lambda: heard == heard_async == ["before"])
        for node in cl.nodes:
            node.stop()
        assert wait_for(lambda: listener.backoff >= 0.4 and alisteners[0].backoff >= 0.4)  # retried, alive
        for node in cl.nodes:
            node.start()
        assert wait_for(lambda: all(cl._state_ok(n) for n in cl.nodes), timeout=30)
        # the nodes kept no data: a new budget announces the tree's alert stream again
        Budget(scope, redis=cl.url).record("after", MODEL, 90, 0)
        assert wait_for(lambda: heard == heard_async == ["before", "after"], timeout=30)
        assert listener._thread is not None and listener._thread.is_alive() and athread.is_alive()
    finally:
        listener.stop()
        if alisteners:
            alisteners[0].stop()
        athread.join(5)
        cl.stop()
