"""Listeners that survive restarts: the resume pattern, consumer groups, gaps, dead letters.

Every test runs against a real redis-server (the suite's, as the minimal ACL user); the listeners
run in real threads, their callbacks are slow where that matters."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, ClassVar

import pytest
import redis

from distbudget import Budget, BudgetScope, DistBudgetError, ModelRates
from distbudget.alerts import FROM_START, AlertListener, AsyncAlertListener, WebhookSink
from tests.conftest import Cluster, RedisServer
from tests.test_alerts import wait_for

RATES = {"m": ModelRates(0.001, 0.002)}


def fire(url: str, names: list[str]) -> None:
    """Two alerts per name (WARNING at 85 %, CRITICAL at 115 %), each name its own scope tree."""
    client = redis.Redis.from_url(url)
    for name in names:
        budget = Budget(BudgetScope(name, max_tokens_per_session=100, hard_stop=False), RATES, redis=client)
        budget.record("s", "m", 85, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BudgetWarning: over the limit (hard_stop=False), as meant
            budget.record("s", "m", 30, 0)
    client.close()


def fired(client: Any) -> set[str]:
    """Every alert in the streams as "scope/id" (entry ids are unique per stream only)."""
    return {
        f"{json.loads(fields[b'alert'])['scope']}/{eid.decode()}"
        for stream in client.hvals("distbudget:alert-streams")
        for eid, fields in client.xrange(stream)
    }


def key(alert: Any) -> str:
    return f"{alert.scope}/{alert.alert_id}"


class Recorder:
    """A callback that takes ``delay`` seconds and notes each alert id; after ``closed`` is set (right
    after ``stop()`` returned) any call, or any call still running, is a violation."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.ids: list[str] = []
        self.violations: list[str] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, alert: Any) -> None:
        if self.closed.is_set():
            self.violations.append(key(alert))
        time.sleep(self.delay)  # a slow consumer (a webhook), not a timing assertion
        with self.lock:
            self.ids.append(key(alert))
        if self.closed.is_set():
            self.violations.append(key(alert))


# ---- the documented resume pattern: stop(); saved = last_ids; AlertListener(last_ids=saved) ----------


@pytest.mark.parametrize("mode", ["tail", "group"])
def test_resume_pattern_with_a_slow_callback_delivers_each_alert_once(redis_server: RedisServer, mode: str) -> None:
    redis_server.client().flushall()
    fire(redis_server.url, [f"resume-{i}" for i in range(50)])  # 100 alerts
    everything = fired(redis_server.client())
    assert len(everything) == 100
    delivered: list[str] = []
    violations: list[str] = []
    saved: dict[str, str] = {}
    for target in (20, 45, 75, 100):  # stopped three times mid-stream, resumed each time
        recorder = Recorder(delay=0.05)
        if mode == "tail":
            listener = AlertListener(redis=redis_server.url, last_ids=saved, block_ms=100)
        else:  # a new member each time: the stopped one handed back what it read and did not deliver
            listener = AlertListener(redis=redis_server.url, block_ms=100, group="resume")
        listener.start(recorder)
        assert wait_for(lambda: len(delivered) + len(recorder.ids) >= target, timeout=60)
        listener.stop()
        recorder.closed.set()
        saved = dict(listener.last_ids)
        delivered += recorder.ids
        violations += recorder.violations
    assert violations == []  # no callback ran after stop() returned
    assert len(delivered) == len(set(delivered)) == 100  # none twice, none lost
    assert set(delivered) == everything


