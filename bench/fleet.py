"""Fleet overspend: N processes spend against one hard cost cap on a real Redis, either with
``check()`` then ``record()`` (what single-process libraries offer) or with ``reserve()`` then
``commit()``. Prints the spend each mode reached against the cap.

    python bench/fleet.py --redis redis://127.0.0.1:6379/9 --workers 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time
import uuid
from typing import Any

from distbudget import Budget, BudgetExceededError, BudgetScope, ModelRates

RATES = {"m": ModelRates(input_per_1k=0.001, output_per_1k=0.002)}
CALL_SECONDS = 0.005  # the simulated LLM call between admission and charge


def worker(mode: str, url: str, prefix: str, cap: float, seed: int, out: Any) -> None:
    budget = Budget(
        BudgetScope("fleet", max_cost_per_session_usd=cap), RATES, redis=url, prefix=prefix, session_id="shared"
    )
    rnd = random.Random(seed)
    calls = 0
    while True:
        inp, outp = rnd.randint(250, 500), rnd.randint(0, 500)
        try:
            if mode == "check+record":
                budget.check("m", 500, 500)
                time.sleep(CALL_SECONDS)
                try:
                    budget.record(None, "m", inp, outp)
                except BudgetExceededError:
                    calls += 1
                    break  # charged, and now over the cap
            else:
                res = budget.reserve("m", 500, 500)
                time.sleep(CALL_SECONDS)
                res.commit(inp, outp)
        except BudgetExceededError as err:
            if err.retry_after is None:
                break
            time.sleep(err.retry_after)
            continue
        calls += 1
    out.put(calls)


def run(mode: str, url: str, workers: int, cap: float) -> dict[str, float]:
    prefix = f"bench-fleet-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(mode, url, prefix, cap, seed, out)) for seed in range(workers)]
    for p in procs:
        p.start()
    calls = sum(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    s = Budget(BudgetScope("fleet", max_cost_per_session_usd=cap), RATES, redis=url, prefix=prefix).summary("shared")
    used = s["session"]["cost_usd"]
    return {"calls": calls, "spent": used, "cap": cap, "overspend_pct": 100 * (used - cap) / cap}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--cap", type=float, default=0.5)
    a = ap.parse_args()
    print(f"{a.workers} processes, cap ${a.cap}, simulated call {CALL_SECONDS * 1000:.0f} ms")
    print(f"{'mode':<14} {'calls':>6} {'spent $':>10} {'over cap':>9}")
    for mode in ("check+record", "reserve"):
        r = run(mode, a.redis, a.workers, a.cap)
        print(f"{mode:<14} {r['calls']:>6} {r['spent']:>10.6f} {r['overspend_pct']:>8.2f}%")


if __name__ == "__main__":
    main()
