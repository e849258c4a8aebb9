"""Shared fixtures: a real redis-server started by the tests on a free port, and one ``backend``
fixture that runs each behavioural test on every engine: embedded, fakeredis (our real Lua run by
lupa) and real Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from distbudget import Budget, BudgetManager, BudgetScope
from distbudget.engines.memory import MemoryEngine

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
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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


class Backend:
    """Makes budgets and managers on one engine; ``store`` is the Redis client (None embedded)."""

    def __init__(self, kind: str, store: Any) -> None:
        self.kind = kind
        self.store = store
        # embedded budgets of one test share one in-process store, as a manager's do
        self.memory = MemoryEngine() if store is None else None

    def budget(self, scope: BudgetScope, rates: Any = None, **kw: Any) -> Budget:
        if self.memory is not None:
            return Budget(scope, rates, _engine=self.memory, **kw)
        return Budget(scope, rates, redis=self.store, **kw)

    def manager(self, **kw: Any) -> BudgetManager:
        return BudgetManager(redis=self.store, **kw)

    def key_count(self) -> int:
        return 0 if self.store is None else int(self.store.dbsize())


BACKENDS = ["embedded", "fakeredis", "redis"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "embedded":
        yield Backend("embedded", None)
    elif request.param == "fakeredis":
        fakeredis = pytest.importorskip("fakeredis")
        client = fakeredis.FakeRedis()
        yield Backend("fakeredis", client)
        client.close()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = server.client()
        client.flushall()
        yield Backend("redis", client)
        client.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


MakeBudget = Callable[..., Budget]
