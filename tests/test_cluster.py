"""Redis Cluster: a real 3-master cluster (``redis_cluster`` in conftest; the behavioural suite runs on
it too, as the ``cluster`` and ``cluster-async`` backends). Here: scope trees spread over every shard
with no CROSSSLOT, ``redis+cluster://`` URLs, script-cache loss on every node, and alert listeners
that follow trees living on different shards."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from distbudget import AsyncBudget, Budget, BudgetExceededError, BudgetManager, BudgetScope, ModelRates
from distbudget.alerts import AlertListener, AsyncAlertListener
from distbudget.engines.connect import SafeRedisCluster
from tests._servers import Cluster, wait_for

RATES = {"m": ModelRates(0.001, 0.002)}


def node_of_key(cluster: Cluster, key: bytes) -> int:
    """The port of the node that holds ``key`` (asked of the nodes, not computed here)."""
    slot = cluster.nodes[0].client().execute_command("CLUSTER", "KEYSLOT", key)
    assert slot == key_slot(key)
    holders = [
        n.port for n in cluster.nodes if key in n.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    ]
    assert len(holders) == 1, (key, holders)
    return holders[0]


def crossslot_errors(cluster: Cluster) -> int:
    total = 0
    for node in cluster.nodes:
        stats = node.client().info("errorstats")
        total += int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))
    return total


def test_scope_trees_spread_over_every_shard_each_tree_on_one(redis_cluster: Cluster) -> None:
    redis_cluster.flushall()
    before = crossslot_errors(redis_cluster)
    mgr = BudgetManager(redis=redis_cluster.user_url)  # redis+cluster://user:pw@h:p,h:p,h:p
    assert isinstance(mgr._engine.client, SafeRedisCluster)
    for i in range(60):
        org = BudgetScope(f"org {i}", max_tokens_per_day=10_000)
        mgr.register(org, RATES)
        mgr.register(BudgetScope(f"team {{{i}}}", parent=org, max_tokens_per_session=1000), RATES)
    for i in range(60):
        mgr.record(f"team {{{i}}}", "s", "m", 10, 5, request_id=f"r{i}")
        mgr.record(f"team {{{i}}}", "s", "m", 10, 5, request_id=f"r{i}")  # a duplicate: charged once
        with mgr.reserve(f"team {{{i}}}", "m", 20, 20, session_id="s") as hold:
            hold.commit(20, 10)
        assert mgr.summary(f"team {{{i}}}", "s")["session"]["tokens"] == 45
        assert mgr.summary(f"org {i}")["day"]["tokens"] == 45
    admin = redis_cluster.client()
    keys = list(admin.scan_iter(count=1000))
    trees: dict[str, set[int]] = {}
    for key in keys:
        text = key.decode()
        if "{" not in text:  # the registry and the alert-stream index: one key each
            continue
        tag = text[text.index("{") + 1 : text.index("}")]
        trees.setdefault(tag, set()).add(key_slot(key))
    assert len(trees) == 60
    assert all(len(slots) == 1 for slots in trees.values())  # every key of a tree in one slot
    shards = {node_of_key(redis_cluster, k) for k in keys if b"{" in k and b":t:" in k}
    assert shards == {n.port for n in redis_cluster.nodes}  # and the trees on every shard
    assert crossslot_errors(redis_cluster) == before  # no CROSSSLOT, ever


def test_script_flush_on_every_node_is_invisible(redis_cluster: Cluster) -> None:
    redis_cluster.flushall()
    scopes = [BudgetScope(f"flush-{i}", max_tokens_per_session=10_000) for i in range(12)]
    budgets = [Budget(s, RATES, redis=redis_cluster.user_url, session_id="a") for s in scopes]
    for b in budgets:
        b.record(None, "m", 1, 0)
    assert len({node_of_key(redis_cluster, b._core.keyspace.totals(b.name).encode()) for b in budgets}) > 1

    def flush_everywhere() -> None:
        for node in redis_cluster.nodes:
            node.client().script_flush()
            assert node.client().script_exists(budgets[0].engine.scripts["record"].sha) == [False]

    flush_everywhere()
    for b in budgets:
        b.record(None, "m", 1, 0)
    with budgets[0].reserve("m", 1, 1) as hold:
        flush_everywhere()
        hold.commit(1, 1)

    async def run_async() -> None:
        ab = AsyncBudget(scopes[5], RATES, redis=redis_cluster.user_url, session_id="a")
        await ab.record(None, "m", 1, 0)
        flush_everywhere()
        await ab.record(None, "m", 1, 0)
        assert (await ab.summary())["session"]["tokens"] == 4

    asyncio.run(run_async())
    assert [b.summary()["session"]["tokens"] for b in budgets] == [4] + [2] * 4 + [4] + [2] * 6


def _cross(url: str, names: list[str]) -> None:
    for name in names:
        b = Budget(BudgetScope(name, max_tokens_per_session=100), RATES, redis=url, session_id="s")
        b.record(None, "m", 85, 0)  # WARNING
        with pytest.raises(BudgetExceededError):
            b.record(None, "m", 30, 0)  # CRITICAL


def _stream_ids(cluster: Cluster) -> set[str]:
    admin = cluster.client()
    return {eid.decode() for stream in admin.hvals("distbudget:alert-streams") for eid, _ in admin.xrange(stream)}


def test_listener_hears_trees_on_every_shard_live_and_replays(redis_cluster: Cluster) -> None:
    redis_cluster.flushall()
    names = [f"alerting-{i}" for i in range(9)]
    slots = {key_slot(f"distbudget:{{{n}}}:alerts".encode()) for n in names}
    assert len(slots) == 9  # nine trees, nine slots: one XREAD over them all would be CROSSSLOT
    for node in redis_cluster.nodes:
        node.client().config_resetstat()
    before = crossslot_errors(redis_cluster)
    got: list[str] = []
    lock = threading.Lock()

    def hear(alert: Any) -> None:
        with lock:
            got.append(alert.alert_id)

    listener = AlertListener(redis=redis_cluster.user_url, block_ms=100).start(hear)
    _cross(redis_cluster.user_url, names[:5])  # live
    assert wait_for(lambda: len(got) == 10)
    ports = {node_of_key(redis_cluster, f"distbudget:{{{n}}}:alerts".encode()) for n in names[:5]}
    assert len(ports) > 1  # the streams it followed live on several shards
    listener.stop()
    last = dict(listener.last_ids)
    _cross(redis_cluster.user_url, names[5:])  # while no listener runs
    replay: list[str] = []
    listener = AlertListener(redis=redis_cluster.user_url, block_ms=100, last_ids=last).start(
        lambda a: replay.append(a.alert_id)
    )
    assert wait_for(lambda: len(replay) == 8)
    _cross(redis_cluster.user_url, ["alerting-late"])  # a tree that did not exist when it started
    assert wait_for(lambda: len(replay) == 10)
    listener.stop()
    assert len(set(got + replay)) == len(got) + len(replay) == 20  # each once
    assert set(got + replay) == _stream_ids(redis_cluster)
    assert crossslot_errors(redis_cluster) == before
    for node in redis_cluster.nodes:  # each XREAD went straight to its node: no COMMAND GETKEYS first
        stats = node.client().info("commandstats")
        assert stats["cmdstat_xread"]["calls"] > 0
        assert "cmdstat_command|getkeys" not in stats


def test_async_listener_on_cluster(redis_cluster: Cluster) -> None:
    redis_cluster.flushall()
    names = [f"async-alerting-{i}" for i in range(6)]

    async def run() -> list[str]:
        listener = AsyncAlertListener(redis=redis_cluster.user_url, block_ms=100)
        heard: list[str] = []

        async def consume() -> None:
            async for alert in listener:
                heard.append(alert.alert_id or "")
                if len(heard) == 12:
                    listener.stop()

        task = asyncio.create_task(consume())
        await asyncio.to_thread(_cross, redis_cluster.user_url, names)
        await asyncio.wait_for(task, 30)
        return heard

    heard = asyncio.run(run())
    assert len(set(heard)) == 12 and set(heard) == _stream_ids(redis_cluster)


def test_cluster_acl_user_is_confined_to_the_prefix(redis_cluster: Cluster) -> None:
    """The backends of the behavioural suite connect as this user; it can touch nothing else."""
    assert redis_cluster.user is not None
    client = redis_cluster.client(*redis_cluster.user)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("other:{x}", 1)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.hgetall("elsewhere")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command("FLUSHALL", target_nodes=SafeRedisCluster.PRIMARIES)


def test_a_ready_cluster_client_that_retries_is_warned_about(
    redis_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py's RedisCluster re-sends a command after a connection error or timeout by default:
    warned once; distbudget's own cluster clients (from a URL) are quiet."""
    plain = redis_cluster.client()
    with caplog.at_level("WARNING", logger="distbudget"):
        Budget(BudgetScope("warned"), {"m": ModelRates(0.001, 0.002)}, redis=plain)
        Budget(BudgetScope("quiet"), {"m": ModelRates(0.001, 0.002)}, redis=redis_cluster.url)
    warned = [r for r in caplog.records if "re-sends a command" in r.getMessage()]
    assert len(warned) == 1
    plain.close()
