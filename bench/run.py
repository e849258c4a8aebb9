"""The distbudget benchmark: every figure measured in one run, each against contenders timed in the same run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/run.py            # full run (~5 min), writes bench/results.md
    .venv/bin/python bench/run.py --quick    # tiny sizes (~30 s), a smoke test

By default it starts its own ``redis-server`` on a free loopback port (``--save "" --appendonly no``)
and kills it at the end. ``--redis URL`` uses a server you run instead: the bench then writes only
keys under its own unique prefix (deleted at the end, found with ``SCAN MATCH`` of that prefix), but
it does ``CONFIG RESETSTAT`` to read ``INFO commandstats``, and other clients' traffic would pollute
those figures. It never flushes anything.

Contenders alternate in rounds (the order reversed every other round) and each figure is the median
over rounds; ratios are taken round by round, then the median. The machine is noisy: compare ratios,
not absolute rates, between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from peers import NaiveZsetBudget

from distbudget import AsyncBudget, Budget, BudgetScope, ModelRates
from distbudget._core.ops import Announce, Record
from distbudget.engines.codec import Codec
from distbudget.engines.redis import connect


def wire(op: Any) -> Any:
    """The script call (script name, KEYS, ARGV, parser) of an engine operation."""
    return Codec().encode(op)


HERE = Path(__file__).resolve().parent
DAY = 86400
RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002)}
IN_TOKENS, OUT_TOKENS = 300, 200  # every charge in the bench: 500 tokens, $0.0007
SESSION = "s1"
# limits counts integer units and keeps one list entry per unit (moving window): a token budget has
# to pick a unit; 100 tokens keeps a million charges at 5M entries (1-token units would be 100x).
LIMITS_UNIT_TOKENS = 100
LIMITS_LIMIT_UNITS = 10**9  # never reached: the bench measures charging, not refusals
FLEET_SIZES = (1, 2, 4, 8)
TASKS = 64  # row 10: asyncio tasks of one process
MEMORY_TARGET = 64 * 1024

# Row 3h, a reference: the Redis commands record.lua issues for bench_scope() (KEYS: the totals
# hash, the day window's hash and sorted set, the session hash, the alert and ledger streams), with
# constant arguments and none of the accounting logic: the floor of a script doing this work here.
FLOOR_LUA = """
local t = redis.call('TIME')
redis.call('HMGET', KEYS[1], 't', 'c', 'r', 'm:m:t', 'm:m:c', 'm:m:r', 'm:m:a:model_m_tokens')
redis.call('HSET', KEYS[1], 't', '1500', 'c', '2100000', 'r', '3', 'm:m:t', '1500', 'm:m:c', '2100000', 'm:m:r', '3')
redis.call('HMGET', KEYS[2], 'kt', 'kc', 'kr', 't', 'c', 'r', 'o', 'k', 'a:day_cost_usd')
redis.call('HSET', KEYS[2], 'kt', '1500', 'kc', '2100000', 'kr', '3', 't', '1500', 'c', '2100000', 'r', '3')
redis.call('HMGET', KEYS[4], 'x', 't', 'c', 'r', 'a:session_tokens', 'a:session_cost_usd')
redis.call('HSET', KEYS[4], 't', '1500', 'c', '2100000', 'r', '3')
local id = ''
if ARGV[#ARGV] ~= '' then
  id = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[#ARGV - 1], '*', 'd', ARGV[#ARGV], 'ts', t[1] .. t[2],
                  't', ARGV[2], 'c', ARGV[3], 'r', ARGV[4])
end
return '0|' .. t[1] .. '|1500 2100000 3 1500 2100000 3 1500 2100000 3 1500 2100000 3||||' .. id
"""


def bench_scope() -> BudgetScope:
    """Session + day + per-model limits: what every Redis figure here charges against."""
    return BudgetScope(
        "bench",
        max_tokens_per_session=10**12,
        max_cost_per_session_usd=10**6,
        max_cost_per_day_usd=10**6,
        max_tokens_per_model={"m": 10**12},
    )


def agent_budget() -> Any:
    """The real agent-budget package (MIT), imported from where the project keeps it
    (``shared/peers/agent-budget`` beside the checkout, or ``$AGENT_BUDGET``), never copied."""
    given = os.environ.get("AGENT_BUDGET")
    places = [Path(given)] if given else [p / "shared" / "peers" / "agent-budget" for p in HERE.parents]
    for place in places:
        if (place / "agent_budget").is_dir():
            if str(place) not in sys.path:
                sys.path.append(str(place))
            return importlib.import_module("agent_budget")
    raise SystemExit("bench: agent-budget not found (set AGENT_BUDGET to its folder)")


def seed_tracker() -> Any:
    """The seed's own ``Budget`` with the bench's scope and rates (row 5 compares against it)."""
    ab = agent_budget()
    scope = ab.BudgetScope(
        "bench",
        max_tokens_per_session=10**12,
        max_cost_per_session_usd=10**6,
        max_cost_per_day_usd=10**6,
        max_tokens_per_model={"m": 10**12},
    )
    return ab.Budget(scope, {"m": ab.ModelRates(input_per_1k=0.001, output_per_1k=0.002)})


@dataclass(frozen=True)
class Sizes:
    rounds: int
    calls: int  # Redis calls per contender per round
    embedded_calls: int  # in-process calls per contender per round
    fill: int  # charges spread over a simulated day (rows 3, 4, 6)
    batch: int  # pipeline batch while filling
    fleet_rounds: int
    fleet_seconds: float
    fleet_lead: float  # seconds between sending a fleet command and its start
    ledger_fill: int  # charges appended to a ledger (row 4b): the default cap, 100,000
    many: int  # calls per record_many() (row 9)


FULL = Sizes(
    rounds=5,
    calls=3000,
    embedded_calls=20_000,
    fill=1_000_000,
    batch=5000,
    fleet_rounds=3,
    fleet_seconds=1.5,
    fleet_lead=0.2,
    ledger_fill=100_000,
    many=100,
)
QUICK = Sizes(
    rounds=3,
    calls=300,
    embedded_calls=2000,
    fill=20_000,
    batch=5000,
    fleet_rounds=2,
    fleet_seconds=0.25,
    fleet_lead=0.1,
    ledger_fill=10_000,
    many=100,
)


# ---- measuring ------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], n: int) -> dict[str, float]:
    """Calls/s (wall) and this process's CPU µs per call (user + system) over n calls."""
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in itertools.repeat(None, n):
        fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"rate": n / wall, "cpu_us": cpu / n * 1e6}


