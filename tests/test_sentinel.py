"""Sentinel: a real master, replica and Sentinel on loopback ports. The master is killed (``kill -9``)
under a worker recording continuously; once the Sentinel promotes the replica the same client
carries on. Calls during the failover raise ``BackendError`` and are retried with their
``request_id``, so every call is charged exactly once in the end."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from distbudget import AsyncBudget, BackendError, Budget, BudgetScope, ModelRates
from distbudget.engines.connect import parse
from tests._servers import SentinelSet, wait_for

RATES = {"m": ModelRates(0.001, 0.002)}
PASSWORD = "s3cret/pw"  # a password with a URL-special character, percent-encoded in the URL


@pytest.fixture
def sentinels(tmp_path: Path) -> Any:
    """Two replicas: after a failover the new master still has one, so WAIT 1 stays satisfied."""
    group = SentinelSet(tmp_path, password=PASSWORD, replicas=2)
    yield group
    group.stop()


class Worker(threading.Thread):
    """Records 1 token per call, each call with its own request id, retrying a failed call (same id)
    until it is acknowledged, like a careful caller."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(daemon=True)
        self.budget = budget
        self.stop = threading.Event()
        self.acked: list[float] = []  # when each call was acknowledged
        self.failed: list[float] = []  # when each BackendError was raised (each call retried)
        self.duplicates = 0  # retries that found their first attempt charged (the reply was lost)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            while True:
                try:
                    record = self.budget.record(None, "m", 1, 0, request_id=f"call-{i}")
                    break
                except BackendError:
                    self.failed.append(time.monotonic())
                    time.sleep(0.02)
            self.duplicates += record.duplicate
            self.acked.append(time.monotonic())
            i += 1


def _settled_tokens(url: str) -> int:
    """The totals as a new client reads them from the new master (the Sentinel may still answer "no
    master" for a moment after the switch: a BackendError, retried)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            fresh = Budget(BudgetScope("fleet", max_tokens_per_day=10**9), RATES, redis=url, session_id="s")
            return int(fresh.summary()["day"]["tokens"])
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _failover(sentinels: SentinelSet, url: str) -> dict[str, Any]:
    budget = Budget(BudgetScope("fleet", max_tokens_per_day=10**9), RATES, redis=url, session_id="s")
    old_master = sentinels.master_port()
    worker = Worker(budget)
    worker.start()
    assert wait_for(lambda: len(worker.acked) >= 100)
    killed_at = time.monotonic()
    sentinels.kill_master()  # kill -9
    assert wait_for(lambda: sentinels.master_port() != old_master, timeout=30)
    assert wait_for(lambda: sum(t > killed_at for t in worker.acked) >= 100, timeout=30)
    worker.stop.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert sentinels.master_port() in {r.port for r in sentinels.replicas}
    first_failure = min(t for t in worker.failed if t > killed_at)
    recovered_after = min(t for t in worker.acked if t > first_failure) - killed_at
    tokens = _settled_tokens(url)
    return {
        "acked": len(worker.acked),
        "tokens": tokens,
        "failed": len(worker.failed),
        "duplicates": worker.duplicates,
        "recovered_s": round(recovered_after, 2),
    }


def test_failover_under_a_running_worker_with_wait(sentinels: SentinelSet) -> None:
    """``wait_replicas=1``: every acknowledged charge was on the replica when it was acknowledged,
    so the promoted replica holds every one of them: the totals are exact."""
    url = sentinels.url.replace(PASSWORD, "s3cret%2Fpw") + "?wait_replicas=1&wait_timeout_ms=500"
    assert parse(url).wait == (1, 500)
    got = _failover(sentinels, url)
    print(f"\nsentinel failover, wait_replicas=1: {got}")
    assert got["failed"] > 0  # the failover was seen
    assert got["tokens"] == got["acked"]  # nothing lost, nothing counted twice


def test_failover_under_a_running_worker_default(sentinels: SentinelSet) -> None:
    """Default (asynchronous replication): the loss bound is the charges acknowledged but not yet
    replicated when the master died; with one worker that is at most its last call."""
    url = sentinels.url.replace(PASSWORD, "s3cret%2Fpw")
    got = _failover(sentinels, url)
    print(f"\nsentinel failover, default: {got}")
    assert got["failed"] > 0
    assert got["acked"] - 1 <= got["tokens"] <= got["acked"]  # never counted twice


def test_wait_is_sent_with_each_charge_and_a_short_one_is_reported(
    sentinels: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    url = sentinels.url.replace(PASSWORD, "s3cret%2Fpw")
    admin = sentinels.master.client()
    admin.config_resetstat()
    scope = BudgetScope("waited", max_tokens_per_session=10**6)
    budget = Budget(scope, RATES, redis=url + "?wait_replicas=1", session_id="s")
    for _ in range(5):
        budget.record(None, "m", 1, 0)
    with budget.reserve("m", 1, 1) as hold:
        hold.commit(1, 1)
    waits = admin.info("commandstats")["cmdstat_wait"]["calls"]
    # 5 records, 1 reserve, 1 commit (Redis counts a WAIT that blocked once more when it unblocks)
    assert 7 <= waits <= 14
    budget.summary()
    assert admin.info("commandstats")["cmdstat_wait"]["calls"] == waits  # reads are never followed by WAIT
    assert budget.engine.under_replicated == 0
    totals = budget._core.keyspace.totals("waited")
    # what WAIT waited for: when the commit returned, a replica held everything the master did
    assert any(r.client().hgetall(totals) == admin.hgetall(totals) for r in sentinels.replicas)
    # three replicas asked for, two exist: WAIT gives up after its timeout, the charge stands
    strict = Budget(scope, RATES, redis=url + "?wait_replicas=3&wait_timeout_ms=50", session_id="s")
    with caplog.at_level(logging.WARNING, logger="distbudget"):
        strict.record(None, "m", 1, 0)
    assert strict.engine.under_replicated == 1
    assert re.search(r"only on [0-2] of 3 replicas after 50 ms", caplog.text)
    assert budget.summary()["session"]["tokens"] == 8


def test_async_and_script_flush_in_wait_mode(sentinels: SentinelSet) -> None:
    """The asyncio client over Sentinel, and SCRIPT FLUSH under the WAIT pipeline (sync and async):
    the script is loaded again, the charge lands once."""
    url = sentinels.url.replace(PASSWORD, "s3cret%2Fpw") + "?wait_replicas=1&wait_timeout_ms=2000"
    admin = sentinels.master.client()
    scope = BudgetScope("async-waited", max_tokens_per_session=10**6)
    budget = Budget(scope, RATES, redis=url, session_id="s")
    budget.record(None, "m", 1, 0)
    admin.script_flush()
    budget.record(None, "m", 1, 0)

    async def run() -> tuple[int, int]:
        ab = AsyncBudget(scope, RATES, redis=url, session_id="s")
        await ab.record(None, "m", 1, 0)
        admin.script_flush()
        await ab.record(None, "m", 1, 0)
        async with ab.reserve("m", 1, 1) as hold:
            admin.script_flush()
            await hold.commit(1, 1)
        return int((await ab.summary())["session"]["tokens"]), ab.engine.under_replicated

    assert asyncio.run(run()) == (6, 0)
    assert budget.engine.under_replicated == 0
    assert budget.summary()["session"]["tokens"] == 6
