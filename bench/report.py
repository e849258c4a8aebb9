"""The benchmark's report: ``build_rows`` turns ``Bench.raw`` (see ``measures.py``) into the results
table's rows and the notes on where the time goes; ``markdown`` writes ``bench/results.md``.
Figures are medians over rounds; ratios are taken round by round, then the median."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from measures import FLEET_SIZES, LIMITS_UNIT_TOKENS, MEMORY_TARGET, PIPELINED, SERVER_TARGET_US, TASKS, Sizes


def med(rows: list[dict[str, float]], field: str) -> float:
    return statistics.median(row[field] for row in rows)


def med_ratio(a: list[dict[str, float]], b: list[dict[str, float]], field: str = "rate") -> float:
    """Median over rounds of a[r] / b[r]."""
    return statistics.median(x[field] / y[field] for x, y in zip(a, b, strict=True))


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
    pipelined = {
        "3a": f"; pipelined ({PIPELINED} charges per round trip, `record_many`): "
        f"{med(st['empty_pipelined'], 'server_us'):.1f} µs"
    }
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
                f"≤ {SERVER_TARGET_US} µs",
                verdict(empty <= SERVER_TARGET_US),
                f"session + day + per-model limits, fresh scope; {inner_text(st[e_key])}{pipelined.get(ids[0], '')}",
            )
        )
        rows.append(
            Row(
                ids[1],
                f"server µs per charge, {label}, {sizes.fill:,} charges in the day window",
                [full],
                f"{full:.1f} µs",
                f"≤ {SERVER_TARGET_US} µs",
                verdict(full <= SERVER_TARGET_US),
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
    above = f" (above the {SERVER_TARGET_US} µs target before any logic)" if floor_us > SERVER_TARGET_US else ""
    rows.append(
        Row(
            "3h",
            "server µs per call of a script issuing record's commands with constant arguments (reference)",
            [floor_us],
            f"{floor_us:.1f} µs",
            "—",
            "—",
            f"{inner_text(fl)}, the same KEYS and ARGV, no accounting logic: the floor of this work on this "
            f"machine{above}; record's logic adds {logic_us:.1f} µs to it (row 3b); "
            f"pipelined ({PIPELINED} per round trip) {med(st['floor_pipelined'], 'server_us'):.1f} µs",
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
        f"{us['trivial']:.1f} for the trivial script, {gap:+.1f} where the target allows "
        f"+{us['trivial'] * (1 / 0.85 - 1):.1f}. (a) The script call itself — the same `EVALSHA`, keys and "
        f"ARGV sent straight through redis-py — takes {raw_us:.1f} (+{raw_us - us['trivial']:.1f}): server "
        f"{raw_srv:.1f} vs {srv['trivial']:.1f} (+{raw_srv - srv['trivial']:.1f}), client CPU {raw_cpu:.1f} vs "
        f"{cpu['trivial']:.1f} (+{raw_cpu - cpu['trivial']:.1f}; redis-py packing the "
        f"{raw['record_command_args']}-argument command alone is {pack_rec:.1f} vs {pack_triv:.1f} in a hot "
        f"loop). (b) `record()` itself (its fast path: the call compiled once per session and model, "
        "packed and its reply read by hand, no redis-py on the way) takes "
        f"{us['record'] - raw_us:+.1f} wall and {cpu['record'] - raw_cpu:+.1f} client CPU against that raw "
        f"call: client CPU {cpu['record']:.1f} against {cpu['trivial']:.1f} for the trivial script"
        + (", so the gap is the server's" if cpu["record"] <= cpu["trivial"] else "")
        + ". A call the fast path declines (metadata, a request id, an alert to fire ...) "
        f"takes the usual path: {flow:.1f} of Python in a hot loop against a canned reply (flow, validation, "
        "`wire()`, parsing). The ledger (1a vs 1b) costs "
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
    usual = 1e6 / med(emb["usual"], "rate")
    notes.append(
        f"Where embedded `record()`'s time goes (rows 5a/5b, µs per call): {emb_us:.1f} in all with the "
        f"ledger ({emb_nl:.1f} without), on the fast path a plain charge takes (`Accounting.fast_recording`, "
        "`MemoryEngine.fast_record`: a plan compiled per session and model, the amounts pending until any "
        "other operation settles them, the ledger entry kept as plain values, its JSON made when read). A "
        "call it declines (metadata, a request id, an alert to fire, a limit passed ...) takes the usual "
        f"path: {usual:.1f} µs, of which the flow alone (validation, plan, the record, alerts, the ledger "
        f"entry's JSON; the engine's answer canned) {flow_us:.1f}; agent-budget's `record()` takes "
        f"{1e6 / med(emb['seed'], 'rate'):.1f}."
    )
    return rows, notes


def environment(client: Any, url: str, own_server: bool, awake: bool = False) -> dict[str, str]:
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
        "flags": " --keep-awake" if awake else "",
        "vcpus": "kept awake by a nice-19 busy loop per core (`--keep-awake`)"
        if awake
        else "left to halt when idle (no `--keep-awake`): one call at a time also measures their wake-up",
    }


def markdown(rows: list[Row], notes: list[str], env: dict[str, str], sizes: Sizes, quick: bool) -> str:
    cmd = "python bench/run.py" + (" --quick" if quick else "") + env["flags"]
    out = [
        "# distbudget benchmark results",
        "",
        f"Generated by `{cmd}` on {env['date']}. {'**Quick run (tiny sizes): not representative.** ' if quick else ''}"
        f"Medians of {sizes.rounds} interleaved rounds ({sizes.fleet_rounds} for the fleet); ratios are taken "
        "round by round.",
        "",
        f"- platform: {env['platform']}, Python {env['python']}",
        f"- CPU: {env['cpu']}; vCPUs {env['vcpus']}",
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
