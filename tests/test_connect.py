"""Connecting: every URL form, timeouts (no call hangs when Redis is unreachable, blackholed or killed)
and the retry policy (a command whose reply was lost is never sent again by the client)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from distbudget import AsyncBudget, BackendError, Budget, BudgetScope, ModelRates
from distbudget.engines import connect as C
from tests._servers import RedisServer, free_port

RATES = {"m": ModelRates(0.001, 0.002)}
SCOPE = BudgetScope("conn", max_tokens_per_session=10**6)


# ---- URL forms ----------------------------------------------------------------------------------


def test_standalone_urls_keep_redis_py_semantics() -> None:
    t = C.parse("rediss://user:p%40ss@cache.internal:6380/2?ssl_cert_reqs=required&wait_replicas=1")
    assert t.kind == "standalone" and t.wait == (1, C.DEFAULT_WAIT_TIMEOUT_MS)
    assert "wait_replicas" not in t.url and "ssl_cert_reqs=required" in t.url  # ours stripped, theirs kept
    client = C.connect(t.url)
    kw = client.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["username"], kw["password"]) == (
        "cache.internal",
        6380,
        2,
        "user",
        "p@ss",
    )
    assert kw["socket_timeout"] == kw["socket_connect_timeout"] == 5.0
    assert C.parse("unix:///run/redis.sock?db=1").kind == "standalone"


def test_cluster_urls() -> None:
    t = C.parse("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,node4")
    assert t.kind == "cluster"
    assert t.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002), ("node4", 6379))
    assert (t.kwargs["username"], t.kwargs["password"]) == ("u", "pw")
    tls = C.parse("rediss+cluster://h:7000/?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    assert tls.kwargs["ssl"] is True and tls.kwargs["ssl_ca_certs"] == "/ca.pem"
    with pytest.raises(ValueError, match="database 0"):
        C.parse("redis+cluster://h:7000/3")
    with pytest.raises(ValueError, match="wait_replicas"):
        C.parse("redis+cluster://h:7000?wait_replicas=1")


def test_sentinel_urls() -> None:
    t = C.parse("redis+sentinel://:pw@s1:26379,s2/mymaster/3?sentinel_password=spw&wait_replicas=2&wait_timeout_ms=50")
    assert t.kind == "sentinel" and t.service == "mymaster" and t.db == 3
    assert t.hosts == (("s1", 26379), ("s2", 26379))
    assert t.kwargs["password"] == "pw" and t.sentinel_kwargs["password"] == "spw"
    assert t.wait == (2, 50)
    assert C.parse("redis+sentinel://s1/mymaster").db == 0
    for bad in ("redis+sentinel://s1", "redis+sentinel://s1/a/b/c", "redis+sentinel://s1/m/x"):
        with pytest.raises(ValueError):
            C.parse(bad)


def test_bad_urls_are_refused_without_echoing_the_password() -> None:
    for bad in (
        "http://h",
        "redis+nope://h",
        "h:6379",
        "redis+cluster://:topsecret@h:x",
        "redis+cluster://:topsecret@",
    ):
        with pytest.raises(ValueError) as info:
            C.parse(bad)
        assert "topsecret" not in str(info.value)
    with pytest.raises(ValueError, match="wait_replicas"):
        C.parse("redis://h?wait_replicas=-1")
    with pytest.raises(ValueError, match="unsupported Redis URL scheme"):
        Budget(SCOPE, RATES, redis="mysql://h")


# ---- no call hangs ------------------------------------------------------------------------------


def _returns_backend_error(call: Any) -> tuple[bool, BaseException | None, float]:
    """Run ``call`` in a thread: (finished within 30 s, what it raised, seconds it took)."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    return not thread.is_alive(), out[0] if out else None, time.monotonic() - start


