"""Alerts that reach the whole fleet exactly once: the atomic step appends each crossing to a
durable stream and publishes it; listeners replay what they missed."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from distbudget import AlertLevel, Budget, BudgetExceededError, BudgetScope, ModelRates
from distbudget.alerts import AlertListener, AsyncAlertListener, WebhookSink
from tests._procs import context
from tests.conftest import RedisServer

RATES = {"m": ModelRates(0.001, 0.002)}


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    """Poll a condition the system under test will make true (bounded; not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def stream_ids(client: Any, prefix: str) -> set[str]:
    """Every alert the streams hold, as "scope/id" (an entry id is unique within its stream only)."""
    ids = set()
    for stream in client.hvals(f"{prefix}:alert-streams"):
        ids |= {f"{json.loads(f[b'alert'])['scope']}/{eid.decode()}" for eid, f in client.xrange(stream)}
    return ids


def key(alert: Any) -> str:
    return f"{alert.scope}/{alert.alert_id}"


# ---- the atomic step fans out ------------------------------------------------------------------


def test_crossing_is_streamed_and_published_in_the_same_step(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    pubsub = client.pubsub()
    pubsub.subscribe("distbudget:alerts", "distbudget:alerts:team%20%7Ba%7D")
    pubsub.get_message(timeout=1)
    pubsub.get_message(timeout=1)
    budget = Budget(BudgetScope("team {a}", max_tokens_per_session=100), RATES, redis=client, session_id="s")
    local: list[Any] = []
    budget.on_alert(local.append)
    budget.record(None, "m", 85, 0)
    messages = [pubsub.get_message(timeout=2) for _ in range(2)]
    payloads = [json.loads(m["data"]) for m in messages if m]
    assert {m["channel"] for m in messages if m} == {b"distbudget:alerts", b"distbudget:alerts:team%20%7Ba%7D"}
    assert all(p["level"] == "warning" and p["scope"] == "team {a}" for p in payloads)
    assert all(p["limit_type"] == "session_tokens" and p["used"] == "85" and p["limit"] == "100" for p in payloads)
    assert all(p["pct"] == 0.85 and p["ts_us"].isdigit() and p["model"] == "m" for p in payloads)
    ((entry_id, fields),) = client.xrange(client.hget("distbudget:alert-streams", "team {a}"))
    assert payloads[0]["id"] == entry_id.decode() == local[0].alert_id
    assert json.loads(fields[b"alert"])["session_id"] == "s"
    pubsub.close()


# ---- 8 workers cross together; two listeners each hear each crossing once -----------------------


def _listener_proc(url: str, out: Any, ready: Any) -> None:
    listener = AlertListener(redis=url, scopes=["shared"], block_ms=200)
    ready.set()
    for alert in listener:
        out.put((alert.level.value, alert.limit_type, key(alert)))


def _crossing_worker(url: str, go: Any) -> None:
    budget = Budget(
        BudgetScope("shared", max_tokens_per_session=8000, alert_at_pct=0.8), RATES, redis=url, session_id="s"
    )
    go.wait()
    for _ in range(30):
        try:
            budget.record(None, "m", 100, 0)
        except BudgetExceededError:
            return


def test_eight_workers_cross_together_two_listeners_hear_each_crossing_once(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    Budget(BudgetScope("shared", max_tokens_per_session=8000), RATES, redis=redis_server.url)  # registers the stream
    ctx = context()
    outs = [ctx.Queue(), ctx.Queue()]
    readies = [ctx.Event(), ctx.Event()]
    listeners = [ctx.Process(target=_listener_proc, args=(redis_server.url, outs[i], readies[i])) for i in range(2)]
    for p in listeners:
        p.start()
    for r in readies:
        assert r.wait(60)
    go = ctx.Event()
    workers = [ctx.Process(target=_crossing_worker, args=(redis_server.url, go)) for _ in range(8)]
    for p in workers:
        p.start()
    time.sleep(0.5)  # let every worker reach the start line (correctness does not depend on it)
    go.set()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    heard: list[list[tuple[str, str, str]]] = []
    for out in outs:
        got = [out.get(timeout=30), out.get(timeout=30)]
        with contextlib.suppress(queue.Empty):
            got.append(out.get(timeout=1.0))  # a third would be a duplicate
        heard.append(got)
    for p in listeners:
        p.kill()
        p.join()
    expected = [("critical", "session_tokens"), ("warning", "session_tokens")]
    for got in heard:
        assert sorted((lvl, lt) for lvl, lt, _ in got) == expected
    assert {i for _, _, i in heard[0]} == {i for _, _, i in heard[1]} == stream_ids(redis_server.client(), "distbudget")


# ---- a listener killed mid-run resumes from its last id ----------------------------------------


def _recording_listener(url: str, path: str, last: dict[str, str]) -> None:
    listener = AlertListener(redis=url, last_ids=last, block_ms=200)
    with open(path, "a") as f:
        for alert in listener:
            f.write(f"{key(alert)}\n")
            f.flush()


def _cross(url: str, names: list[str]) -> None:
    for name in names:
        b = Budget(BudgetScope(name, max_tokens_per_session=100), RATES, redis=url, session_id="s")
        b.record(None, "m", 85, 0)  # WARNING
        with pytest.raises(BudgetExceededError):
            b.record(None, "m", 30, 0)  # CRITICAL


def test_killed_listener_restarts_from_last_id_without_gaps_or_duplicates(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    client = redis_server.client()
    client.flushall()
    path = tmp_path / "ids.txt"
    ctx = context()
    proc = ctx.Process(target=_recording_listener, args=(redis_server.url, str(path), {}))
    proc.start()
    _cross(redis_server.url, [f"a{i}" for i in range(10)])
    assert wait_for(lambda: path.exists() and len(path.read_text().split()) == 20)
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
    proc.join()
    _cross(redis_server.url, [f"b{i}" for i in range(10)])  # while the listener is down
    seen = path.read_text().split()
    streams = {s.decode(): s for s in client.hvals("distbudget:alert-streams")}
    last = {}
    for stream in streams:
        entries = client.xrange(stream)
        ids = [eid.decode() for eid, f in entries if f"{json.loads(f[b'alert'])['scope']}/{eid.decode()}" in seen]
        if ids:
            last[stream] = ids[-1]
    proc = ctx.Process(target=_recording_listener, args=(redis_server.url, str(path), last))
    proc.start()
    _cross(redis_server.url, [f"c{i}" for i in range(5)])
    assert wait_for(lambda: len(path.read_text().split()) >= 50)
    time.sleep(0.5)  # give a duplicate the chance to show up
    proc.kill()
    proc.join()
    ids = path.read_text().split()
    assert len(ids) == len(set(ids)) == 50
    assert set(ids) == stream_ids(client, "distbudget")


# ---- the Redis server restarts under a listener ------------------------------------------------


def test_listener_survives_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        got: list[str] = []
        listener = AlertListener(redis=server.url, block_ms=200).start(lambda a: got.append(key(a)))
        _cross(server.url, ["before"])
        assert wait_for(lambda: len(got) == 2)
        server.stop()
        time.sleep(0.3)  # the listener sees the connection drop and backs off
        server.start()
        _cross(server.url, ["after"])
        assert wait_for(lambda: len(got) == 4)
        listener.stop()
        assert len(set(got)) == 4 and set(got) == stream_ids(server.client(), "distbudget")
    finally:
        server.stop()


def test_async_listener(redis_server: RedisServer) -> None:
    import asyncio

    redis_server.client().flushall()

    async def main() -> list[str]:
        listener = AsyncAlertListener(redis=redis_server.url, block_ms=100)
        heard: list[str] = []

        async def consume() -> None:
            async for alert in listener:
                heard.append(alert.level.value)
                if len(heard) == 2:
                    listener.stop()

        task = asyncio.create_task(consume())
        await asyncio.to_thread(_cross, redis_server.url, ["async"])
        await asyncio.wait_for(task, 30)
        return heard

    assert asyncio.run(main()) == [AlertLevel.WARNING.value, AlertLevel.CRITICAL.value]


# ---- webhook sink ------------------------------------------------------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, Any]]] = []
    fail_next: ClassVar[int] = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Hook.fail_next:
            _Hook.fail_next -= 1
            self.send_response(500)
        else:
            _Hook.bodies.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_receives_alerts_with_retries(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    _Hook.bodies, _Hook.fail_next = [], 1  # the first POST fails: the sink retries
    listener = AlertListener(redis=redis_server.url, block_ms=200).start(WebhookSink(url, backoff=0.01))
    slack = WebhookSink(url, slack=True, backoff=0.01)
    try:
        _cross(redis_server.url, ["hooked"])
        assert wait_for(lambda: len(_Hook.bodies) == 2)
        assert [b["level"] for b in _Hook.bodies] == ["warning", "critical"]
        assert all(b["scope"] == "hooked" and b["limit_type"] == "session_tokens" for b in _Hook.bodies)
        assert _Hook.bodies[0]["used"] == 85 and _Hook.bodies[0]["limit"] == 100
        budget = Budget(BudgetScope("hooked2", max_tokens_per_session=10), RATES, redis=redis_server.url)
        budget.on_alert(slack)
        budget.record("s", "m", 9, 0)
        assert wait_for(lambda: any("text" in b for b in _Hook.bodies))
        assert "[WARNING]" in next(b["text"] for b in _Hook.bodies if "text" in b)
    finally:
        listener.stop()
        server.shutdown()


def test_extra_threshold_reaches_listeners_as_info(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    budget = Budget(
        BudgetScope("info", max_cost_per_session_usd=1, alert_thresholds=[0.5]),
        RATES,
        redis=redis_server.url,
        session_id="s",
    )
    budget.record(None, "m", 600_000, 0)  # $0.60: INFO at 50 %
    listener = AlertListener(redis=redis_server.url)
    alert = next(iter(listener))
    assert (alert.level, alert.limit_type, alert.limit, alert.used) == (AlertLevel.INFO, "session_cost_usd", 1.0, 0.6)
    assert alert.alert_id == budget.alerts[0].alert_id
