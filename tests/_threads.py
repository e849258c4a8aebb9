"""``run_threads``: the start and join of the tests whose workers are real threads."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_threads(n: int, work: Callable[[int], object]) -> None:
    """Run ``work(0)`` ... ``work(n - 1)``, each in its own thread, released together by a barrier
    (so that they really overlap); return once every one has ended, raising the first exception a
    worker raised (a failed worker's error surfaces in the test, not on stderr)."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []  # list.append is atomic: the threads share it

    def run(k: int) -> None:
        try:
            barrier.wait()
            work(k)
        except BaseException as exc:  # raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,), name=f"worker-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
