"""Redis outages under each failure policy (``on_backend_error``), with real faults on real servers:
``kill -9`` of an AOF (fsync always) redis-server during a stream of charges, then a restart on the same
port and directory; and a lost reply (``DEBUG SLEEP`` while the client's socket timeout is short: the
client gives up, the server runs the script afterwards).

Each test checks the books: every charge made (returned, or journaled and reported) is in the ledger and
the totals exactly once. Figures (records lost, counted twice, recovery times) are printed as
``FIGURES ...`` lines (``pytest -s``)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distbudget import (
    AsyncBudget,
    AsyncBudgetManager,
    BackendError,
    Budget,
    BudgetExceededError,
    BudgetManager,
    BudgetScope,
    BudgetWarning,
    InvalidInputError,
    Reservation,
)
from distbudget._core.keys import KeySpace
from tests._faults import AofRedis

pytestmark = pytest.mark.slow

MODEL = "gpt-4o"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AofRedis]:
    srv = AofRedis(tmp_path)
    yield srv
    srv.stop()


def big_scope(name: str = "fleet", hard_stop: bool = True) -> BudgetScope:
    return BudgetScope(name, max_cost_per_day_usd=100_000, max_tokens_per_session=10**12, hard_stop=hard_stop)


def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def ledger_charges(srv: AofRedis, root: str) -> list[dict[str, Any]]:
    """Every charge in a tree's ledger, read with an admin client (not through distbudget)."""
    with srv.client() as c:
        entries = c.xrange(KeySpace("distbudget", root).ledger, "-", "+")
    out = []
    for _id, fields in entries:
        d = json.loads(fields[b"d"])
        if d["kind"] == "charge":
            out.append({**d, "c": int(fields[b"c"]), "t": int(fields[b"t"])})
    return out


