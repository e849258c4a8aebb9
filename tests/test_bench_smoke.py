"""Smoke test of the benchmark: ``bench/run.py --quick`` runs to the end on a redis-server of its own
and produces every row of its table, each a finite positive number. The numbers themselves are not
checked: timings on a shared machine are no test."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = (
    "1a",
    "1b",
    "2",
    "3a",
    "3b",
    "3c",
    "3d",
    "3e",
    "3f",
    "3g",
    "3h",
    "4",
    "4b",
    "5a",
    "5b",
    "6a",
    "6b",
    "6c",
    "6d",
    "7.1",
    "7.2",
    "7.4",
    "7.8",
    "8a",
    "8b",
    "9a",
    "9b",
    "10a",
    "10b",
)
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")

pytest.importorskip("limits", reason="the bench extra is not installed: pip install -e '.[bench]'")


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Row id -> cells of the results table (``| # | measure | result | target | verdict | detail |``)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| # "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow  # ~15 s: starts a redis-server and a fleet of 8 spawned processes
def test_quick_bench_produces_every_row(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    # sys.executable: the interpreter running the tests, i.e. the venv's, where distbudget is installed
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(md), "--json", str(js)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = table_rows(md.read_text(encoding="utf-8"))
    assert sorted(rows) == sorted(ROWS)
    for rid in ROWS:
        result = rows[rid][2]
        assert not re.search(r"nan|inf", result, re.IGNORECASE), (rid, result)
        numbers = [float(x.replace(",", "")) for x in NUMBER.findall(result)]
        assert numbers, (rid, result)
        assert all(math.isfinite(x) and x > 0 for x in numbers), (rid, result)

    data = json.loads(js.read_text(encoding="utf-8"))
    values = {row["id"]: row["values"] for row in data["rows"]}
    assert sorted(values) == sorted(ROWS)
    for rid in ROWS:
        assert values[rid] and all(math.isfinite(x) and x > 0 for x in values[rid]), (rid, values[rid])
    assert data["environment"]["redis"]