# Commands of the bench's own around the measured ones: not a script's inner commands. (A budget's
# first call also registers its alert stream with one HSET: once in thousands of calls.)
NOT_INNER = frozenset({"evalsha", "info", "config|resetstat", "ping", "script|load", "script|exists"})


def command_stats(client: Any) -> dict[str, dict[str, int]]:
    """``INFO commandstats``: calls and µs per command (``cmdstat_`` stripped)."""
    return {
        k.removeprefix("cmdstat_"): {"calls": int(v.get("calls", 0)), "usec": int(v.get("usec", 0))}
        for k, v in client.info("commandstats").items()
    }


def timed_server(client: Any, fn: Callable[[], Any], n: int, ops_per_call: int = 1) -> dict[str, Any]:
    """``timed`` plus, from ``INFO commandstats`` (after ``CONFIG RESETSTAT``), the server's µs per
    call and the commands the scripts ran per call (``inner``; their own µs in ``inner_us``)."""
    client.config_resetstat()
    out: dict[str, Any] = timed(fn, n)
    stats = command_stats(client)
    calls, usec = stats.get("evalsha", {}).get("calls", 0), stats.get("evalsha", {}).get("usec", 0)
    if calls != n * ops_per_call:
        print(
            f"  !! expected {n * ops_per_call} EVALSHA, the server counted {calls}: another client's traffic "
            "is in the server figures",
            file=sys.stderr,
        )
    out["server_us"] = usec / n
    inner = {k: v for k, v in stats.items() if k not in NOT_INNER}
    out["inner"] = {k: v["calls"] / n for k, v in inner.items()}
    out["inner_calls"] = sum(out["inner"].values())
    out["inner_us"] = sum(v["usec"] for v in inner.values()) / n
    return out


def interleave(rounds: int, contenders: dict[str, Callable[[], dict[str, float]]]) -> dict[str, list[dict[str, float]]]:
    """Run each contender once per round, reversing the order every other round."""
    names = list(contenders)
    out: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(contenders[name]())
    return out


def med(rows: list[dict[str, float]], field: str) -> float:
    return statistics.median(row[field] for row in rows)


def med_ratio(a: list[dict[str, float]], b: list[dict[str, float]], field: str = "rate") -> float:
    """Median over rounds of a[r] / b[r]."""
    return statistics.median(x[field] / y[field] for x, y in zip(a, b, strict=True))


def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[max(0, math.ceil(q * len(sorted_ns)) - 1)] / 1000


def latencies(fn: Callable[[], Any], n: int, after: Callable[[Any], Any] | None = None) -> dict[str, float]:
    """p50 / p99 µs of n calls (``after`` runs untimed on each result, e.g. committing a hold)."""
    gc.collect()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        res = fn()
        samples.append(clock() - t0)
        if after is not None:
            after(res)
    samples.sort()
    return {"p50": percentile(samples, 0.50), "p99": percentile(samples, 0.99)}


def memory_of(client: Any, match: str) -> dict[str, int]:
    """``MEMORY USAGE`` (exact: SAMPLES 0) of every key matching ``match``: bench keys only."""
    return {
        k.decode(): int(client.memory_usage(k, samples=0) or 0)
        for k in sorted(client.scan_iter(match=match, count=1000))
    }


class CannedEngine:
    """An engine that answers every call with one recorded answer: what a ``Budget`` costs in Python
    alone. With ``raw``, each call still builds the script call (``wire``) and parses the raw reply."""

    def __init__(self, answer: Any = None, raw: Any = None) -> None:
        self.answer = answer
        self.raw = raw
        self.codec = Codec()

    def execute(self, op: Any) -> Any:
        if isinstance(op, Announce):
            return None
        if self.raw is None:
            return self.answer
        return self.codec.encode(op).parse(self.raw)


# ---- a redis-server of our own --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def own_redis() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server not found: install it (apt-get install redis-server) or pass --redis URL")
    tmp = tempfile.mkdtemp(prefix="distbudget-bench-")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = connect(url)
        for _ in range(200):
            try:
                client.ping()
                break
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError("redis-server exited at start") from None
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not answer")
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the fleet: worker processes that record (or run the trivial script) for a fixed time ---------


def fleet_worker(idx: int, url: str, prefix: str, commands: Any, results: Any) -> None:
    try:
        budget = Budget(bench_scope(), RATES, redis=url, prefix=prefix, session_id=f"w{idx}")
        trivial = budget.engine.client.register_script("return 1")
        ops = {"record": lambda: budget.record(None, "m", IN_TOKENS, OUT_TOKENS), "trivial": trivial}
        for op in ops.values():  # loads the scripts, opens the connection
            op()
        results.put(("ready", idx, 0))
        while (cmd := commands.get()) is not None:
            kind, start_at, seconds = cmd
            op, end_at, count = ops[kind], start_at + seconds, 0
            time.sleep(max(0.0, start_at - time.time()))
            while time.time() < end_at:
                op()
                count += 1
            results.put((kind, idx, count))
    except BaseException:  # tell the parent at once instead of letting it wait for a count
        results.put(("error", idx, traceback.format_exc()))


def fleet_result(results: Any) -> tuple[str, int, int]:
    kind, idx, value = results.get(timeout=120)
    if kind == "error":
        raise RuntimeError(f"fleet worker {idx} failed:\n{value}")
    return kind, idx, value


