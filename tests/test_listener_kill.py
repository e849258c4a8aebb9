"""The headline of issue 14: a listener group whose member is killed (``kill -9``, a real process)
and replaced mid-stream while 8 worker processes cross thresholds. Every alert reaches the group's
callback exactly once: fired, delivered, duplicated and lost are counted."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from distbudget import Budget, BudgetExceededError, BudgetScope, ModelRates
from distbudget.alerts import AlertListener
from tests._procs import context
from tests.conftest import RedisServer
from tests.test_alerts import wait_for
from tests.test_listener_groups import fired

RATES = {"m": ModelRates(0.001, 0.002)}
SCOPES = [f"fleet-{i}" for i in range(40)]
GROUP = "forwarder"


def _member(url: str, path: str, hang_after: int) -> None:
    """A member of the group: each alert's callback appends "scope/id" to ``path``. With
    ``hang_after``, the callback after that many hangs before writing (a stuck webhook) and the
    process is killed there."""
    written = 0

    def forward(alert: Any) -> None:
        nonlocal written
        if hang_after and written == hang_after:
            time.sleep(3600)
        time.sleep(0.005)  # the forwarding itself
        with open(path, "a") as f:
            f.write(f"{alert.scope}/{alert.alert_id}\n")
        written += 1

    AlertListener(redis=url, group=GROUP, block_ms=100, claim_idle_ms=1000, retry_ms=100).start(forward)
    while True:
        time.sleep(1)


def _worker(url: str, go: Any) -> None:
    budgets = [
        Budget(BudgetScope(name, max_tokens_per_session=800, alert_thresholds=[0.2, 0.4, 0.6]), RATES, redis=url)
        for name in SCOPES
    ]
    go.wait()
    for _ in range(6):
        for budget in budgets:
            with contextlib.suppress(BudgetExceededError):
                budget.record("s", "m", 25, 0)
            time.sleep(0.002)


def lines(paths: list[Path]) -> list[str]:
    return [line for p in paths if p.exists() for line in p.read_text().split()]


def test_group_member_killed_mid_stream_every_alert_once(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client()
    client.flushall()
    for name in SCOPES:  # register the trees' streams, so the group exists on each before the first alert
        Budget(BudgetScope(name, max_tokens_per_session=800), RATES, redis=redis_server.url)
    ctx = context()
    paths = [tmp_path / f"member-{i}.txt" for i in range(3)]
    members = [
        ctx.Process(target=_member, args=(redis_server.url, str(paths[0]), 15), daemon=True),  # the one killed
        ctx.Process(target=_member, args=(redis_server.url, str(paths[1]), 0), daemon=True),
    ]
    for p in members:
        p.start()
    everyone = list(members)
    try:
        go = ctx.Event()
        workers = [ctx.Process(target=_worker, args=(redis_server.url, go), daemon=True) for _ in range(8)]
        everyone += workers
        for p in workers:
            p.start()
        go.set()
        assert wait_for(lambda: len(lines(paths[:1])) == 15, timeout=120)
        assert any(p.is_alive() for p in workers)  # mid-stream: the fleet is still crossing thresholds
        os.kill(members[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
        members[0].join()
        replacement = ctx.Process(target=_member, args=(redis_server.url, str(paths[2]), 0), daemon=True)
        replacement.start()
        everyone.append(replacement)
        for p in workers:
            p.join(timeout=120)
            assert p.exitcode == 0
        expected = fired(client)
        streams = client.hvals("distbudget:alert-streams")

        def settled() -> bool:  # every alert read by the group and acknowledged: nothing left to deliver
            for stream in streams:
                (group,) = client.xinfo_groups(stream)
                if group["pending"] or group["lag"]:
                    return False
            return len(set(lines(paths))) >= len(expected)

        assert wait_for(settled, timeout=120)
    finally:
        for p in everyone:
            p.kill()
            p.join()
    delivered = lines(paths)
    figures = {
        "fired": len(expected),
        "delivered": len(delivered),
        "duplicated": len(delivered) - len(set(delivered)),
        "lost": len(expected - set(delivered)),
    }
    print(f"\nkill -9 mid-stream, 8 workers, group of 2 (+1 replacement): {figures}")
    assert figures["fired"] == len(SCOPES) * 5  # INFO x3, WARNING, CRITICAL per scope
    assert figures == {**figures, "delivered": figures["fired"], "duplicated": 0, "lost": 0}
    assert set(delivered) == expected
    assert lines(paths[1:])  # the survivor and the replacement took over the killed member's share
