"""Shared fixtures: a real redis-server started by the tests on a free port, and one ``backend``
fixture that runs each behavioural test on every engine: embedded, fakeredis (our real Lua run by
lupa) and real Redis."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from distbudget import AsyncBudget, AsyncBudgetManager, Budget, BudgetManager, BudgetScope
from distbudget.budget import PendingReservation
from distbudget.engines.memory import AsyncMemoryEngine, MemoryEngine

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process of our own (killed at the end), so tests never touch shared state."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.dir = tmp
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, **kw)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


class Clock:
    """An injected clock (seconds). Time is moved by tests, never slept on."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class LoopThread:
    """An event loop in a thread, so one synchronous test body can drive the asyncio API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, awaitable: Any) -> Any:
        async def wrapper() -> Any:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout=120)

    def wrap(self, value: Any) -> Any:
        if isinstance(value, PendingReservation) or inspect.isawaitable(value):
            value = self.run(value)
        if type(value).__module__.startswith("distbudget") and type(value).__name__.startswith("Async"):
            return SyncView(value, self)
        return value

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class SyncView:
    """Presents an async distbudget object (budget, manager, reservation) with the sync API: every
    coroutine it returns is run to completion on the LoopThread."""

    def __init__(self, target: Any, runner: LoopThread) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_runner", runner)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        return lambda *a, **kw: self._runner.wrap(attr(*a, **kw))

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __enter__(self) -> SyncView:
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.run(self._target.__aexit__(*exc))


class Backend:
    """Makes budgets and managers on one engine through one API (sync, or async driven from a
    loop thread); ``store`` is the Redis client (None embedded)."""

    def __init__(self, kind: str, store: Any, api: str = "sync", runner: LoopThread | None = None) -> None:
        self.kind = kind
        self.store = store
        self.api = api
        self.runner = runner
        # embedded budgets of one test share one in-process store, as a manager's do
        self.memory = MemoryEngine() if store is None else None
        self.async_store: Any = None
        self.fake_server: Any = None

    def _async_client(self) -> Any:
        if self.async_store is None and self.store is not None:
            if self.kind == "fakeredis":
                import fakeredis

                self.async_store = fakeredis.FakeAsyncRedis(server=self.fake_server)
            else:
                kw = self.store.connection_pool.connection_kwargs
                self.async_store = redis.asyncio.Redis(host=kw["host"], port=kw["port"])
        return self.async_store

    def budget(self, scope: BudgetScope, rates: Any = None, **kw: Any) -> Any:
        if self.api == "async":
            assert self.runner is not None
            if self.memory is not None:
                return SyncView(AsyncBudget(scope, rates, _engine=AsyncMemoryEngine(self.memory), **kw), self.runner)
            return SyncView(AsyncBudget(scope, rates, redis=self._async_client(), **kw), self.runner)
        if self.memory is not None:
            return Budget(scope, rates, _engine=self.memory, **kw)
        return Budget(scope, rates, redis=self.store, **kw)

    def manager(self, **kw: Any) -> Any:
        if self.api == "async":
            assert self.runner is not None
            return SyncView(AsyncBudgetManager(redis=self._async_client(), **kw), self.runner)
        return BudgetManager(redis=self.store, **kw)


BACKENDS = ["embedded", "fakeredis", "redis", "embedded-async", "fakeredis-async", "redis-async"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind, _, api = request.param.partition("-")
    runner = LoopThread() if api == "async" else None
    if kind == "embedded":
        b = Backend("embedded", None, api or "sync", runner)
    elif kind == "fakeredis":
        fakeredis = pytest.importorskip("fakeredis")
        server = fakeredis.FakeServer()
        b = Backend("fakeredis", fakeredis.FakeRedis(server=server), api or "sync", runner)
        b.fake_server = server
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = server.client()
        client.flushall()
        b = Backend("redis", client, api or "sync", runner)
    yield b
    if runner is not None:
        if b.async_store is not None:
            runner.run(b.async_store.aclose())
        runner.close()
    if b.store is not None:
        b.store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()