def fleet(url: str, prefix: str, sizes: Sizes) -> dict[int, dict[str, list[float]]]:
    """Aggregate calls/s of n processes (spawned once, the first n run) recording vs trivial EVALSHA."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    queues = [ctx.Queue() for _ in range(max(FLEET_SIZES))]
    procs = [
        ctx.Process(target=fleet_worker, args=(i, url, prefix, q, results), daemon=True) for i, q in enumerate(queues)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            fleet_result(results)
        out: dict[int, dict[str, list[float]]] = {}
        for n in FLEET_SIZES:
            out[n] = {"record": [], "trivial": []}
            for r in range(sizes.fleet_rounds):
                for kind in ("record", "trivial") if r % 2 == 0 else ("trivial", "record"):
                    start_at = time.time() + sizes.fleet_lead
                    for q in queues[:n]:
                        q.put((kind, start_at, sizes.fleet_seconds))
                    total = sum(fleet_result(results)[2] for _ in range(n))
                    out[n][kind].append(total / sizes.fleet_seconds)
        return out
    finally:
        for q in queues:
            q.put(None)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()


# ---- the peers' simulated day (a separate process: the fill is client-bound) ----------------------


def naive_key(run_id: str) -> str:
    return f"{run_id}-naive:day"


def limits_setup(url: str, run_id: str) -> tuple[Any, Any, dict[str, list[str]]]:
    """(storage, rate limit item, keys of each strategy) for the bench's ``limits`` contenders."""
    from limits import RateLimitItemPerDay
    from limits.storage import RedisStorage

    storage = RedisStorage(url, key_prefix=f"{run_id}-limits")
    item = RateLimitItemPerDay(LIMITS_LIMIT_UNITS)
    swc = item.key_for("swc")
    keys = {
        "limits_moving": [storage.prefixed_key(item.key_for("mw"))],
        "limits_sliding": [
            storage.prefixed_key(storage._previous_window_key(swc)),
            storage.prefixed_key(storage._current_window_key(swc)),
        ],
    }
    return storage, item, keys


def fill_peers(url: str, run_id: str, times: list[float], batch: int) -> dict[str, Any]:
    """Charge each peer once per time in ``times`` with its own script, pipelined, exactly as its
    per-call API would (same keys, same arguments); return the seconds taken and the keys' memory."""
    client = connect(url)
    tokens = IN_TOKENS + OUT_TOKENS
    nano = Budget(bench_scope(), RATES)._core.usage("m", IN_TOKENS, OUT_TOKENS)[1]
    naive = NaiveZsetBudget(client, naive_key(run_id))
    storage, item, keys = limits_setup(url, run_id)
    cost, expiry, limit = tokens // LIMITS_UNIT_TOKENS, item.get_expiry(), item.amount
    conn = storage.get_connection()
    # The moving window takes the client's time.time() (here the simulated day); the sliding window
    # counter reads the server's clock (its two counters hold the same bytes whatever the day was).
    plans: list[tuple[str, Any, Any, Callable[[float], list[Any]]]] = [
        ("naive", client, naive.script, lambda t: [naive.key, *naive.args(int(t * 1000), tokens, nano)]),
        (
            "limits_moving",
            conn,
            storage.lua_acquire_moving_window,
            lambda t: [*keys["limits_moving"], t, limit, expiry, cost],
        ),
        (
            "limits_sliding",
            conn,
            storage.lua_acquire_sliding_window,
            lambda _t: [*keys["limits_sliding"], limit, expiry, cost],
        ),
    ]
    out: dict[str, Any] = {"seconds": {}}
    for name, redis_client, script, argv in plans:
        t0 = time.perf_counter()
        redis_client.script_load(script.script)
        nkeys = len(keys.get(name, [naive.key]))
        for lo in range(0, len(times), batch):
            pipe = redis_client.pipeline(transaction=False)
            for t in times[lo : lo + batch]:
                pipe.execute_command("EVALSHA", script.sha, nkeys, *argv(t))
            if not all(pipe.execute()):
                raise RuntimeError(f"{name} refused a charge: the bench limit is too low")
        out["seconds"][name] = time.perf_counter() - t0
    out["memory_naive"] = memory_of(client, f"{run_id}-naive:*")
    for name, ks in keys.items():
        out[f"memory_{name}"] = {k: int(client.memory_usage(k, samples=0) or 0) for k in ks}
    client.close()
    conn.close()
    return out


# ---- the benchmark --------------------------------------------------------------------------------