def _sync_and_async(url: str) -> list[tuple[bool, BaseException | None, float]]:
    """A sync and an async budget, each recording once against ``url``, at the same time."""
    results: list[Any] = [None, None]

    def sync() -> None:
        results[0] = _returns_backend_error(lambda: Budget(SCOPE, RATES, redis=url).record("s", "m", 1, 1))

    def run_async() -> None:
        async def go() -> None:
            await AsyncBudget(SCOPE, RATES, redis=url).record("s", "m", 1, 1)

        results[1] = _returns_backend_error(lambda: asyncio.run(go()))

    threads = [threading.Thread(target=sync), threading.Thread(target=run_async)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_closed_port_returns_backend_error() -> None:
    for finished, exc, _ in _sync_and_async(f"redis://127.0.0.1:{free_port()}/0"):
        assert finished and isinstance(exc, BackendError)


def test_blackholed_server_returns_backend_error() -> None:
    """A peer that accepts the TCP connection and never answers (a hung server, a blackholing
    proxy): the 5 s socket timeout ends each call."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
    try:
        results = _sync_and_async(f"redis://127.0.0.1:{hole.getsockname()[1]}/0")
    finally:
        hole.close()
    for finished, exc, _ in results:
        assert finished and isinstance(exc, BackendError)
        assert isinstance(exc.__cause__, redis.TimeoutError)


def test_killed_server_returns_backend_error_then_a_restart_just_works(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    try:
        budget = Budget(SCOPE, RATES, redis=server.url, session_id="s")
        budget.record(None, "m", 1, 0)
        server.stop()  # kill -9: the pooled connection is now dead
        finished, exc, _ = _returns_backend_error(lambda: budget.record(None, "m", 1, 0))
        assert finished and isinstance(exc, BackendError)
        server.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 10
        while True:  # the budget may hold off Redis for a moment after a failure
            try:
                budget.record(None, "m", 1, 0)
                break
            except BackendError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert budget.summary()["session"]["requests"] >= 1
    finally:
        server.stop()


# ---- a lost reply is never re-sent ------------------------------------------------------------------


def _count_runs(server: RedisServer, client: Any, key: str) -> tuple[bool, int]:
    """Block the server for 1.5 s (DEBUG SLEEP); meanwhile ``client`` calls once a script that
    increments ``key``, with a 0.3 s reply timeout. (Whether the call raised, how many times the
    script ran in the end.)"""
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    script(keys=[key])  # loaded, connection warm
    server.client().delete(key)
    sleeper = threading.Thread(target=lambda: server.client().execute_command("DEBUG", "SLEEP", "1.5"))
    sleeper.start()
    time.sleep(0.2)  # the server is asleep: what we send now waits in its socket
    try:
        script(keys=[key])
        raised = False
    except redis.TimeoutError:
        raised = True
    sleeper.join()
    time.sleep(0.3)  # the server has run whatever was sent
    return raised, int(server.client().get(key) or 0)


def test_a_lost_reply_is_never_sent_again(tmp_path: Path) -> None:
    """redis-py's own default (10 retries) sends a script again after a reply timed out: the script
    then runs twice. distbudget's clients never do; a caller retries with a request id instead."""
    server = RedisServer(tmp_path, "--enable-debug-command", "yes")
    try:
        ours = C.connect(server.url + "?socket_timeout=0.3")
        assert _count_runs(server, ours, "ours") == (True, 1)  # the caller hears of it; it ran once
        theirs = redis.Redis(port=server.port, socket_timeout=0.3)  # redis-py's defaults
        raised, runs = _count_runs(server, theirs, "theirs")
        assert not raised and runs > 1  # what the policy prevents: one call, several charges
    finally:
        server.stop()


def test_a_ready_client_that_retries_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    """redis-py's default client re-sends a command after a connection error (a lost reply would be
    charged twice): distbudget says so, once per client; URL clients and no-retry clients are quiet."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    port = free_port()  # nothing listens: constructing a budget sends nothing
    default = redis.Redis(port=port)
    with caplog.at_level("WARNING", logger="distbudget"):
        Budget(SCOPE, RATES, redis=default)
        Budget(SCOPE, RATES, redis=default)
        AsyncBudget(SCOPE, RATES, redis=redis.asyncio.Redis(port=port))
        Budget(SCOPE, RATES, redis=redis.Redis(port=port, retry=Retry(NoBackoff(), 0)))
        Budget(SCOPE, RATES, redis=f"redis://127.0.0.1:{port}/0")
    warned = [r for r in caplog.records if "re-sends a command" in r.getMessage()]
    assert len(warned) == 2  # the default sync client once, the default asyncio client once
