"""Shared fixtures: a real redis-server and a real 3-master Redis Cluster started by the tests on free
ports (``tests/_servers.py``), and one ``backend`` fixture that runs each behavioural test on every
engine: embedded, fakeredis (our real Lua run by lupa), real Redis and Redis Cluster, each through the
sync and the asyncio API. Each backend is a ``pytest.param`` marked with its kind: ``pytest -m
embedded`` runs the in-process engine alone, ``-m redis`` / ``-m cluster`` the real servers (tests
using the servers directly carry the marks too). On the real servers, budgets connect as the README's
minimal ACL user; the tests inspect with an admin client."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from distbudget import AsyncBudget, AsyncBudgetManager, Budget, BudgetManager, BudgetScope
from distbudget.budget import PendingReservation
from distbudget.engines.memory import AsyncMemoryEngine, MemoryEngine
from tests._servers import Cluster, RedisServer, free_port  # noqa: F401  (free_port: tests import it from here)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The suite's Redis. ``url`` connects as the README's minimal ACL user (keys and channels
    under the suite's prefixes, only the commands distbudget uses), so every budget, manager and
    listener a test builds from it proves that ACL suffices; ``client()`` is the admin."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.restrict(*ACL_USER, prefixes=ACL_PREFIXES)
    yield server
    server.stop()


ACL_USER = ("distbudget-app", "app-secret")
ACL_PREFIXES = ("distbudget", "pfx")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-master Redis Cluster on loopback ports, its budgets connecting as the ACL user too."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    cluster.restrict(*ACL_USER, prefixes=ACL_PREFIXES)
    yield cluster
    cluster.stop()


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

    def __init__(
        self, kind: str, store: Any, api: str = "sync", runner: LoopThread | None = None, client: Any = None
    ) -> None:
        self.kind = kind
        self.store = store  # admin: tests inspect and flush with it
        self.client = client if client is not None else store  # budgets and managers use this one
        self.connect_async: Any = None  # () -> a redis.asyncio client as the budgets' user
        self.cluster = False
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
                self.async_store = self.connect_async()
        return self.async_store

    def budget(self, scope: BudgetScope, rates: Any = None, **kw: Any) -> Any:
        if self.api == "async":
            assert self.runner is not None
            if self.memory is not None:
                return SyncView(AsyncBudget(scope, rates, _engine=AsyncMemoryEngine(self.memory), **kw), self.runner)
            return SyncView(AsyncBudget(scope, rates, redis=self._async_client(), **kw), self.runner)
        if self.memory is not None:
            return Budget(scope, rates, _engine=self.memory, **kw)
        return Budget(scope, rates, redis=self.client, **kw)

    def manager(self, **kw: Any) -> Any:
        """A manager on this backend; managers of one test share the registry (embedded too)."""
        if self.api == "async":
            assert self.runner is not None
            if self.memory is not None:
                return SyncView(AsyncBudgetManager(_engine=AsyncMemoryEngine(self.memory), **kw), self.runner)
            return SyncView(AsyncBudgetManager(redis=self._async_client(), **kw), self.runner)
        if self.memory is not None:
            return BudgetManager(_engine=self.memory, **kw)
        return BudgetManager(redis=self.client, **kw)


def _backend(name: str) -> Any:
    """One backend as a parameter marked with its kind (``pytest -m redis``, ``-m cluster``,
    ``-m embedded``, ``-m fakeredis`` select them)."""
    return pytest.param(name, marks=getattr(pytest.mark, name.partition("-")[0]), id=name)


BACKENDS = [
    _backend(name)
    for name in (
        "embedded",
        "fakeredis",
        "redis",
        "cluster",
        "embedded-async",
        "fakeredis-async",
        "redis-async",
        "cluster-async",
    )
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the suite's servers outside the ``backend`` fixture carry the same marks."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "redis_cluster" in fixtures:
            item.add_marker(pytest.mark.cluster)
        elif "redis_server" in fixtures and "backend" not in fixtures:
            item.add_marker(pytest.mark.redis)


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
    elif kind == "cluster":  # real Redis, sharded: kind "redis" so every real-Redis test runs here too
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        b = Backend("redis", cluster.client(), api or "sync", runner, client=cluster.client(*ACL_USER))
        b.connect_async = lambda: cluster.async_client(*ACL_USER)
        b.cluster = True
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        admin = server.client()
        admin.flushall()
        b = Backend("redis", admin, api or "sync", runner, client=server.client(*ACL_USER))
        b.connect_async = lambda: redis.asyncio.Redis(port=server.port, username=ACL_USER[0], password=ACL_USER[1])
    yield b
    if runner is not None:
        if b.async_store is not None:
            runner.run(b.async_store.aclose())
        runner.close()
    if b.store is not None:
        b.store.close()
        if b.client is not b.store:
            b.client.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()
