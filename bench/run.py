"""The distbudget benchmark: every figure measured in one run, each against contenders timed in the same run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/run.py            # full run (~5 min), writes bench/results.md
    .venv/bin/python bench/run.py --docs docs/performance.md   # the same, and puts it in the docs page
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
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from measures import FULL, QUICK, Bench, awake, own_redis
from report import build_rows, environment, markdown

HERE = Path(__file__).resolve().parent
MARK_START, MARK_END = "<!-- bench results: start (written by bench/run.py --docs) -->", "<!-- bench results: end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, ~30 s)")
    ap.add_argument("--redis", metavar="URL", help="use this server (default: start our own redis-server)")
    ap.add_argument("--out", type=Path, default=HERE / "results.md", help="the Markdown table (%(default)s)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also dump every raw number as JSON here")
    ap.add_argument(
        "--keep-awake",
        action="store_true",
        help="a nice-19 busy loop per core for the run, so no vCPU halts between calls (see measures.awake)",
    )
    ap.add_argument(
        "--docs",
        type=Path,
        metavar="PAGE",
        help="also put the results in this page, between its bench markers (a full run: docs/performance.md)",
    )
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()

    with awake(args.keep_awake), own_redis() if args.redis is None else _given(args.redis) as url:
        bench = Bench(url, sizes, own_server=args.redis is None)
        try:
            env = environment(bench.client, url, bench.own_server, args.keep_awake)
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
    if args.docs:
        args.docs.write_text(into_page(args.docs.read_text(encoding="utf-8"), text), encoding="utf-8")
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


def into_page(page: str, results: str) -> str:
    """``page`` with the text between its markers replaced by ``results`` (its title a level down):
    the documentation shows the run ``bench/results.md`` holds, never a copy made by hand."""
    start, end = page.index(MARK_START) + len(MARK_START), page.index(MARK_END)
    body = results.replace("# distbudget benchmark results", "## The latest full run", 1)
    return page[:start] + "\n" + body + page[end:]


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    sys.exit(main())
