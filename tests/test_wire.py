"""The Redis engines' hand path (``engines/redis.py``): replies read by hand are what redis-py's own
reader makes of the same bytes; connections kept between calls are checked before they are used
again; and where the hand path's redis-py internals are not relied on (another redis-py version,
RESP3, Sentinel's pool) the same calls go through redis-py's own connection methods, with the same
results."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from distbudget import AsyncBudget, Budget, BudgetScope, ModelRates
from distbudget.engines import redis as engine_module
from distbudget.engines.codec import Replies
from tests.conftest import RedisServer

RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002)}

pytestmark = pytest.mark.redis

COMMANDS: list[tuple[Any, ...]] = [
    ("PING",),
    ("SET", "wire:k", "v"),
    ("GET", "wire:k"),
    ("GET", "wire:missing"),
    ("INCR", "wire:n"),
    ("EVAL", "return {1, 'a', {2, false, {}}, redis.error_reply('MYERR nested')}", 0),
    ("EVAL", "return redis.status_reply('FINE')", 0),
    ("EVAL", "return false", 0),
    ("EVAL", "return {}", 0),
    ("EVAL", "return redis.call('HSET', KEYS[1], 'f', 1)", 1, "wire:k"),  # WRONGTYPE
    ("EVALSHA", "0" * 40, 0),  # NOSCRIPT
    ("NOSUCHCOMMAND",),
    ("EVAL", "return string.rep('é', 150000)", 0),  # a reply longer than one read
    ("EVAL", "return {'0|1|2 3 4||||', -7, 'x\\r\\ny'}", 0),
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b) and str(a) == str(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


RESP3 = [
    ("CONFIG", "GET", "maxmemory-policy"),  # a map
    ("HGETALL", "wire:h"),  # a map
    ("SMEMBERS", "wire:s"),  # a set
    ("EVAL", "redis.setresp(3); return {double = 1.5}", 0),
    ("EVAL", "redis.setresp(3); return {big_number = '123456789012345678901234567890'}", 0),
    ("EVAL", "redis.setresp(3); return true", 0),
    ("EVAL", "redis.setresp(3); return {verbatim_string = {format = 'txt', string = 'plain'}}", 0),
    ("EVAL", "return false", 0),  # a RESP3 null
    ("CLIENT", "TRACKING", "ON"),
    ("GET", "wire:t"),
    ("SET", "wire:t", "2"),  # invalidates what this connection read: a push frame before the next reply
    ("PING",),
]


@pytest.mark.parametrize("protocol", [2, 3])
def test_replies_read_by_hand_are_redis_pys(redis_server: RedisServer, protocol: int) -> None:
    client = redis_server.client(protocol=protocol)
    commands = COMMANDS + (RESP3 if protocol == 3 else [])
    theirs, ours, stream = _both(client, commands)
    assert all(map(_same, ours.got, theirs)), (ours.got, theirs)
    assert isinstance(theirs[10], redis.exceptions.NoScriptError)
    assert len(ours.pushes) == (1 if protocol == 3 else 0)
    for cut in range(0, len(stream), 997):  # the same bytes arriving in any two pieces
        split = Replies(len(commands))
        assert not split.feed(stream[:cut]) or cut == len(stream)
        assert split.feed(stream[cut:])
        assert all(map(_same, split.got, theirs))
    with pytest.raises(redis.exceptions.InvalidResponse):
        Replies(1).feed(b"+OK\r\n+NOT ASKED\r\n")
    with pytest.raises(redis.exceptions.ConnectionError):  # as redis-py's reader: raised, not returned
        Replies(1).feed(b"-ERR max number of clients reached\r\n")


def _both(client: Any, commands: list[tuple[Any, ...]]) -> tuple[list[Any], Replies, bytes]:
    """The replies to ``commands`` read by redis-py (one command at a time), then read by hand
    (all pipelined, on a fresh connection)."""
    client.delete("wire:k", "wire:n", "wire:h", "wire:s", "wire:t")
    client.hset("wire:h", "f", "1")
    client.sadd("wire:s", "x")
    theirs = []
    conn = client.connection_pool.get_connection()
    try:
        for command in commands:
            conn.send_command(*command)
            try:
                theirs.append(conn.read_response())
            except redis.exceptions.ResponseError as exc:
                theirs.append(exc)
    finally:
        conn.disconnect()
        client.connection_pool.release(conn)
    client.delete("wire:k", "wire:n", "wire:t")
    conn = client.connection_pool.get_connection()
    try:
        stream = b""
        conn.send_packed_command(conn.pack_commands(commands))
        while len(stream) < 300_000 or not Replies(len(commands)).feed(stream):
            stream += conn._sock.recv(65536)
    finally:
        conn.disconnect()
        client.connection_pool.release(conn)
    ours = Replies(len(commands))
    assert ours.feed(stream)
    return theirs, ours, stream


def scope(name: str) -> BudgetScope:
    return BudgetScope(name, max_tokens_per_session=10**9, max_tokens_per_model={"m": 10**9})


@pytest.fixture(params=["hand", "redis-py"])
def hand(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both paths: replies read by hand, or (as with an untested redis-py version) by redis-py."""
    if request.param == "redis-py":
        monkeypatch.setattr(engine_module, "_TESTED_MAJORS", range(0))
    return bool(request.param == "hand")


