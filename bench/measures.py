"""What the benchmark measures: the workload (scope, rates, sizes), the timing primitives, a
redis-server of its own, the fleet of worker processes, the peers' simulated day, and ``Bench``,
whose methods each fill one part of ``Bench.raw`` (the raw numbers ``report.py`` turns into rows).

Contenders alternate in rounds (the order reversed every other round); every figure is kept per
round, so the report can take medians and round-by-round ratios.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import itertools
import math
import multiprocessing as mp
import os
import shutil
import socket
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers import NaiveZsetBudget

from distbudget import AsyncBudget, Budget, BudgetScope, ModelRates
from distbudget._core.ops import Announce, Record
from distbudget.engines.codec import Codec
from distbudget.engines.redis import connect

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
SERVER_TARGET_US = 25  # rows 3a/3b/3e/3f: server µs per charge
PIPELINED = 100  # charges per round trip where rows 3a/3h also give the server time pipelined

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
QUICK = Sizes(  # a smoke test (CI): every row measured, nothing to read into the figures
    rounds=2,
    calls=300,
    embedded_calls=2000,
    fill=20_000,
    batch=5000,
    fleet_rounds=1,
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


def per_charge(out: dict[str, Any], k: int) -> dict[str, Any]:
    """``timed_server``'s figures of calls that each send ``k`` charges, made per charge."""
    return {**out, "rate": out["rate"] * k, "cpu_us": out["cpu_us"] / k, "server_us": out["server_us"] / k}


def interleave(rounds: int, contenders: dict[str, Callable[[], dict[str, float]]]) -> dict[str, list[dict[str, float]]]:
    """Run each contender once per round, reversing the order every other round."""
    names = list(contenders)
    out: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(contenders[name]())
    return out


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


class RecordCall:
    """The one place the bench reaches under the public API: the engine operation a ``record()`` of
    the bench's charge (``SESSION``, model ``m``, 500 tokens) on ``budget`` sends, built as the budget
    builds it, and its script call — to time the script alone, to fill a simulated day pipelined, to
    fill a ledger."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.plan = budget._core.plan(SESSION, "m")
        self.usage = budget._core.usage("m", (IN_TOKENS, OUT_TOKENS, 0, 0, 0, 0))
        self.codec = Codec()  # one per caller, as an engine has: a plan is encoded once

    def op(self, now_us: int | None = None) -> Record:
        """The charge without a ledger entry or request id (``now_us``: an injected clock)."""
        return Record(self.plan, now_us, self.usage, None, 0, 0, "")

    def full_op(self) -> Record:
        """Exactly what ``record()`` sends: with a fresh ledger entry (a unique op id)."""
        return self.budget._core.record(SESSION, "m", IN_TOKENS, OUT_TOKENS).op

    def script_call(self, op: Record) -> tuple[Any, list[Any], list[Any]]:
        """(the registered script, KEYS, ARGV) of ``op`` on the Redis engine."""
        call = self.codec.encode(op)
        return self.budget.engine.scripts[call.script], call.keys, call.argv

    def execute(self) -> Any:
        """The engine's answer to the charge (any engine), without the budget around it."""
        core = self.budget._core
        return self.budget.engine.execute(Record(self.plan, None, self.usage, None, core.request_ttl_ms, 0, ""))


class CannedEngine:
    """An engine that answers every operation with one recorded answer: what a ``Budget`` costs in
    Python alone. With ``raw``, each operation is still encoded (the codec) and the raw reply parsed."""

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


@contextmanager
def awake(keep: bool) -> Iterator[None]:
    """With ``keep``, one busy loop per core at nice 19 for the run. On a VM a vCPU with nothing to
    run halts, and the next call wakes it cold: one call at a time (rows 1, 3, 8) then measures the
    wake-up as much as the work (seen here: a trivial EVALSHA's server time 2.2 µs one at a time
    against 0.66 µs pipelined, 0.92 µs with the spinners). The spinners yield to any other process
    (nice 19: ~1.5 % of a core when contended), as a busy server's other work would."""
    if not keep:
        yield
        return
    spin = "import os\nos.nice(19)\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


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
    nano = RecordCall(Budget(bench_scope(), RATES)).usage[1]
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
        script, keys, argv = (call := RecordCall(b)).script_call(call.full_op())
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
        answer = RecordCall(Budget(bench_scope(), RATES, session_id=SESSION)).execute()

        def run_embedded(ledger_maxlen: int = 100_000) -> dict[str, float]:
            b = Budget(bench_scope(), RATES, session_id=SESSION, ledger_maxlen=ledger_maxlen)
            return timed(lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n)

        class Usual(Budget):  # record() overridden: the usual path, never the embedded fast path
            def record(self, *args: Any, **kwargs: Any) -> Any:
                return Budget.record(self, *args, **kwargs)

        def run_usual() -> dict[str, float]:
            b = Usual(bench_scope(), RATES, session_id=SESSION)
            return timed(lambda: b.record(SESSION, "m", IN_TOKENS, OUT_TOKENS), n)

        def run_flow() -> dict[str, float]:  # the usual path with the engine's answer canned
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
                "usual": run_usual,
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
            call = RecordCall(b)
            pipe = self.client.pipeline(transaction=False)
            for t in times[lo : lo + batch]:
                clock[0] = t
                # the counters' memory: the ledger (a capped audit stream, ledger_maxlen) is measured apart
                script, keys, args = call.script_call(call.op(now_us=b._core.now_us()))
                script(keys=keys, args=args, client=pipe)
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
        nano = RecordCall(full).usage[1]
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
        _script, fkeys, fargv = (call := RecordCall(fb)).script_call(call.full_op())
        floor(keys=fkeys, args=fargv)
        k = PIPELINED
        charges = [(SESSION, "m", IN_TOKENS, OUT_TOKENS)] * k

        def pipelined() -> dict[str, float]:  # back to back: no idle vCPU to wake between calls
            b = self.budget(f"empty{next(rnd)}")
            return per_charge(timed_server(self.client, lambda: b.record_many(charges), max(1, n // k), k), k)

        def floor_pipelined() -> dict[str, float]:
            def batch() -> None:
                pipe = self.client.pipeline(transaction=False)
                for _ in range(k):
                    floor(keys=fkeys, args=fargv, client=pipe)
                pipe.execute()

            return per_charge(timed_server(self.client, batch, max(1, n // k), k), k)

        self.raw["server_time"] = interleave(
            self.sizes.rounds,
            {
                "empty": empty,
                "full": lambda: filled(full),
                "empty_noledger": lambda: empty(ledger_maxlen=0),
                "full_noledger": lambda: filled(full_nl),
                "floor": lambda: timed_server(self.client, lambda: floor(keys=fkeys, args=fargv), n),
                "empty_pipelined": pipelined,
                "floor_pipelined": floor_pipelined,
            },
        )

    # row 4b: the ledger's memory --------------------------------------------------------------------
    def ledger_memory(self) -> None:
        """The ledger stream of a scope tree after ``ledger_fill`` charges (pipelined record scripts
        with their real entries): its ``MEMORY USAGE`` per entry."""
        n = self.sizes.ledger_fill
        self.say(f"the ledger's memory: {n:,} charges")
        b = self.budget("ledger")
        call = RecordCall(b)
        for lo in range(0, n, self.sizes.batch):
            pipe = self.client.pipeline(transaction=False)
            for _ in range(min(self.sizes.batch, n - lo)):
                op = call.full_op()
                script, keys, args = call.script_call(op)
                script(keys=keys, args=args, client=pipe)
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