def test_async_group_resumes_after_aclose(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    fire(redis_server.url, [f"aresume-{i}" for i in range(20)])  # 40 alerts

    async def main() -> tuple[list[str], list[str]]:
        delivered: list[str] = []
        late: list[str] = []
        for target in (15, 40):
            closed = False
            listener = AsyncAlertListener(redis=redis_server.url, block_ms=100, group="a")

            async def slow(alert: Any) -> None:
                await asyncio.sleep(0.02)
                delivered.append(key(alert))
                if closed:
                    late.append(key(alert))

            task = asyncio.create_task(listener.run(slow))
            while len(delivered) < target:
                await asyncio.sleep(0.02)
            await listener.aclose()
            closed = True
            await asyncio.wait_for(task, 30)
        return delivered, late

    delivered, late = asyncio.run(main())
    assert late == []
    assert len(delivered) == len(set(delivered)) == 40
    assert set(delivered) == fired(redis_server.client())


# ---- groups: the members share the work, each group hears each alert once --------------------------


def test_members_share_a_group_and_each_group_hears_every_alert_once(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    fire(redis_server.url, [f"shared-{i}" for i in range(30)])  # 60 alerts, before anyone listens
    members = [Recorder(delay=0.02), Recorder(delay=0.02)]
    other = Recorder()
    listeners = [AlertListener(redis=redis_server.url, block_ms=100, group="pager").start(r) for r in members]
    listeners.append(AlertListener(redis=redis_server.url, block_ms=100, group="audit").start(other))
    try:
        assert wait_for(lambda: sum(len(r.ids) for r in members) >= 60 and len(other.ids) >= 60)
        fire(redis_server.url, ["shared-late"])  # live, too
        assert wait_for(lambda: sum(len(r.ids) for r in members) >= 62 and len(other.ids) >= 62)
    finally:
        for listener in listeners:
            listener.stop()
    everything = fired(redis_server.client())
    pager = members[0].ids + members[1].ids
    assert len(pager) == len(set(pager)) == 62 and set(pager) == everything
    assert all(r.ids for r in members)  # both members took a share
    assert len(other.ids) == len(set(other.ids)) == 62 and set(other.ids) == everything


def test_a_group_starts_new_only_when_asked(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    fire(redis_server.url, ["old-news"])
    heard = Recorder()
    listener = AlertListener(redis=redis_server.url, block_ms=100, group="fresh", from_start=False).start(heard)
    try:
        time.sleep(0.3)  # its first look happens (nothing to assert on: it must hear nothing old)
        fire(redis_server.url, ["news"])
        assert wait_for(lambda: len(heard.ids) == 2)
    finally:
        listener.stop()
    client = redis_server.client()
    news = client.hget("distbudget:alert-streams", "news")
    assert set(heard.ids) == {f"news/{eid.decode()}" for eid, _ in client.xrange(news)}


def test_bad_listener_options_are_refused(redis_server: RedisServer) -> None:
    for kwargs in ({"group": ""}, {"group": "g", "last_ids": {"s": "1-0"}}, {"max_deliveries": 0}):
        with pytest.raises(DistBudgetError):
            AlertListener(redis=redis_server.url, **kwargs)


# ---- gaps: a listener down longer than the stream keeps says how many alerts it missed ----------------


def overflow(client: Any, stream: bytes, count: int, keep: int) -> None:
    """``count`` more alerts on ``stream`` (copies of its newest), trimmed to the newest ``keep``:
    what the tree's stream does after ~10,000 alerts, made small."""
    ((_, fields),) = client.xrevrange(stream, count=1)
    pipe = client.pipeline(transaction=False)
    for _ in range(count):
        pipe.xadd(stream, fields, maxlen=keep, approximate=False)
    pipe.execute()


def test_a_group_down_longer_than_the_stream_keeps_reports_the_gap(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_server.client()
    client.flushall()
    fire(redis_server.url, [f"gap-{i}" for i in range(5)] + ["gap-big"])  # 12 alerts, 2 in gap-big's stream
    big = client.hget("distbudget:alert-streams", "gap-big")
    gaps: list[int | None] = []
    heard = Recorder()

    def member() -> AlertListener:
        return AlertListener(redis=redis_server.url, block_ms=100, group="g", on_gap=gaps.append).start(heard)

    listener = member()
    assert wait_for(lambda: len(heard.ids) == 12)
    listener.stop()
    overflow(client, big, 300, keep=50)  # while the group is down: 250 of them dropped unread
    with caplog.at_level(logging.WARNING, logger="distbudget.alerts"):
        listener = member()
        assert wait_for(lambda: len(heard.ids) == 62)
        listener.stop()
    assert gaps == [250]
    assert any("skipped 250 alerts" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    overflow(client, big, 100, keep=50)  # down again: 50 more dropped; the first gap is not counted again
    listener = member()
    assert wait_for(lambda: len(heard.ids) == 112 and len(gaps) == 2)
    listener.stop()
    assert gaps == [250, 50]
    assert len(heard.ids) == len(set(heard.ids))


def test_a_tail_that_falls_behind_reports_the_gap(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    fire(redis_server.url, [f"tail-gap-{i}" for i in range(5)])  # 10 alerts, 2 per stream
    stream = client.hget("distbudget:alert-streams", "tail-gap-0")
    gaps: list[int | None] = []
    alerts = iter(AlertListener(redis=redis_server.url, block_ms=100, on_gap=gaps.append))
    seen = [next(alerts).alert_id for _ in range(10)]
    overflow(client, stream, 300, keep=50)  # while its callback (the loop body) is busy
    seen += [next(alerts).alert_id for _ in range(50)]
    assert gaps == [250]
    # a tail resumed from saved ids after its position was trimmed: it knows, but cannot count
    resumed_gaps: list[int | None] = []
    saved = {stream.decode(): seen[-1]}
    overflow(client, stream, 100, keep=50)
    resumed = iter(AlertListener(redis=redis_server.url, last_ids=saved, block_ms=100, on_gap=resumed_gaps.append))
    next(resumed)
    assert resumed_gaps == [None]


# ---- a webhook that fails: retried with backoff, then dead-lettered --------------------------------


class _FlakyHook(http.server.BaseHTTPRequestHandler):
    posts: ClassVar[dict[str, int]] = {}  # "scope/id" -> POSTs received
    fail_first: ClassVar[int] = 2  # each scope's first N POSTs fail; scope "doomed" always fails
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _FlakyHook.lock:
            alert = f"{body['scope']}/{body['id']}"
            n = _FlakyHook.posts[alert] = _FlakyHook.posts.get(alert, 0) + 1
        ok = n > _FlakyHook.fail_first and body["scope"] != "doomed"
        self.send_response(204 if ok else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_failures_stay_pending_then_go_to_the_dead_letter_stream(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_server.client()
    client.flushall()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FlakyHook.posts = {}
    sink = WebhookSink(f"http://127.0.0.1:{server.server_address[1]}/hook", retries=0)
    listener = AlertListener(redis=redis_server.url, block_ms=100, group="hooks", max_deliveries=4, retry_ms=50)
    with caplog.at_level(logging.ERROR, logger="distbudget.alerts"):
        listener.start(sink)
        try:
            fire(redis_server.url, ["flaky", "doomed"])
            doomed = client.hget("distbudget:alert-streams", "doomed")
            dead_key = doomed + b":dead:hooks"
            assert wait_for(lambda: client.xlen(dead_key) == 2 if client.exists(dead_key) else False)
            flaky = client.hget("distbudget:alert-streams", "flaky")
            assert wait_for(lambda: client.xpending(flaky, "hooks")["pending"] == 0)
        finally:
            listener.stop()
            server.shutdown()
    flaky_ids = [eid.decode() for eid, _ in client.xrange(flaky)]
    doomed_ids = [eid.decode() for eid, _ in client.xrange(doomed)]
    assert [_FlakyHook.posts[f"flaky/{i}"] for i in flaky_ids] == [3, 3]  # two failures, then delivered once
    assert [_FlakyHook.posts[f"doomed/{i}"] for i in doomed_ids] == [4, 4]  # max_deliveries tries, then dead
    dead = client.xrange(dead_key)
    assert [f[b"id"].decode() for _, f in dead] == doomed_ids
    assert all(json.loads(f[b"alert"])["scope"] == "doomed" and f[b"deliveries"] == b"4" for _, f in dead)
    assert client.xpending(doomed, "hooks")["pending"] == 0
    assert sum("moved to" in r.getMessage() for r in caplog.records) == 2


# ---- Redis Cluster: a group spans every shard, read slot by slot -----------------------------------


def test_groups_on_a_cluster_sync_and_async(redis_cluster: Cluster) -> None:
    redis_cluster.flushall()
    url = redis_cluster.user_url
    names = [f"cl-group-{i}" for i in range(9)]
    for node in redis_cluster.nodes:
        node.client().config_resetstat()

    def cross(batch: list[str]) -> None:
        for name in batch:
            budget = Budget(BudgetScope(name, max_tokens_per_session=100, hard_stop=False), RATES, redis=url)
            budget.record("s", "m", 85, 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                budget.record("s", "m", 30, 0)

    cross(names[:5])
    heard = Recorder()
    listener = AlertListener(redis=url, block_ms=100, group="ops", claim_idle_ms=300).start(heard)
    assert wait_for(lambda: len(heard.ids) == 10)
    listener.stop()
    cross(names[5:])  # while the group has no member
    heard_async: list[str] = []

    async def member() -> None:
        alisten = AsyncAlertListener(redis=url, block_ms=100, group="ops", claim_idle_ms=300)

        async def note(alert: Any) -> None:
            heard_async.append(key(alert))
            if len(heard_async) == 8:
                await alisten.aclose()

        await asyncio.wait_for(alisten.run(note), 60)

    asyncio.run(member())
    admin = redis_cluster.client()
    everything = {
        f"{json.loads(fields[b'alert'])['scope']}/{eid.decode()}"
        for stream in admin.hvals("distbudget:alert-streams")
        for eid, fields in admin.xrange(stream)
    }
    both = heard.ids + heard_async
    assert len(both) == len(set(both)) == 18 and set(both) == everything
    for node in redis_cluster.nodes:  # each command went straight to its node: no COMMAND GETKEYS first
        stats = node.client().info("commandstats")
        assert "cmdstat_command|getkeys" not in stats
        assert stats.get("cmdstat_xreadgroup", {}).get("calls", 0) > 0


def test_the_stream_cap_is_a_budget_option_and_a_group_counts_what_it_dropped(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    org = BudgetScope("capped-org")

    def cross(first: int, last: int) -> None:  # children of one tree: their alerts share its stream
        user = redis.Redis.from_url(redis_server.url)
        for i in range(first, last):
            scope = BudgetScope(f"capped-{i}", parent=org, max_tokens_per_session=100, hard_stop=False)
            budget = Budget(scope, RATES, redis=user, alert_stream_maxlen=10)
            budget.record("s", "m", 85, 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                budget.record("s", "m", 30, 0)
        user.close()

    gaps: list[int | None] = []
    heard = Recorder()
    cross(0, 1)
    listener = AlertListener(redis=redis_server.url, block_ms=100, group="g", on_gap=gaps.append).start(heard)
    assert wait_for(lambda: len(heard.ids) == 2)
    listener.stop()
    cross(1, 150)  # 298 more alerts while no member runs
    stream = client.hget("distbudget:alert-streams", "capped-0")
    info = client.xinfo_stream(stream)
    assert info["entries-added"] == 300 and info["length"] < 200  # capped (MAXLEN ~ 10: whole 100-entry nodes)
    listener = AlertListener(redis=redis_server.url, block_ms=100, group="g", on_gap=gaps.append).start(heard)
    assert wait_for(lambda: len(heard.ids) == 2 + info["length"])
    listener.stop()
    assert gaps == [300 - info["length"] - 2]
    with pytest.raises(DistBudgetError):
        Budget(org, RATES, alert_stream_maxlen=0)


@pytest.mark.parametrize("group", [None, "g"])
def test_an_entry_that_is_not_an_alert_is_passed_over(redis_server: RedisServer, group: str | None) -> None:
    client = redis_server.client()
    client.flushall()
    fire(redis_server.url, ["junk"])
    stream = client.hget("distbudget:alert-streams", "junk")
    client.xadd(stream, {"alert": "not json"})
    client.xadd(stream, {"other": "field"})
    fire(redis_server.url, ["after-junk"])
    heard = Recorder()
    listener = AlertListener(redis=redis_server.url, block_ms=100, group=group).start(heard)
    try:
        assert wait_for(lambda: len(heard.ids) == 4)
    finally:
        listener.stop()
    assert {i.split("/")[0] for i in heard.ids} == {"junk", "after-junk"}
    if group:
        assert client.xpending(stream, group)["pending"] == 0


# ---- distbudget watch agrees with the Python API ----------------------------------------------------


def watch(url: str, *args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "distbudget.cli", "watch", "--redis", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line.split()[0] for line in out.stdout.splitlines()]


def test_watch_starts_where_the_api_does_and_resumes_a_group(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    fire(redis_server.url, ["watched"])  # two alerts, before any listener
    stream = client.hget("distbudget:alert-streams", "watched")
    ids = [eid.decode() for eid, _ in client.xrange(stream)]
    assert FROM_START  # the one default: replay what the streams hold
    assert watch(redis_server.url, "--count", "2") == ids  # as AlertListener() does
    assert watch(redis_server.url, "--group", "cli", "--count", "1") == ids[:1]
    assert watch(redis_server.url, "--group", "cli", "--count", "1") == ids[1:]  # where the group left off
    assert client.xpending(stream, "cli")["pending"] == 0  # the last one printed was acknowledged