class Books:
    """What a test made: each charge is identified by its unique input token count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: dict[int, tuple[int, int]] = {}  # input tokens -> (tokens, nano-USD)
        self.events: list[tuple[float, str]] = []  # (monotonic, "ok" | "journaled")
        self.errors: list[BaseException] = []
        self.latencies: list[float] = []  # seconds per call while Redis was down

    def add(self, key: int, tokens: int, nano: int, kind: str) -> None:
        with self.lock:
            assert key not in self.made
            self.made[key] = (tokens, nano)
            self.events.append((time.monotonic(), kind))

    def count(self, kind: str, after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for t, k in self.events if k == kind and t >= after)

    def first(self, kind: str, after: float) -> float:
        with self.lock:
            return min(t for t, k in self.events if k == kind and t >= after)

    def audit(self, srv: AofRedis, root: str, summary: dict[str, Any]) -> dict[str, int]:
        """Compare the ledger and the totals with what was made; returns the figures."""
        seen = Counter(e["input_tokens"] for e in ledger_charges(srv, root))
        lost = [k for k in self.made if seen[k] == 0]
        twice = {k: n for k, n in seen.items() if n > 1}
        unknown = [k for k in seen if k not in self.made]
        assert not lost, f"charges lost: {lost}"
        assert not twice, f"charges counted twice: {twice}"
        assert not unknown, f"charges nobody made: {unknown}"
        tokens = sum(t for t, _ in self.made.values())
        nano = sum(c for _, c in self.made.values())
        total = summary["total"]
        assert total["requests"] == len(self.made)
        assert total["tokens"] == tokens
        assert round(total["cost_usd"] * 1e9) == nano
        return {"made": len(self.made), "lost": len(lost), "twice": len(twice)}


def charge_kinds(budget: Budget | AsyncBudget, books: Books, key: int, call: Any) -> None:
    """Run one sync charge and book it: returned (journaled or not), or raised with journaled=True."""
    try:
        record = call()
    except BackendError as err:
        if not err.journaled:
            raise
        assert "journaled, will be replayed" in str(err)
        books.add(key, key + 7, budget._core.usage(MODEL, (key, 7, 0, 0, 0, 0))[1], "journaled")
        return
    assert record.cost_nano_usd == budget._core.usage(MODEL, (key, 7, 0, 0, 0, 0))[1]
    books.add(key, record.total_tokens, record.cost_nano_usd, "journaled" if record.journaled else "ok")


def worker(budget: Budget, books: Books, stop: threading.Event, first: int, step: int) -> None:
    """Record a stream of charges (every other one with a request id) until told to stop."""
    key = first
    try:
        while not stop.is_set():
            rid = f"req-{key}" if key % 2 else None
            t0 = time.monotonic()
            charge_kinds(budget, books, key, lambda: budget.record("s1", MODEL, key, 7, request_id=rid))
            if budget.backend_status["degraded"]:
                with books.lock:
                    books.latencies.append(time.monotonic() - t0)
            key += step
            time.sleep(0.002)
    except BaseException as err:  # the test fails on any other error
        books.errors.append(err)


def run_outage(server: AofRedis, mode: str, **options: Any) -> tuple[Budget, Books, dict[str, Any]]:
    """Three worker threads record while Redis is killed -9 and restarted; returns the figures."""
    budget = Budget(big_scope(), redis=server.url, on_backend_error=mode, **options)
    books = Books()
    stop = threading.Event()
    threads = [threading.Thread(target=worker, args=(budget, books, stop, 1000 + i, 3)) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: books.count("ok") >= 60)
    hold = budget.reserve(MODEL, 10, 100)  # a Redis hold, committed during the outage
    server.kill9()
    killed = time.monotonic()
    wait_until(lambda: books.count("journaled", killed) >= 40)
    figures: dict[str, Any] = {"mode": mode}
    local_hold = checks_during_outage(mode, budget, books, hold)
    up = server.start()
    wait_until(lambda: books.count("ok", up) >= 20 and budget.backend_status["journaled"] == 0)
    figures["first_ok_after_restart_s"] = round(books.first("ok", up) - up, 3)
    figures["drained_after_restart_s"] = round(time.monotonic() - up, 3)
    if local_hold is not None:  # a hold admitted locally during the outage, committed to Redis after it
        record = local_hold.commit(997, 7)
        assert not record.journaled
        books.add(997, record.total_tokens, record.cost_nano_usd, "late")
    stop.set()
    for t in threads:
        t.join()
    assert not books.errors, books.errors
    budget.flush_journal()
    summary = budget.summary()
    figures.update(books.audit(server, "fleet", summary))
    status = summary["backend"]
    assert status["journaled"] == 0
    assert status["replayed"] + status["already_applied"] == status["journaled_total"] >= 40
    assert status["errors"] >= 1 and not status["degraded"]
    assert summary["limits"]["day_cost_usd"]["held"] == 0  # the journaled commit freed its hold on replay
    lat = sorted(books.latencies)
    figures["degraded_call_p50_ms"] = round(lat[len(lat) // 2] * 1000, 3) if lat else None
    figures["degraded_call_max_ms"] = round(lat[-1] * 1000, 1) if lat else None
    for k in ("journaled_total", "ambiguous", "replayed", "already_applied", "errors"):
        figures[k] = status[k]
    print("FIGURES", json.dumps(figures))
    return budget, books, figures


def checks_during_outage(mode: str, budget: Budget, books: Books, hold: Reservation) -> Reservation | None:
    """What each policy answers while Redis is down (the workers keep recording meanwhile); under
    "allow", returns a local hold still open."""
    key = 999  # the held call's actual usage (unique input token count)
    if mode == "raise":
        with pytest.raises(BackendError):
            budget.check(MODEL, 10, 10)
        with pytest.raises(BackendError):
            budget.reserve(MODEL, 10, 10)
        with pytest.raises(BackendError) as err:
            hold.commit(key, 7)
        assert err.value.journaled
        books.add(key, key + 7, budget._core.usage(MODEL, (key, 7, 0, 0, 0, 0))[1], "journaled")
        assert hold.release() is False  # its commit is journaled: nothing to do, nothing raised
        with pytest.raises(BackendError):
            budget.summary()
        return None
    record = hold.commit(key, 7)
    assert record.journaled
    books.add(key, record.total_tokens, record.cost_nano_usd, "journaled")
    if mode == "deny":
        for call in (lambda: budget.check(MODEL, 10, 10), lambda: budget.reserve(MODEL, 10, 10)):
            with pytest.raises(BudgetExceededError) as refused:
                call()
            assert refused.value.limit_type == "backend_unavailable"
        soft = Budget(big_scope(hard_stop=False), _engine=budget.engine, on_backend_error="deny")
        with pytest.warns(BudgetWarning):
            assert soft.check(MODEL, 10, 10) is False
        with pytest.warns(BudgetWarning):
            assert not soft.reserve(MODEL, 10, 10).admitted
        return None
    # allow: a second budget on the same engine (its own allowance: 10,000 tokens per outage)
    other = Budget(big_scope(), _engine=budget.engine, on_backend_error="allow", fail_open_max_tokens=10_000)
    assert other.check(MODEL, 1000, 4000) is True
    first = other.reserve(MODEL, 1000, 4000)  # local holds: 5,000 + 5,000 tokens
    second = other.reserve(MODEL, 1000, 4000)
    assert first.admitted and second.admitted
    with pytest.raises(BudgetExceededError) as refused:
        other.reserve(MODEL, 1, 0)
    assert refused.value.limit_type == "backend_unavailable"
    with pytest.raises(BudgetExceededError):
        other.check(MODEL, 1, 0)
    assert second.release() is True  # local: gives 5,000 back
    key = 998
    record = first.commit(key, 7)  # journaled: 1,005 tokens of the allowance now
    assert record.journaled
    books.add(key, record.total_tokens, record.cost_nano_usd, "journaled")
    third = other.reserve(MODEL, 1000, 4000)  # 6,005 <= 10,000
    assert third.admitted
    with pytest.raises(BudgetExceededError):
        other.reserve(MODEL, 1000, 4000)  # 11,005 > 10,000
    assert other.backend_status["fail_open_used"]["tokens"] == 6005
    return third


@pytest.mark.parametrize("mode", ["allow", "deny", "raise"])
def test_kill9_during_a_stream_of_records(server: AofRedis, mode: str) -> None:
    options = {"fail_open_max_cost_usd": 1000} if mode == "allow" else {}
    run_outage(server, mode, **options)


def test_kill9_asyncio_allow(server: AofRedis) -> None:
    async def main() -> dict[str, Any]:
        budget = AsyncBudget(big_scope("tree"), redis=server.url, on_backend_error="allow", fail_open_max_tokens=10**9)
        books = Books()
        stop = asyncio.Event()

        async def task(first: int) -> None:
            key = first
            while not stop.is_set():
                rid = f"req-{key}" if key % 2 else None
                try:
                    record = await budget.record("s1", MODEL, key, 7, request_id=rid)
                except BaseException as err:
                    books.errors.append(err)
                    raise
                books.add(key, record.total_tokens, record.cost_nano_usd, "journaled" if record.journaled else "ok")
                key += 4
                await asyncio.sleep(0.002)

        async def until(predicate: Any) -> None:
            deadline = time.monotonic() + 20
            while not predicate():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(task(1000 + i)) for i in range(4)]
        await until(lambda: books.count("ok") >= 60)
        server.kill9()
        killed = time.monotonic()
        await until(lambda: books.count("journaled", killed) >= 40)
        assert await budget.check(MODEL, 10, 10) is True
        async with budget.reserve(MODEL, 10, 10) as hold:
            record = await hold.commit(555, 7)
        assert record.journaled
        books.add(555, record.total_tokens, record.cost_nano_usd, "journaled")
        up = await asyncio.to_thread(server.start)
        await until(lambda: books.count("ok", up) >= 20 and budget.backend_status["journaled"] == 0)
        figures: dict[str, Any] = {"mode": "allow (asyncio)"}
        figures["first_ok_after_restart_s"] = round(books.first("ok", up) - up, 3)
        figures["drained_after_restart_s"] = round(time.monotonic() - up, 3)
        stop.set()
        await asyncio.gather(*tasks)
        assert not books.errors
        await budget.flush_journal()
        summary = await budget.summary()
        figures.update(books.audit(server, "tree", summary))
        status = summary["backend"]
        assert status["replayed"] + status["already_applied"] == status["journaled_total"] >= 40
        figures.update({k: status[k] for k in ("journaled_total", "ambiguous", "replayed", "already_applied")})
        return figures

    print("FIGURES", json.dumps(asyncio.run(main())))


@pytest.mark.parametrize("mode", ["deny", "raise"])
def test_manager_outage_keeps_cached_config_and_replays(server: AofRedis, mode: str) -> None:
    """The registry refresh a manager's budgets make (registry_ttl) cannot fail a call: the cached
    config is kept and the call meets its policy (its charge is journaled in every mode)."""
    manager = BudgetManager(redis=server.url, on_backend_error=mode, registry_ttl=0.01)
    manager.register(big_scope("team"))
    manager.register(BudgetScope("alice", parent="team", max_cost_per_session_usd=100))
    manager.record("alice", "s1", MODEL, 100, 7)
    server.kill9()
    time.sleep(0.05)  # every cached config is now due for a registry refresh, which cannot happen
    if mode == "deny":
        with pytest.raises(BudgetExceededError) as refused:
            manager.check("alice", MODEL, 10)
        assert refused.value.limit_type == "backend_unavailable"
        assert manager.record("alice", "s1", MODEL, 200, 7).journaled
    else:
        with pytest.raises(BackendError):
            manager.check("alice", MODEL, 10)
        with pytest.raises(BackendError) as err:
            manager.record("alice", "s1", MODEL, 200, 7)
        assert err.value.journaled
    assert manager.get("alice").backend_status["journaled"] == 1
    server.start()
    assert manager.flush_journal() == 1
    for name in ("team", "alice"):
        assert manager.summary(name)["total"]["tokens"] == 100 + 7 + 200 + 7


def test_async_manager_deny(server: AofRedis) -> None:
    async def main() -> None:
        manager = AsyncBudgetManager(redis=server.url, on_backend_error="deny", registry_ttl=0.01)
        await manager.register(big_scope("org"))
        server.kill9()
        await asyncio.sleep(0.05)
        with pytest.raises(BudgetExceededError):
            await manager.check("org", MODEL, 10)
        assert (await manager.record("org", "s", MODEL, 300, 7)).journaled
        await asyncio.to_thread(server.start)
        assert await manager.flush_journal() == 1
        assert (await manager.summary("org"))["total"]["tokens"] == 307

    asyncio.run(main())


# ---- lost replies: the script ran, the client never heard -----------------------------------------


def lose_one_reply(server: AofRedis, budget: Budget, key: int, request_id: str | None) -> None:
    """Record while the server sleeps (DEBUG SLEEP) longer than the client's socket timeout: the
    client gives up (ambiguous: the command was sent), the server runs the script when it wakes."""
    admin = server.client()
    sleeper = threading.Thread(target=lambda: admin.execute_command("DEBUG", "SLEEP", "1.2"))
    sleeper.start()
    time.sleep(0.2)
    record = budget.record("s1", MODEL, key, 7, request_id=request_id)
    assert record.journaled
    assert budget.backend_status["ambiguous"] == 1
    sleeper.join()
    admin.close()


@pytest.mark.parametrize("request_id", [None, "req-lost"])
def test_lost_reply_is_not_counted_twice(server: AofRedis, request_id: str | None) -> None:
    budget = Budget(big_scope(), redis=server.url + "?socket_timeout=0.3", on_backend_error="allow")
    budget.record("s1", MODEL, 100, 7)
    lose_one_reply(server, budget, 4242, request_id)
    # the server ran the script after the client gave up: the charge is in the ledger already
    wait_until(lambda: any(e["input_tokens"] == 4242 for e in ledger_charges(server, "fleet")), 5)
    assert budget.flush_journal() == 1
    status = budget.backend_status
    assert (status["already_applied"], status["replayed"], status["journaled"]) == (1, 0, 0)
    summary = budget.summary()
    assert summary["total"]["requests"] == 2
    assert summary["total"]["tokens"] == 107 + 4249
    assert Counter(e["input_tokens"] for e in ledger_charges(server, "fleet"))[4242] == 1
    print("FIGURES", json.dumps({"lost_reply": True, "request_id": request_id, "counted": 1}))


def test_lost_reply_without_ledger_or_request_id_is_the_documented_bound(server: AofRedis) -> None:
    """Neither a request id nor a ledger: nothing can tell whether the lost reply's script ran, so the
    replay sends it again and it counts twice (the README documents this bound)."""
    url = server.url + "?socket_timeout=0.3"
    budget = Budget(big_scope(), redis=url, on_backend_error="allow", ledger_maxlen=0)
    budget.record("s1", MODEL, 100, 7)
    lose_one_reply(server, budget, 4242, None)
    time.sleep(0.2)
    assert budget.flush_journal() == 1
    assert budget.backend_status["unverified"] == 1
    assert budget.summary()["total"]["requests"] == 3  # two charges, the lost reply's counted twice


def test_connection_refused_is_replayed_without_a_lookup(server: AofRedis) -> None:
    budget = Budget(big_scope(), redis=server.url, on_backend_error="deny")
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    started = time.monotonic()
    records = [budget.record("s1", MODEL, 10 + i, 0) for i in range(200)]  # the first finds Redis gone
    elapsed = time.monotonic() - started
    assert all(r.journaled for r in records)
    status = budget.backend_status
    assert status["ambiguous"] == 0 and status["errors"] >= 1 and status["degraded"]
    server.start()
    assert budget.flush_journal() == 200
    assert budget.summary()["total"]["requests"] == 201
    print("FIGURES", json.dumps({"refused_connection_200_degraded_records_s": round(elapsed, 4)}))


@pytest.mark.parametrize("mode", ["allow", "raise"])
def test_a_record_many_batch_that_meets_an_outage_is_journaled_whole(server: AofRedis, mode: str) -> None:
    """The pipelined batch is the call that finds Redis gone: each of its charges is journaled (under
    "raise" the caller also gets the BackendError) and replayed once."""
    budget = Budget(big_scope(), redis=server.url, on_backend_error=mode)
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    batch = [("s1", MODEL, 10 + i, 1) for i in range(50)]
    if mode == "raise":
        with pytest.raises(BackendError) as err:
            budget.record_many(batch)
        assert err.value.journaled
    else:
        assert all(r.journaled for r in budget.record_many(batch))
    assert budget.backend_status["journaled"] == 50
    server.start()
    assert budget.flush_journal() == 50
    assert budget.summary()["total"]["tokens"] == 1 + sum(10 + i + 1 for i in range(50))
    assert sorted(e["input_tokens"] for e in ledger_charges(server, "fleet")) == [1, *range(10, 60)]


@pytest.mark.parametrize("mode", ["allow", "raise"])
def test_a_record_many_batch_partly_refused_journals_only_the_refused_calls(server: AofRedis, mode: str) -> None:
    """Redis reaches maxmemory part way through a batch: the later charges are refused with OOM (they
    did not run), the earlier ones were recorded. Only the refused ones are journaled (replayed without
    a ledger lookup); under "raise" the batch raises once, after its recorded charges were finished."""
    budget = Budget(big_scope(), redis=server.url, on_backend_error=mode)
    budget.record("s1", MODEL, 1, 0)  # keys and scripts exist
    admin = server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 200_000)
    batch = [("s1", MODEL, 10 + i, 0, {"blob": "x" * 4000}) for i in range(200)]
    try:
        if mode == "raise":
            with pytest.raises(BackendError, match="were recorded; the other") as err:
                budget.record_many(batch)
            assert err.value.journaled
            records = budget.records[1:]
        else:
            records = budget.record_many(batch)
        in_redis = len(ledger_charges(server, "fleet"))
    finally:
        admin.config_set("maxmemory", 0)
    journaled = [r.input_tokens for r in records if r.journaled]
    assert len(records) == 200 and 0 < len(journaled) < 200
    assert in_redis == 1 + 200 - len(journaled)  # the others were recorded, once
    status = budget.backend_status
    assert (status["journaled"], status["ambiguous"]) == (len(journaled), 0)
    assert budget.flush_journal() == len(journaled)
    assert budget.backend_status["replayed"] == len(journaled)
    assert sorted(e["input_tokens"] for e in ledger_charges(server, "fleet")) == [1, *range(10, 210)]


def test_a_record_many_call_that_redis_refuses_raises_and_is_not_journaled(server: AofRedis) -> None:
    """An error Redis answers for one call (here WRONGTYPE: its session key holds a string) is not an
    outage: the batch raises saying so, the call is not journaled, and the other calls stand."""
    budget = Budget(big_scope(), redis=server.url, on_backend_error="allow")
    budget.record("s1", MODEL, 1, 0)
    server.client().set(KeySpace("distbudget", "fleet").session("fleet", "broken"), "not a hash")
    batch = [("s1", MODEL, 10, 0), ("broken", MODEL, 11, 0), ("s1", MODEL, 12, 0)]
    with pytest.raises(BackendError, match=r"refused 1 of the 3 charges .*call 1.*2 were recorded") as err:
        budget.record_many(batch)
    assert not err.value.journaled
    assert budget.backend_status["journaled"] == 0 and not budget.backend_status["degraded"]
    assert sorted(e["input_tokens"] for e in ledger_charges(server, "fleet")) == [1, 10, 12]


def test_a_degraded_record_many_under_raise_journals_the_whole_batch(server: AofRedis) -> None:
    """While Redis is known to be down, a batch is journaled whole (not only its first call) and the
    call raises once."""
    budget = Budget(big_scope(), redis=server.url)  # on_backend_error="raise"
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    with pytest.raises(BackendError) as first:
        budget.record("s1", MODEL, 2, 0)
    assert first.value.journaled
    with pytest.raises(BackendError, match="the batch's 5 charges were journaled") as err:
        budget.record_many([("s1", MODEL, 10 + i, 0) for i in range(5)])  # not even sent
    assert err.value.journaled
    assert budget.backend_status["journaled"] == 6
    server.start()
    assert budget.flush_journal() == 6
    assert sorted(e["input_tokens"] for e in ledger_charges(server, "fleet")) == [1, 2, *range(10, 15)]


def test_a_batch_that_does_not_fit_in_the_journal_journals_none_of_it(server: AofRedis) -> None:
    """A full journal refuses a batch whole, so that retrying it (as the error says) counts each call once."""
    budget = Budget(big_scope(), redis=server.url, on_backend_error="allow", journal_size=5)
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    assert budget.record("s1", MODEL, 2, 0).journaled
    batch = [("s1", MODEL, 10 + i, 0) for i in range(5)]
    with pytest.raises(BackendError, match=r"journal is full.*none of this record_many batch's 5 charges") as full:
        budget.record_many(batch)
    assert not full.value.journaled
    assert budget.backend_status["journaled"] == 1
    server.start()
    assert budget.flush_journal() == 1
    budget.record_many(batch)  # the retry the error asks for
    assert sorted(e["input_tokens"] for e in ledger_charges(server, "fleet")) == [1, 2, *range(10, 15)]


def test_retrying_a_journaled_commit_is_refused(server: AofRedis) -> None:
    """Under "raise" a commit that met an outage is journaled and raises; retrying it (the natural
    reaction to an exception) must not journal the charge a second time."""
    budget = Budget(big_scope("retry"), redis=server.url)
    hold = budget.reserve(MODEL, 100, 100)
    server.kill9()
    with pytest.raises(BackendError) as first:
        hold.commit(100, 50)
    assert first.value.journaled
    with pytest.raises(InvalidInputError, match="already committed"):
        hold.commit(100, 50)
    server.start()
    assert budget.flush_journal() == 1
    assert budget.summary()["total"]["tokens"] == 150


def test_a_commit_that_charged_nothing_can_be_retried(server: AofRedis) -> None:
    """The journal was full: the commit was neither sent nor journaled, so committing again later is
    allowed (and counts once)."""
    budget = Budget(big_scope("full"), redis=server.url, on_backend_error="allow", journal_size=1)
    first, second = budget.reserve(MODEL, 100, 100), budget.reserve(MODEL, 100, 100)
    server.kill9()
    assert first.commit(10, 5).journaled
    with pytest.raises(BackendError, match="journal is full") as full:
        second.commit(20, 5)
    assert not full.value.journaled
    server.start()
    assert budget.flush_journal() == 1
    assert second.commit(20, 5).total_tokens == 25
    assert budget.summary()["total"]["tokens"] == 15 + 25


def test_a_full_journal_raises_and_drops_nothing(server: AofRedis) -> None:
    budget = Budget(big_scope(), redis=server.url, on_backend_error="allow", journal_size=3)
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    for i in range(3):
        assert budget.record("s1", MODEL, 10 + i, 0).journaled
    with pytest.raises(BackendError, match="journal is full") as full:
        budget.record("s1", MODEL, 99, 0)
    assert not full.value.journaled
    server.start()
    assert budget.flush_journal() == 3
    assert budget.summary()["total"]["tokens"] == 1 + 10 + 11 + 12


def test_flush_journal_raises_while_redis_is_down(server: AofRedis) -> None:
    budget = Budget(big_scope(), redis=server.url, on_backend_error="deny")
    budget.record("s1", MODEL, 1, 0)
    server.kill9()
    assert budget.record("s1", MODEL, 2, 0).journaled
    with pytest.raises(BackendError, match="still unavailable"):
        budget.flush_journal()
    assert budget.backend_status["journaled"] == 1
    server.start()
    time.sleep(0.6)
    budget.check(MODEL, 1)  # the next operation replays first
    assert budget.backend_status["journaled"] == 0
    assert budget.summary()["total"]["tokens"] == 3


def test_invalid_options_fail_at_construction() -> None:
    scope = big_scope()
    for cls in (Budget, AsyncBudget):
        with pytest.raises(InvalidInputError, match="on_backend_error"):
            cls(scope, on_backend_error="ignore")
        with pytest.raises(InvalidInputError, match="allow"):
            cls(scope, on_backend_error="deny", fail_open_max_tokens=10)
        with pytest.raises(InvalidInputError, match="journal_size"):
            cls(scope, journal_size=0)
    for mgr in (BudgetManager, AsyncBudgetManager):
        with pytest.raises(InvalidInputError, match="on_backend_error"):
            mgr(on_backend_error=True)
    budget = Budget(scope, on_backend_error="allow", fail_open_max_cost_usd=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert budget.summary()["backend"]["mode"] == "allow"
    assert budget.backend_status["degraded"] is False