class Bench:
    def __init__(self, url: str, sizes: Sizes, own_server: bool) -> None:
        self.url = url
        self.sizes = sizes
        self.own_server = own_server
        self.client = connect(url)
        self.run_id = f"dbbench-{uuid.uuid4().hex[:10]}"
        self.trivial = self.client.register_script("return 1")
        self.raw: dict[str, Any] = {}
        self.started = time.perf_counter()

    def budget(self, name: str, **options: Any) -> Budget:
        return Budget(
            bench_scope(), RATES, redis=self.client, prefix=f"{self.run_id}-{name}", session_id=SESSION, **options
        )

    def say(self, what: str) -> None:
        print(f"  {time.perf_counter() - self.started:5.0f} s  {what}", file=sys.stderr, flush=True)

    # rows 1, 2: one client, one round trip each, against the trivial script; with, in the same
    # rounds, the client-side parts of a record() measured without I/O (CPU time) --------------------
    def round_trips(self) -> None:
        self.say("record() (ledger on / off) / reserve()+commit() / trivial EVALSHA, same client")
        b, n = self.budget("rt"), self.sizes.calls
        nl = self.budget("rtnl", ledger_maxlen=0)
        record = lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS)  # noqa: E731
        record_nl = lambda: nl.record(SESSION, "m", IN_TOKENS, OUT_TOKENS)  # noqa: E731
        pair = lambda: b.reserve("m", IN_TOKENS, OUT_TOKENS).commit(IN_TOKENS, OUT_TOKENS)  # noqa: E731
        for fn in (record, record_nl, pair, self.trivial):
            fn()
        # distbudget's own Python per record(): the flow against canned raw replies (wire + parse included)
        call = wire(b._core.record(SESSION, "m", IN_TOKENS, OUT_TOKENS).op)
        keys, argv = call.keys, call.argv
        script = b.engine.scripts[call.script]
        raw_reply = script(keys=keys, args=argv)
        canned = Budget(bench_scope(), RATES, session_id=SESSION, _engine=CannedEngine(raw=raw_reply))
        record_cmd = ("EVALSHA", script.sha, len(keys), *keys, *argv)
        trivial_cmd = ("EVALSHA", self.trivial.sha, 0)
        self.raw["record_command_args"] = len(record_cmd)
        conn = self.client.connection_pool.get_connection()
        try:
            self.raw["round_trips"] = interleave(
                self.sizes.rounds,
                {
                    "record": lambda: timed_server(self.client, record, n),
                    "record_noledger": lambda: timed_server(self.client, record_nl, n),
                    "trivial": lambda: timed_server(self.client, self.trivial, n),
                    "reserve_commit": lambda: timed_server(self.client, pair, n, ops_per_call=2),
                    # the same script call record() makes, sent straight through redis-py (no distbudget Python)
                    "raw_record": lambda: timed_server(self.client, lambda: script(keys=keys, args=argv), n),
                    "redis_flow": lambda: timed(lambda: canned.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n),
                    "pack_record": lambda: timed(lambda: conn.pack_command(*record_cmd), n),
                    "pack_trivial": lambda: timed(lambda: conn.pack_command(*trivial_cmd), n),
                },
            )
        finally:
            self.client.connection_pool.release(conn)

    # row 8: single-client latency -------------------------------------------------------------------
    def latency(self) -> None:
        self.say("latency of record() and reserve()")
        b, n = self.budget("lat"), self.sizes.calls
        b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS)
        self.raw["latency"] = interleave(
            self.sizes.rounds,
            {
                "record": lambda: latencies(lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n),
                "reserve": lambda: latencies(
                    lambda: b.reserve("m", IN_TOKENS, OUT_TOKENS),
                    n,
                    after=lambda hold: hold.commit(IN_TOKENS, OUT_TOKENS),
                ),
            },
        )

    # row 5: embedded engine vs the seed's architecture ------------------------------------------------
    def embedded(self) -> None:
        self.say("embedded record() vs agent-budget's own record()")
        n = self.sizes.embedded_calls
        probe = Budget(bench_scope(), RATES, session_id=SESSION)
        usage = probe._core.usage("m", IN_TOKENS, OUT_TOKENS)
        answer = probe.engine.execute(
            Record(probe._core.plan(SESSION, "m"), None, usage, None, probe._core.request_ttl_ms, 0, "")
        )

        def run_embedded(ledger_maxlen: int = 100_000) -> dict[str, float]:
            b = Budget(bench_scope(), RATES, session_id=SESSION, ledger_maxlen=ledger_maxlen)
            return timed(lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n)

        def run_flow() -> dict[str, float]:  # the same Budget with the engine's answer canned
            b = Budget(bench_scope(), RATES, session_id=SESSION, _engine=CannedEngine(answer=answer))
            return timed(lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n)

        def run_seed() -> dict[str, float]:
            t = seed_tracker()
            return timed(lambda: t.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n)

        self.raw["embedded"] = interleave(
            self.sizes.rounds,
            {
                "distbudget": run_embedded,
                "distbudget_noledger": lambda: run_embedded(0),
                "seed": run_seed,
                "flow_only": run_flow,
            },
        )

    # row 10: many asyncio tasks of one process, coalesced (batch_window_us) ------------------------
    def coalescing(self) -> None:
        self.say(f"{TASKS} asyncio tasks recording, coalesced or not, vs a trivial EVALSHA loop")
        n = self.sizes.calls

        def tasks(window: int | None) -> dict[str, float]:
            async def main() -> dict[str, float]:
                b = AsyncBudget(
                    bench_scope(),
                    RATES,
                    redis=self.url,
                    prefix=f"{self.run_id}-co",
                    session_id=SESSION,
                    batch_window_us=window,
                )
                await b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS)
                per = max(1, n // TASKS)

                async def task() -> None:
                    for _ in range(per):
                        await b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS)

                gc.collect()
                t0 = time.perf_counter()
                await asyncio.gather(*(task() for _ in range(TASKS)))
                rate = per * TASKS / (time.perf_counter() - t0)
                await b.engine.client.aclose()
                return {"rate": rate}

            return asyncio.run(main())

        self.raw["coalescing"] = interleave(
            self.sizes.rounds,
            {"coalesced": lambda: tasks(0), "alone": lambda: tasks(None), "trivial": lambda: timed(self.trivial, n)},
        )

    # rows 3, 4, 6: a simulated day of traffic ------------------------------------------------------
    def fill(self) -> None:
        """The same number of charges, spread evenly over the 24 h ending now, into each contender,
        each with its own script, pipelined. The peers' fill is bound by the client (packing
        commands), distbudget's by the server (its Lua): the peers' runs in another process."""
        n = self.sizes.fill
        sec, usec = self.client.time()
        end = sec + usec / 1e6
        times = [end - DAY + (i + 1) * DAY / n for i in range(n)]  # seconds, the last one now
        self.say(f"filling distbudget, limits and the naive sorted set with {n:,} charges over a simulated day")
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            peers = pool.submit(fill_peers, self.url, self.run_id, times, self.sizes.batch)
            t0 = time.perf_counter()
            self.fill_distbudget(times)
            seconds = {"distbudget": time.perf_counter() - t0}
            filled = peers.result()
        self.raw["fill_seconds"] = {**seconds, **filled.pop("seconds")}
        self.raw.update(filled)

    def fill_distbudget(self, times: list[float]) -> None:
        """Pipelined batches on two connections at once, so one batch's commands are packed while the
        server runs the other's."""
        batch = self.sizes.batch

        def run_batch(lo: int) -> None:
            clock = [0.0]
            b = self.budget("full", clock=lambda: clock[0])  # the injected clock walks the simulated day
            plan, usage = b._core.plan(SESSION, "m"), b._core.usage("m", IN_TOKENS, OUT_TOKENS)
            pipe = self.client.pipeline(transaction=False)
            for t in times[lo : lo + batch]:
                clock[0] = t
                # the counters' memory: the ledger (a capped audit stream, ledger_maxlen) is measured apart
                call = wire(Record(plan, b._core.now_us(), usage, None, 0, 0, ""))
                b.engine.scripts[call.script](keys=call.keys, args=call.argv, client=pipe)
            pipe.execute()

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(run_batch, range(0, len(times), batch)))
        self.raw["memory_distbudget"] = memory_of(self.client, f"{self.run_id}-full:*")
        zkeys = [k for k in self.raw["memory_distbudget"] if ":z:" in k]
        wkeys = [k for k in self.raw["memory_distbudget"] if ":w:" in k]
        self.raw["day_buckets"] = sum(self.client.zcard(k) for k in zkeys)
        self.raw["window_hash"] = {
            k: {"fields": self.client.hlen(k), "encoding": self.client.object("encoding", k).decode()} for k in wkeys
        }

    def peers(self) -> None:
        from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

        self.say("calls/s of distbudget and its peers on the filled keys")
        n, full = self.sizes.calls, self.budget("full")  # the filled scope, now on the server's clock
        storage, item, _keys = limits_setup(self.url, self.run_id)
        moving, sliding = MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage)
        naive = NaiveZsetBudget(self.client, naive_key(self.run_id))
        cost = (IN_TOKENS + OUT_TOKENS) // LIMITS_UNIT_TOKENS
        nano = full._core.usage("m", IN_TOKENS, OUT_TOKENS)[1]
        self.raw["peers"] = interleave(
            self.sizes.rounds,
            {
                "distbudget": lambda: timed(lambda: full.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n),
                "limits_moving": lambda: timed(lambda: moving.hit(item, "mw", cost=cost), n),
                "limits_sliding": lambda: timed(lambda: sliding.hit(item, "swc", cost=cost), n),
                "naive": lambda: timed(lambda: naive.hit(IN_TOKENS + OUT_TOKENS, nano), n),
            },
        )
        storage.get_connection().close()
        # the peers' big keys go now: the server figures and the fleet meet the server the others did
        for match in (f"{self.run_id}-naive:*", f"{self.run_id}-limits:*"):
            for key in list(self.client.scan_iter(match=match, count=1000)):
                self.client.unlink(key)

    def server_time(self) -> None:
        self.say("server µs per charge: empty vs full window, ledger on and off")
        n, rnd = self.sizes.calls, itertools.count()
        full, full_nl = self.budget("full"), self.budget("full", ledger_maxlen=0)

        def empty(**options: Any) -> dict[str, float]:
            b = self.budget(f"empty{next(rnd)}", **options)
            return timed_server(self.client, lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n)

        def filled(b: Budget) -> dict[str, float]:
            return timed_server(self.client, lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n)

        floor = self.client.register_script(FLOOR_LUA)
        fb = self.budget("floor")
        fcall = wire(fb._core.record(SESSION, "m", IN_TOKENS, OUT_TOKENS).op)
        fkeys, fargv = fcall.keys, fcall.argv
        floor(keys=fkeys, args=fargv)

        self.raw["server_time"] = interleave(
            self.sizes.rounds,
            {
                "empty": empty,
                "full": lambda: filled(full),
                "empty_noledger": lambda: empty(ledger_maxlen=0),
                "full_noledger": lambda: filled(full_nl),
                "floor": lambda: timed_server(self.client, lambda: floor(keys=fkeys, args=fargv), n),
            },
        )

    # row 4b: the ledger's memory --------------------------------------------------------------------
    def ledger_memory(self) -> None:
        """The ledger stream of a scope tree after ``ledger_fill`` charges (pipelined record scripts
        with their real entries): its ``MEMORY USAGE`` per entry."""
        n = self.sizes.ledger_fill
        self.say(f"the ledger's memory: {n:,} charges")
        b = self.budget("ledger")
        script = b.engine.scripts["record"]
        for lo in range(0, n, self.sizes.batch):
            pipe = self.client.pipeline(transaction=False)
            for _ in range(min(self.sizes.batch, n - lo)):
                op = b._core.record(SESSION, "m", IN_TOKENS, OUT_TOKENS).op
                call = wire(op)
                script(keys=call.keys, args=call.argv, client=pipe)
            pipe.execute()
        key = b._core.keyspace.ledger
        self.raw["ledger_memory"] = {
            "entries": int(self.client.xlen(key)),
            "bytes": int(self.client.memory_usage(key, samples=0) or 0),
            "entry_json": len(op.ledger_entry.encode()),
            "maxlen": b._core.ledger_maxlen,
        }
        self.client.unlink(key)

    # row 9: record_many() ------------------------------------------------------------------------------
    def record_many(self) -> None:
        self.say(f"record_many() of {self.sizes.many} calls vs record(), Redis and embedded")
        b, emb = self.budget("many"), Budget(bench_scope(), RATES, session_id=SESSION)
        n, k = self.sizes.calls, self.sizes.many
        calls = [(SESSION, "m", IN_TOKENS, OUT_TOKENS)] * k
        for budget in (b, emb):
            budget.record_many(calls)

        def batches(budget: Budget, count: int) -> dict[str, float]:
            out = timed(lambda: budget.record_many(calls), max(1, count // k))
            return {"rate": out["rate"] * k, "cpu_us": out["cpu_us"] / k}  # charges/s, CPU µs per charge

        emb_n = self.sizes.embedded_calls
        self.raw["record_many"] = interleave(
            self.sizes.rounds,
            {
                "redis_many": lambda: batches(b, n * 4),
                "redis_one": lambda: timed(lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n),
                "embedded_many": lambda: batches(emb, emb_n),
                "embedded_one": lambda: timed(lambda: emb.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), emb_n),
            },
        )

    def fleet(self) -> None:
        self.say(f"fleet of {', '.join(map(str, FLEET_SIZES))} processes")
        self.raw["fleet"] = fleet(self.url, f"{self.run_id}-fleet", self.sizes)
        self.say("redis-benchmark's EVALSHA ceiling on the same server")
        self.raw["fleet_ceiling"] = [self.evalsha_ceiling() for _ in range(self.sizes.fleet_rounds)]
        self.say("done")

    def evalsha_ceiling(self) -> float:
        """What Redis itself does: ``redis-benchmark`` (C, 50 connections) calling the trivial script."""
        exe = shutil.which("redis-benchmark")
        if exe is None:
            raise SystemExit("bench: redis-benchmark not found (it ships with redis-server)")
        u = urllib.parse.urlsplit(self.url)
        cmd = [exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-c", "50"]
        if u.password:
            cmd += ["-a", urllib.parse.unquote(u.password), *(["--user", u.username] if u.username else [])]
        cmd += ["-n", str(self.sizes.calls * 20), "--csv", "EVALSHA", self.trivial.sha, "0"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
        return float(next(line for line in out.splitlines() if line.startswith('"EVALSHA')).split('","')[1])

    def cleanup(self) -> None:
        if not self.own_server:  # a server we did not start: delete our keys, nothing else
            for key in list(self.client.scan_iter(match=f"{self.run_id}-*", count=1000)):
                self.client.unlink(key)
        self.client.close()


# ---- the report -----------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    measure: str
    values: list[float]  # the numbers of the result cell (each must be finite and positive)
    result: str
    target: str
    verdict: str
    detail: str


def n0(x: float) -> str:
    return f"{x:,.0f}"


def kb(x: float) -> str:
    return f"{x / 1024:,.1f} KB" if x < 1024**2 else f"{x / 1024**2:,.1f} MB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def inner_text(runs: list[dict[str, Any]]) -> str:
    """The commands a script ran per charge (median over rounds): total, then each."""
    per = {k: statistics.median(r["inner"].get(k, 0) for r in runs) for k in {k for r in runs for k in r["inner"]}}
    each = ", ".join(f"{k.upper()} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.005)
    return f"{med(runs, 'inner_calls'):.2f} Redis commands per charge ({each})"


def build_rows(raw: dict[str, Any], sizes: Sizes) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    rt = raw["round_trips"]
    rec, triv, pair, rec_nl = rt["record"], rt["trivial"], rt["reserve_commit"], rt["record_noledger"]
    us = {k: 1e6 / med(v, "rate") for k, v in (("record", rec), ("trivial", triv), ("noledger", rec_nl))}
    cpu = {k: med(v, "cpu_us") for k, v in (("record", rec), ("trivial", triv), ("noledger", rec_nl))}
    srv = {k: med(v, "server_us") for k, v in (("record", rec), ("trivial", triv), ("noledger", rec_nl))}
    for rid, what, runs, key in (
        ("1a", "ledger on (the default, `ledger_maxlen=100_000`)", rec, "record"),
        ("1b", "ledger off (`ledger_maxlen=0`)", rec_nl, "noledger"),
    ):
        ratio = med_ratio(runs, triv)
        rows.append(
            Row(
                rid,
                f"`record()` on Redis, {what}, ÷ trivial `EVALSHA` (`return 1`), same client",
                [ratio],
                f"{ratio:.2f}×",
                "≥ 0.85",
                verdict(ratio >= 0.85),
                f"{n0(med(runs, 'rate'))} vs {n0(med(triv, 'rate'))} calls/s; "
                f"{us[key]:.1f} vs {us['trivial']:.1f} µs per call; server {srv[key]:.1f} µs, "
                f"client CPU {cpu[key]:.1f} µs",
            )
        )
    r2 = med_ratio(pair, rec)
    rows.append(
        Row(
            "2",
            "`reserve()`+`commit()` pairs/s ÷ `record()`/s",
            [r2],
            f"{r2:.2f}×",
            "≈ 0.5 (2 round trips vs 1)",
            "as expected" if 0.4 <= r2 <= 0.6 else "note",
            f"{n0(med(pair, 'rate'))} pairs/s; server {med(pair, 'server_us'):.1f} µs per pair",
        )
    )

    st = raw["server_time"]
    for ids, label, e_key, f_key in (
        (("3a", "3b", "3c"), "ledger on", "empty", "full"),
        (("3e", "3f", "3g"), "ledger off", "empty_noledger", "full_noledger"),
    ):
        empty, full = med(st[e_key], "server_us"), med(st[f_key], "server_us")
        flat = med_ratio(st[f_key], st[e_key], "server_us")
        rows.append(
            Row(
                ids[0],
                f"server µs per charge (`cmdstat_evalsha`), {label}, empty window",
                [empty],
                f"{empty:.1f} µs",
                "≤ 25 µs",
                verdict(empty <= 25),
                f"session + day + per-model limits, fresh scope; {inner_text(st[e_key])}",
            )
        )
        rows.append(
            Row(
                ids[1],
                f"server µs per charge, {label}, {sizes.fill:,} charges in the day window",
                [full],
                f"{full:.1f} µs",
                "≤ 25 µs",
                verdict(full <= 25),
                f"{raw['day_buckets']} buckets in the day window; its hash: "
                + ", ".join(f"{h['fields']} fields, {h['encoding']}" for h in raw["window_hash"].values()),
            )
        )
        rows.append(
            Row(
                ids[2],
                f"server time, {label}, full ÷ empty window",
                [flat],
                f"{flat:.2f}×",
                "0.90–1.10 (flat ±10 %)",
                verdict(0.9 <= flat <= 1.1),
                "median of per-round ratios",
            )
        )
        if ids[0] == "3a":
            rows.append(
                Row(
                    "3d",
                    "server µs per trivial `EVALSHA` (reference)",
                    [srv["trivial"]],
                    f"{srv['trivial']:.1f} µs",
                    "—",
                    "—",
                    "the floor of any script call",
                )
            )

    fl = st["floor"]
    floor_us, logic_us = med(fl, "server_us"), med(st["full"], "server_us") - med(fl, "server_us")
    rows.append(
        Row(
            "3h",
            "server µs per call of a script issuing record's commands with constant arguments (reference)",
            [floor_us],
            f"{floor_us:.1f} µs",
            "—",
            "—",
            f"{inner_text(fl)}, the same KEYS and ARGV, no accounting logic: the floor of this work on this "
            f"machine; record's logic adds {logic_us:.1f} µs to it (row 3b)",
        )
    )

    mem = raw["memory_distbudget"]
    total = sum(mem.values())
    parts = ", ".join(f"`{k.split(':', 2)[2]}` {kb(v)}" for k, v in mem.items())
    rows.append(
        Row(
            "4",
            f"memory per scope after {sizes.fill:,} charges over a simulated day",
            [total],
            kb(total),
            "≤ 64 KB",
            verdict(total <= MEMORY_TARGET),
            f"{len(mem)} keys: {parts} (the counters; the ledger, a capped audit stream, is row 4b)",
        )
    )
    lm = raw["ledger_memory"]
    per_entry = lm["bytes"] / max(lm["entries"], 1)
    rows.append(
        Row(
            "4b",
            f"the ledger's memory per charge (`MEMORY USAGE` of the stream after {lm['entries']:,} charges)",
            [per_entry, per_entry * lm["maxlen"]],
            f"{per_entry:,.0f} B per entry · {kb(per_entry * lm['maxlen'])} at the cap",
            "—",
            "—",
            f"one stream per scope tree, capped at `ledger_maxlen` ({lm['maxlen']:,}, approximate MAXLEN); "
            f"an entry: a {lm['entry_json']}-byte JSON and 4 numbers; `ledger_maxlen=0` keeps none",
        )
    )

    emb = raw["embedded"]
    for rid, key, label in (("5a", "distbudget", "ledger on"), ("5b", "distbudget_noledger", "ledger off")):
        r5 = med_ratio(emb[key], emb["seed"])
        rows.append(
            Row(
                rid,
                f"embedded `record()`, {label}, ÷ agent-budget's own `record()` (imported, same scope and rates)",
                [r5],
                f"{r5:.2f}×",
                "≥ 1.0",
                verdict(r5 >= 1.0),
                f"{n0(med(emb[key], 'rate'))} vs {n0(med(emb['seed'], 'rate'))} calls/s; "
                f"{1e6 / med(emb[key], 'rate'):.1f} vs {1e6 / med(emb['seed'], 'rate'):.1f} µs per call",
            )
        )

    pe = raw["peers"]
    ref = med(pe["distbudget"], "rate")
    n = sizes.fill
    for rid, key, name, mem_key, how in (
        (
            "6a",
            "distbudget",
            "distbudget `record()` (4 limits, one script)",
            "memory_distbudget",
            f"bounded: {raw['day_buckets']} buckets in the day window, whatever the traffic",
        ),
        (
            "6b",
            "limits_moving",
            "`limits` MovingWindowRateLimiter, `hit(cost=5)`",
            "memory_limits_moving",
            f"one list entry per unit ({LIMITS_UNIT_TOKENS} tokens): grows with traffic × cost until the limit "
            "(trimmed by count, not time)",
        ),
        (
            "6c",
            "limits_sliding",
            "`limits` SlidingWindowCounterRateLimiter, `hit(cost=5)`",
            "memory_limits_sliding",
            "fixed: 2 counters; the window is approximated (previous window weighted)",
        ),
        (
            "6d",
            "naive",
            "naive sorted set, one member per call (ZADD/ZREMRANGEBYSCORE/ZCARD/PEXPIRE)",
            "memory_naive",
            "one member per call: grows with traffic",
        ),
    ):
        rate = med(pe[key], "rate")
        size = sum(raw[mem_key].values())
        speed = (
            f"{med_ratio(pe[key], pe['distbudget']):.2f}× distbudget's calls/s"
            if key != "distbudget"
            else "the reference for the ratios below"
        )
        rows.append(
            Row(
                rid,
                name,
                [rate, size],
                f"{n0(rate)} calls/s · {kb(size)}",
                "—",
                "—",
                f"{speed}; {size / n:,.1f} B per charge after {n:,}; {how}",
            )
        )
    notes.append(
        f"Row 6: every contender charges the same {n:,} calls (500 tokens each) spread over a simulated "
        f"24 h ending when the fill starts (each contender's own script, pipelined), then is timed "
        f"calling its own API on those keys (distbudget: {n0(ref)} calls/s). One `limits` call enforces "
        "one limit; distbudget's record() charges and checks session tokens, session cost, day cost and "
        "model tokens in its one round trip. The naive script only counts calls (ZCARD): summing tokens "
        "or cost would read every member on every call."
    )

    fl, ceiling = raw["fleet"], statistics.median(raw["fleet_ceiling"])
    for size in FLEET_SIZES:
        recs, trivs = fl[size]["record"], fl[size]["trivial"]
        ratio = statistics.median(a / b for a, b in zip(recs, trivs, strict=True))
        rows.append(
            Row(
                f"7.{size}",
                f"fleet, {size} process{'es' if size > 1 else ''}: charges/s ÷ `redis-benchmark`'s `EVALSHA` ceiling",
                [statistics.median(recs) / ceiling],
                f"{statistics.median(recs) / ceiling:.2f}×",
                "—",
                "—",
                f"{n0(statistics.median(recs))} charges/s aggregate vs {n0(ceiling)} trivial `EVALSHA`/s from "
                f"`redis-benchmark` (50 connections); the same processes' trivial `EVALSHA` loops: "
                f"{n0(statistics.median(trivs))}/s ({ratio:.2f}× of it charged)",
            )
        )

    lat = raw["latency"]
    for rid, key in (("8a", "record"), ("8b", "reserve")):
        p50, p99 = med(lat[key], "p50"), med(lat[key], "p99")
        rows.append(
            Row(
                rid,
                f"latency of `{key}()`, single client: p50 / p99",
                [p50, p99],
                f"{p50:.0f} / {p99:.0f} µs",
                "—",
                "—",
                f"{sizes.calls:,} calls per round",
            )
        )

    rm = raw["record_many"]
    for rid, where, many_key, one_key in (
        ("9a", "Redis", "redis_many", "redis_one"),
        ("9b", "embedded", "embedded_many", "embedded_one"),
    ):
        ratio = med_ratio(rm[many_key], rm[one_key])
        rows.append(
            Row(
                rid,
                f"`record_many()` of {sizes.many} calls, {where}: charges/s ÷ `record()` calls/s",
                [ratio],
                f"{ratio:.2f}×",
                "—",
                "—",
                f"{n0(med(rm[many_key], 'rate'))} vs {n0(med(rm[one_key], 'rate'))} charges/s; client CPU "
                f"{med(rm[many_key], 'cpu_us'):.1f} vs {med(rm[one_key], 'cpu_us'):.1f} µs per charge"
                + ("; one pipelined round trip per batch, each charge its own script" if where == "Redis" else ""),
            )
        )

    co = raw["coalescing"]
    for rid, key, label, target in (
        ("10a", "coalesced", "coalesced (`batch_window_us=0`)", 2.0),
        ("10b", "alone", "each call its own round trip (the default)", 0.0),
    ):
        ratio = med_ratio(co[key], co["trivial"])
        rows.append(
            Row(
                rid,
                f"{TASKS} asyncio tasks `record()`ing, {label}: calls/s ÷ a trivial `EVALSHA` loop on one connection",
                [ratio],
                f"{ratio:.2f}×",
                f"≥ {target:.1f}" if target else "—",
                verdict(ratio >= target) if target else "—",
                f"{n0(med(co[key], 'rate'))} vs {n0(med(co['trivial'], 'rate'))} calls/s"
                + ("; one pipelined round trip per batch, each charge its own script" if target else ""),
            )
        )

    raw_call = rt["raw_record"]
    gap = us["record"] - us["trivial"]
    raw_us, raw_cpu, raw_srv = 1e6 / med(raw_call, "rate"), med(raw_call, "cpu_us"), med(raw_call, "server_us")
    flow, pack_rec, pack_triv = (med(rt[k], "cpu_us") for k in ("redis_flow", "pack_record", "pack_trivial"))
    notes.append(
        f"Where `record()`'s time goes (row 1a, medians, µs per call): wall {us['record']:.1f} vs "
        f"{us['trivial']:.1f} for the trivial script, +{gap:.1f} where the target allows "
        f"+{us['trivial'] * (1 / 0.85 - 1):.1f}. (a) The script call itself — the same `EVALSHA`, keys and "
        f"ARGV sent straight through redis-py — takes {raw_us:.1f} (+{raw_us - us['trivial']:.1f}): server "
        f"{raw_srv:.1f} vs {srv['trivial']:.1f} (+{raw_srv - srv['trivial']:.1f}), client CPU {raw_cpu:.1f} vs "
        f"{cpu['trivial']:.1f} (+{raw_cpu - cpu['trivial']:.1f}; redis-py packing the "
        f"{raw['record_command_args']}-argument command alone is {pack_rec:.1f} vs {pack_triv:.1f} in a hot "
        f"loop). (b) distbudget's Python around it adds +{us['record'] - raw_us:.1f} wall, "
        f"+{cpu['record'] - raw_cpu:.1f} client CPU ({flow:.1f} in a hot loop against a canned reply: flow, "
        "validation, `wire()`, parsing). The ledger (1a vs 1b) costs "
        f"{us['record'] - us['noledger']:+.1f} wall, {srv['record'] - srv['noledger']:+.1f} server."
    )
    st = raw["server_time"]
    for key, label in (("full", "ledger on"), ("full_noledger", "ledger off")):
        runs = st[key]
        server, inner_us = med(runs, "server_us"), med(runs, "inner_us")
        notes.append(
            f"Where the server's time goes (row {'3b' if key == 'full' else '3f'}, {label}, µs per charge): "
            f"{server:.1f} in all; the Redis commands the script runs ({inner_text(runs)}) take "
            f"{inner_us:.1f} inside their own command functions; the other {server - inner_us:.1f} are Lua: "
            "the interpreter running the script, each `redis.call()`'s conversions of its arguments and reply, "
            "and setting up KEYS/ARGV."
        )
    emb_us, flow_us = 1e6 / med(emb["distbudget"], "rate"), med(emb["flow_only"], "cpu_us")
    emb_nl = 1e6 / med(emb["distbudget_noledger"], "rate")
    notes.append(
        f"Where embedded `record()`'s time goes (rows 5a/5b, µs per call): {emb_us:.1f} in all with the "
        f"ledger ({emb_nl:.1f} without), of which the flow alone (validation, plan, the record, alerts, "
        f"the ledger entry's JSON; the engine's answer canned) {flow_us:.1f} and the memory engine the "
        f"remaining {emb_us - flow_us:.1f}; agent-budget's `record()` takes "
        f"{1e6 / med(emb['seed'], 'rate'):.1f}."
    )
    return rows, notes


def environment(client: Any, url: str, own_server: bool) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": f"{cpu} × {os.cpu_count()} logical cores",
        "redis": client.info("server")["redis_version"],
        "server": 'own redis-server on loopback (--save "" --appendonly no)' if own_server else url,
        "redis-py": version("redis"),
        "limits": version("limits"),
        "distbudget": version("distbudget"),
    }


def markdown(rows: list[Row], notes: list[str], env: dict[str, str], sizes: Sizes, quick: bool) -> str:
    cmd = "python bench/run.py" + (" --quick" if quick else "")
    out = [
        "# distbudget benchmark results",
        "",
        f"Generated by `{cmd}` on {env['date']}. {'**Quick run (tiny sizes): not representative.** ' if quick else ''}"
        f"Medians of {sizes.rounds} interleaved rounds ({sizes.fleet_rounds} for the fleet); ratios are taken "
        "round by round.",
        "",
        f"- platform: {env['platform']}, Python {env['python']}",
        f"- CPU: {env['cpu']}",
        f"- Redis {env['redis']}: {env['server']}; redis-py {env['redis-py']}, limits {env['limits']}, "
        f"distbudget {env['distbudget']}",
        f"- every charge: 500 tokens on model `m` against a scope with session tokens, session cost, day cost "
        f"and per-model token limits; {sizes.calls:,} Redis calls per contender per round, "
        f"{sizes.embedded_calls:,} in-process",
        "",
        "| # | measure | result | target | verdict | detail |",
        "|---|---|---|---|---|---|",
    ]
    out += [f"| {r.id} | {r.measure} | {r.result} | {r.target} | {r.verdict} | {r.detail} |" for r in rows]
    out += ["", *(f"{note}\n" for note in notes)]
    missed = [r.id for r in rows if "missed" in r.verdict]
    out.append(f"Targets missed: {', '.join(missed)}." if missed else "Every target met.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, ~30 s)")
    ap.add_argument("--redis", metavar="URL", help="use this server (default: start our own redis-server)")
    ap.add_argument("--out", type=Path, default=HERE / "results.md", help="the Markdown table (%(default)s)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also dump every raw number as JSON here")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()

    with own_redis() if args.redis is None else _given(args.redis) as url:
        bench = Bench(url, sizes, own_server=args.redis is None)
        try:
            env = environment(bench.client, url, bench.own_server)
            bench.round_trips()
            bench.latency()
            bench.embedded()
            bench.fill()
            bench.peers()
            bench.server_time()
            bench.ledger_memory()
            bench.record_many()
            bench.coalescing()
            bench.fleet()
        finally:
            bench.cleanup()

    rows, notes = build_rows(bench.raw, sizes)
    text = markdown(rows, notes, env, sizes, args.quick)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"(written to {args.out}; {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"environment": env, "sizes": asdict(sizes), "raw": bench.raw, "rows": [asdict(r) for r in rows]},
                indent=1,
                default=str,
            ),
            encoding="utf-8",
        )
    return 0


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    sys.exit(main())