def charged(record: Any) -> int:
    assert not record.journaled  # Redis answered: nothing waits in the local journal
    return int(record.input_tokens)


def test_both_paths_charge_alike_and_survive_a_flush_and_killed_connections(
    redis_server: RedisServer, hand: bool
) -> None:
    admin = redis_server.client()
    b = Budget(scope(f"wire-{hand}"), RATES, redis=redis_server.url, session_id="s")
    assert [charged(b.record("s", "m", 10, 0)) for _ in range(3)] == [10, 10, 10]
    wire = b.engine._direct
    assert wire is not None and wire.hand is hand
    assert len(wire.idle) == (1 if hand else 0)  # kept for the next call (hand path only)
    admin.script_flush()  # NOSCRIPT: loaded again, sent again, charged once
    charged(b.record("s", "m", 10, 0))
    admin.client_kill_filter(_type="normal", skipme=True)  # the kept connection closed by the server
    charged(b.record("s", "m", 10, 0))  # a fresh connection, no error
    assert [charged(r) for r in b.record_many([("s", "m", 1, 0)] * 3)] == [1, 1, 1]
    hold = b.reserve("m", 5, 0)
    hold.commit(5, 0)
    assert b.summary()["session"]["tokens"] == 58


def test_async_paths_alike_and_a_killed_kept_connection(redis_server: RedisServer, hand: bool) -> None:
    admin = redis_server.client()

    async def main() -> int:
        b = AsyncBudget(scope(f"awire-{hand}"), RATES, redis=redis_server.url, session_id="s")
        charged(await b.record("s", "m", 10, 0))
        assert b.engine._direct.hand is hand
        if hand:  # (redis.asyncio's own pool hands out a connection the server closed: it fails once)
            admin.client_kill_filter(_type="normal", skipme=True)
            await asyncio.sleep(0.05)  # the loop sees the server's close
        charged(await b.record("s", "m", 10, 0))
        for r in await asyncio.gather(*(b.record("s", "m", 1, 0) for _ in range(20))):
            charged(r)
        tokens = int((await b.summary())["session"]["tokens"])
        await b.engine.client.aclose()
        return tokens

    assert asyncio.run(main()) == 40


@pytest.mark.parametrize("protocol", [2, 3])
def test_resp2_and_resp3_and_a_small_pool(redis_server: RedisServer, protocol: int) -> None:
    client = redis.Redis.from_url(redis_server.url, protocol=protocol)
    b = Budget(scope(f"r{protocol}"), RATES, redis=client, session_id="s")
    assert b.engine._direct is not None and b.engine._direct.hand
    assert charged(b.record("s", "m", 3, 0)) == 3
    assert b.summary()["session"]["tokens"] == 3
    one = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=1))
    small = Budget(scope(f"one{protocol}"), RATES, redis=one, session_id="s")
    assert charged(small.record("s", "m", 3, 0)) == 3
    assert small.engine._direct.keep == 0 and not small.engine._direct.idle  # never the pool's last one
    assert one.ping()
