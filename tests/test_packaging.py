"""The wheel carries the Lua scripts: build it, install it (not editable) into a fresh venv, and
charge a real Redis from there with the scripts loaded from site-packages."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, RedisServer

pytestmark = pytest.mark.slow

SCRIPT = r"""
import sys, distbudget
from distbudget.engines.scripts import lua_dir
from distbudget import Budget, BudgetScope, ModelRates
lua = lua_dir()
assert "site-packages" in str(lua), lua
assert (lua / "record.lua").is_file()
b = Budget(BudgetScope("wheel", max_tokens_per_session=100), {"m": ModelRates(0.001, 0.001)},
           redis=sys.argv[1], session_id="s")
b.record(None, "m", 40, 2)
print(lua, b.summary()["session"]["tokens"])
"""


def test_wheel_ships_lua_and_runs_from_site_packages(tmp_path: Path, redis_server: RedisServer) -> None:
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(out.glob("distbudget-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for op in ("include/scan", "include/holds", "record", "commit", "reserve", "check", "release", "summary"):
        assert f"distbudget/lua/{op}.lua" in names
    assert "distbudget/data/prices.json" in names and "distbudget/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # redis comes from the index (or pip's cache); distbudget from the wheel, not the source tree
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run(
        [str(py), "-c", SCRIPT, redis_server.url],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    lua_dir, tokens = done.stdout.split()
    assert str(env_dir) in lua_dir
    assert tokens == "42"
