"""What the opt-in WAIT mode costs: ``record()`` calls/s on a local master + replica, without and with
``?wait_replicas=1`` (each charge followed by ``WAIT 1 <timeout>`` in the same round trip).
Starts its own two redis-servers on free loopback ports; contenders interleaved, medians of rounds.

    python bench/wait_cost.py [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import redis

from distbudget import Budget, BudgetScope, ModelRates

RATES = {"m": ModelRates(0.001, 0.002)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def master_and_replica() -> Iterator[int]:
    exe = shutil.which("redis-server") or sys.exit("redis-server not found")
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ports = [free_port(), free_port()]
            for i, port in enumerate(ports):
                extra = ["--replicaof", "127.0.0.1", str(ports[0])] if i else []
                base = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                procs.append(
                    subprocess.Popen(
                        [*base, "--dir", tmp, "--repl-diskless-sync", "no", *extra],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            master, replica = (redis.Redis(port=p) for p in ports)
            for _ in range(500):
                with contextlib.suppress(redis.RedisError, KeyError):
                    if replica.info("replication")["master_link_status"] == "up":
                        break
                time.sleep(0.02)
            master.set("bench-ready", 1)
            assert master.execute_command("WAIT", 1, 5000) == 1, "the replica does not follow"
            yield ports[0]
        finally:
            for p in procs:
                p.kill()
                p.wait()


def rate(budget: Budget, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        budget.record(None, "m", 10, 5)
    return calls / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with master_and_replica() as port:
        url = f"redis://127.0.0.1:{port}/0"
        scope = BudgetScope("bench", max_tokens_per_session=10**12, max_tokens_per_day=10**12)
        contenders = {
            "default": Budget(scope, RATES, redis=url, session_id="s"),
            "wait_replicas=1": Budget(scope, RATES, redis=url + "?wait_replicas=1&wait_timeout_ms=100", session_id="s"),
        }
        for budget in contenders.values():
            rate(budget, 200)  # warm: scripts loaded, connections open
        rows: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, budget in contenders.items():
                rows[name].append(rate(budget, args.calls))
        medians = {name: statistics.median(r) for name, r in rows.items()}
        for name, value in medians.items():
            print(f"{name:>16}: {value:8,.0f} record()/s  ({1e6 / value:6.1f} µs per call)")
        ratio = medians["wait_replicas=1"] / medians["default"]
        print(f"{'ratio':>16}: {ratio:.2f}x  (local master + replica, {args.rounds} rounds x {args.calls} calls)")
        waited = contenders["wait_replicas=1"].engine.under_replicated
        print(f"{'under-replicated':>16}: {waited} charges (WAIT gave up before the replica acknowledged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
