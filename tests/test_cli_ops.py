"""The operator commands (``status``, ``reset``, ``doctor``) and what every command shares (the server
and prefix on stderr, ``DISTBUDGET_REDIS_URL``, a missing registry, broken pipes, plain and accurate
``--help``), against the suite's real Redis, connecting as the least-privilege ACL user."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from distbudget import BudgetManager, BudgetScope, ModelRates
from distbudget.cli import main
from distbudget.cli.main import BROKEN_PIPE, build_parser
from distbudget.cli.status import CLEAR
from distbudget.engines.functions import acl_rules
from distbudget.engines.scripts import library
from tests.conftest import RedisServer

PREFIX = "pfx"  # the ACL user's keys are <prefix>:* for prefix distbudget or pfx (tests/conftest.py)
RATES = {"m": ModelRates(0.001, 0.002)}


@pytest.fixture
def fleet(redis_server: RedisServer, redis_client: redis.Redis) -> BudgetManager:
    """org (day limits) with children dev (a per-session limit, four sessions) and ops (a cost cap at 50 %)."""
    mgr = BudgetManager(redis=redis_server.url, prefix=PREFIX)
    mgr.register(BudgetScope("org", max_tokens_per_day=10_000, max_cost_per_day_usd=1.0), RATES)
    mgr.register(BudgetScope("dev", parent="org", max_tokens_per_day=1000, max_tokens_per_session=500), RATES)
    mgr.register(BudgetScope("ops", parent="org", max_cost_per_day_usd=0.01, hard_stop=False), RATES)
    for i in range(4):
        mgr.record("dev", f"s{i}", "m", 100 + 20 * i, 50)
    mgr.record("ops", "x", "m", 3000, 1000)
    return mgr


def _args(server: RedisServer, *rest: str) -> list[str]:
    return [*rest, "--redis", server.url, "--prefix", PREFIX]


def test_status_is_the_tree_sorted_by_pct_with_top_sessions(
    fleet: BudgetManager, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(redis_server, "status", "--color", "never")) == 0
    out, err = capsys.readouterr()
    # which server (credentials masked) and prefix it read
    assert err.strip() == f"distbudget status: reading redis://***@127.0.0.1:{redis_server.port}/0, prefix 'pfx'"
    lines = out.splitlines()
    assert lines[0].split() == ["SCOPE", "/", "LIMIT", "USED", "HELD", "LIMIT", "%", "REFUSED"]
    names = [line.split()[0] for line in lines if " calls, " in line]  # the scope lines
    # org first (a root), then its children by their highest %: dev (day_tokens 72 %) before ops (50 %)
    assert names == ["org", "dev", "ops"]
    dev = next(i for i, line in enumerate(lines) if line.split()[:1] == ["dev"])
    assert lines[dev] == "  dev  (4 calls, 720 tokens, $0.000920)"
    assert lines[dev + 1].split() == ["day_tokens", "720", "0", "1,000", "72.0%", "0"]
    assert lines[dev + 2].split() == ["session_tokens", "(top", "session)", "210", "0", "500", "42.0%", "0"]
    # the top 3 sessions by %, each read from the store (s3: 160 + 50 tokens)
    assert [lines[dev + k].split()[:3] for k in (3, 4, 5)] == [
        ["session", "s3", "210"],
        ["session", "s2", "190"],
        ["session", "s1", "170"],
    ]
    ops = next(i for i, line in enumerate(lines) if line.split()[:1] == ["ops"])
    assert "soft limits" in lines[ops]
    assert lines[ops + 1].split() == ["day_cost_usd", "$0.005000", "$0.000000", "$0.010000", "50.0%", "0"]
    org = lines.index(next(line for line in lines if line.startswith("org")))
    assert lines[org + 1].split()[:5] == ["day_tokens", "4,720", "0", "10,000", "47.2%"]


def test_status_json_is_the_documented_schema_with_the_stores_numbers(
    fleet: BudgetManager, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    held = fleet.reserve("dev", "m", 100, 40, session_id="s3")  # a live hold shows as held
    assert main(_args(redis_server, "status", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["version"], doc["prefix"]) == (1, PREFIX)
    assert [s["name"] for s in doc["scopes"]] == ["org", "dev", "ops"]
    assert abs(doc["read_at"] - time.time()) < 3600  # the server's clock, in seconds
    for scope in doc["scopes"]:
        assert set(scope) == {"name", "parent", "depth", "hard_stop", "total", "per_model", "limits", "peak_pct"}
        summary = fleet.summary(scope["name"])
        assert scope["total"] == summary["total"] and scope["per_model"] == summary["per_model"]
        for lim in scope["limits"]:
            assert lim["refusals"] == summary["limits"][lim["limit_type"]]["refusals"] == 0  # none refused here
            assert lim["thresholds"] == [0.8, 1.0]
            if not lim["per_session"]:
                want = summary["limits"][lim["limit_type"]]
                assert {k: lim[k] for k in ("used", "held", "limit", "pct")} == {
                    k: want[k] for k in ("used", "held", "limit", "pct")
                }
                continue
            for sess in lim["sessions"]:
                want = fleet.summary(scope["name"], sess["session_id"])["limits"][lim["limit_type"]]
                assert (sess["used"], sess["held"], sess["pct"]) == (want["used"], want["held"], want["pct"])
    dev = doc["scopes"][1]
    session = next(lim for lim in dev["limits"] if lim["per_session"])
    assert [s["session_id"] for s in session["sessions"]] == ["s3", "s2", "s1"]  # by % used: 210, 190, 170
    assert session["sessions"][0]["held"] == 140 and session["sessions"][0]["pct"] == 0.42
    assert (session["used"], session["held"], session["pct"]) == (210, 140, 0.42)  # the busiest session's
    held.release()


def test_status_near_keeps_the_limits_at_or_over_and_their_ancestors(
    fleet: BudgetManager, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(redis_server, "status", "--near", "0.6", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(s["name"], [lim["limit_type"] for lim in s["limits"]]) for s in doc["scopes"]] == [
        ("org", []),
        ("dev", ["day_tokens"]),
    ]
    assert main(_args(redis_server, "status", "--near", "0.99")) == 0
    assert capsys.readouterr().out.strip() == "no scope of prefix 'pfx' matches"
    assert main(_args(redis_server, "status", "--near", "lots")) == 2


def test_status_colours_the_pct_at_the_thresholds(
    fleet: BudgetManager, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.record("dev", "s9", "m", 100, 0)  # dev day_tokens 820 / 1000: past the 80 % warning
    fleet.record("ops", "x", "m", 5000, 0)  # ops day_cost_usd 0.01 / 0.01 (soft): at the limit
    assert main(_args(redis_server, "status", "--color", "always")) == 0
    out = capsys.readouterr().out
    assert "\x1b[33m82.0%\x1b[0m" in out  # yellow: warned
    assert "\x1b[31m100.0%\x1b[0m" in out  # red: at the limit
    assert "\x1b[32m34.0%\x1b[0m" in out  # green: session s1 of dev


def test_status_watch_redraws_in_place(fleet: BudgetManager, redis_server: RedisServer) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distbudget.cli", *_args(redis_server, "status", "--watch", "0.2")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        seen = b""
        deadline = time.monotonic() + 60  # a bound on a hung process, not a speed requirement
        assert proc.stdout is not None
        while seen.count(CLEAR.encode()) < 3 and time.monotonic() < deadline:
            seen += proc.stdout.read1(65536)
        frames = seen.decode().split(CLEAR)[1:3]
        assert len(frames) == 2
        fleet.record("ops", "x", "m", 10, 0)
        for frame in frames:
            assert frame.startswith("distbudget status, prefix 'pfx', every 0.2 s")
            assert "session_tokens (top session)" in frame
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_redis_url_from_the_environment_and_a_missing_registry_is_an_error(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DISTBUDGET_REDIS_URL", redis_server.url)
    for command in (["status"], ["doctor"], ["ledger", "org"], ["reset", "org", "--yes"], ["exporter", "--port", "0"]):
        assert main([*command, "--prefix", PREFIX]) == 1, command
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert lines[0] == f"distbudget {command[0]}: reading redis://***@127.0.0.1:{redis_server.port}/0, prefix 'pfx'"
        if command[0] == "doctor":  # doctor reports it as a failed check
            assert re.search(r"^FAIL  registry    no registry under prefix 'pfx'", out, re.M), out
            continue
        assert lines[1] == (
            f"distbudget {command[0]}: error: no registry under prefix 'pfx' on "
            f"redis://***@127.0.0.1:{redis_server.port}/0: no scope was registered there (check --prefix and --redis)"
        )


def test_an_unreachable_server_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--redis", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert "distbudget status: error: Redis" in err and "Traceback" not in err


def test_reset_asks_unless_yes_and_zeroes_the_scope_or_one_session(
    fleet: BudgetManager, redis_server: RedisServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = fleet.summary("dev", "s1")
    # no terminal to ask on (pytest's stdin): refused, nothing changed
    assert main(_args(redis_server, "reset", "dev")) == 1
    assert "pass --yes" in capsys.readouterr().err
    assert fleet.summary("dev", "s1")["limits"] == before["limits"]
    # a terminal answering no, then yes
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda _prompt: "n")
    assert main(_args(redis_server, "reset", "dev", "--session", "s1")) == 1
    assert "cancelled" in capsys.readouterr().err
    monkeypatch.setattr("builtins.input", lambda _prompt: "y")
    assert main(_args(redis_server, "reset", "dev", "--session", "s1")) == 0
    assert capsys.readouterr().out.strip() == "session 's1' of scope 'dev' reset"
    after = fleet.summary("dev", "s1")
    assert after["session"]["tokens"] == 0 and after["limits"]["day_tokens"]["used"] == 720  # the day keeps it
    assert fleet.summary("dev", "s2")["session"]["tokens"] == 190
    assert main(_args(redis_server, "reset", "dev", "--yes")) == 0
    assert fleet.summary("dev")["limits"]["day_tokens"]["used"] == 0
    assert fleet.summary("org")["limits"]["day_tokens"]["used"] == 4720  # ancestors keep their usage
    assert main(_args(redis_server, "reset", "nobody", "--yes")) == 2
    assert "unknown scope 'nobody'" in capsys.readouterr().err


def test_doctor_checks_the_server(
    fleet: BudgetManager, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = redis_server.admin_url
    assert main(["doctor", "--redis", admin, "--prefix", PREFIX, "--color", "never"]) == 0
    out = capsys.readouterr().out.splitlines()
    checks = {line.split()[1]: (line.split()[0], line) for line in out}
    assert list(checks) == ["server", "eviction", "acl", "scripts", "clock", "registry", "ledger", "prices"]
    assert all(status in ("PASS", "WARN") for status, _ in checks.values()), out
    version = redis.Redis.from_url(admin).info("server")["redis_version"]
    assert f"Redis {version}" in checks["server"][1]
    assert "noeviction" in checks["eviction"][1] and checks["eviction"][0] == "PASS"
    assert "3 scopes registered" in checks["registry"][1]
    assert "1 trees, 5 entries" in checks["ledger"][1]
    assert re.search(r"bundled prices as of \d{4}-\d\d-\d\d \(\d+ days old, [\d,]+ models\)", checks["prices"][1])
    # the least-privilege user: the workers' rights pass, admin-only reads are warnings, not failures
    assert main(["doctor", "--redis", redis_server.url, "--prefix", PREFIX, "--color", "never"]) == 0
    out = capsys.readouterr().out.splitlines()
    checks = {line.split()[1]: (line.split()[0], line) for line in out}
    assert checks["acl"][0] == "PASS" and checks["registry"][0] == "PASS", out
    assert checks["server"][0] == "WARN" and "not permitted for this user" in checks["server"][1]


def test_doctor_fails_on_an_evicting_server_and_an_empty_prefix(
    fleet: BudgetManager, redis_server: RedisServer, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert main(["doctor", "--redis", redis_server.admin_url, "--prefix", PREFIX]) == 1
    finally:
        redis_client.config_set("maxmemory-policy", "noeviction")
    out = capsys.readouterr().out
    assert re.search(r"^FAIL  eviction    maxmemory-policy allkeys-lru .*may evict", out, re.M), out
    assert main(["doctor", "--redis", redis_server.admin_url, "--prefix", "distbudget"]) == 1
    assert re.search(r"^FAIL  registry    no registry under prefix 'distbudget'", capsys.readouterr().out, re.M)


def test_a_closed_pipe_exits_quietly(fleet: BudgetManager, redis_server: RedisServer) -> None:
    """``distbudget ledger org | head -1``: the reader leaves early; no BrokenPipeError traceback."""
    fleet.get("org").record_many([("s0", "m", 1, 0)] * 3000)  # well over a pipe buffer of JSON lines
    proc = subprocess.Popen(
        [sys.executable, "-m", "distbudget.cli", *_args(redis_server, "ledger", "org")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == BROKEN_PIPE
    assert json.loads(first)["scope"] in ("dev", "ops")
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def _subcommands() -> dict[str, Any]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)  # type: ignore[attr-defined]


def test_help_is_plain_text_and_names_only_real_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "`" not in top
    for name, sub in _subcommands().items():
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert "`" not in text and "%%" not in text, name
        real = {opt for action in sub._actions for opt in action.option_strings}
        mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
        assert mentioned <= real, (name, mentioned - real)  # e.g. watch's old --from-ids
    assert "--from-start" in _subcommands()["watch"].format_help()


def test_each_command_is_described_by_the_docstring_of_what_it_runs() -> None:
    """``main.COMMANDS`` is the whole CLI: every subcommand (and ``prices push|show``) has a
    description, its run function's docstring, written out where it names a constant."""
    from distbudget._core.report import GROUPS
    from distbudget.cli.main import COMMANDS
    from distbudget.cli.servers import TOKEN_ENV

    commands = [*COMMANDS, *(action for cmd in COMMANDS for action in cmd.actions)]
    assert [cmd.name for cmd in COMMANDS] == [name for name in _subcommands() if name != "scopes"]
    for cmd in commands:
        assert cmd.run.__doc__, cmd.name
    helps = {name: " ".join(sub.format_help().split()) for name, sub in _subcommands().items()}
    assert f"grouped by any of {', '.join(GROUPS)}." in helps["report"]
    assert f"(or ${TOKEN_ENV})" in helps["dashboard"]


@pytest.mark.slow
def test_status_on_redis_cluster_reads_every_tree(redis_cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Trees live on different shards: the summaries pipeline goes node by node, the ledger tails
    tree by tree; the numbers are the store's."""
    redis_cluster.flushall()
    url = redis_cluster.user_url
    mgr = BudgetManager(redis=url, prefix=PREFIX)
    for t in range(6):  # six trees: their hash tags spread over the three masters
        mgr.register(BudgetScope(f"org-{t}", max_tokens_per_day=10_000), RATES)
        mgr.register(BudgetScope(f"team-{t}", parent=f"org-{t}", max_tokens_per_session=1000), RATES)
        mgr.record(f"team-{t}", f"user-{t}", "m", 100 * (t + 1), 0)
    assert main(["status", "--redis", url, "--prefix", PREFIX, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["scopes"]] == [n for t in range(5, -1, -1) for n in (f"org-{t}", f"team-{t}")]
    for scope in doc["scopes"]:
        (lim,) = scope["limits"]
        if scope["name"].startswith("org"):
            assert lim["used"] == mgr.summary(scope["name"])["limits"]["day_tokens"]["used"]
        else:
            t = int(scope["name"].split("-")[1])
            assert [(s["session_id"], s["used"]) for s in lim["sessions"]] == [(f"user-{t}", 100 * (t + 1))]


def test_status_watch_outlives_an_outage(tmp_path: Any) -> None:
    server = RedisServer(tmp_path)
    mgr = BudgetManager(redis=server.url, prefix=PREFIX)
    mgr.register(BudgetScope("org", max_tokens_per_day=1000), RATES)
    proc = subprocess.Popen(
        [sys.executable, "-m", "distbudget.cli", "status", "--redis", server.url, "--prefix", PREFIX, "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + 60  # a bound on a hung process, not a speed requirement
        while b"day_tokens" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.read1(65536)
        server.stop()
        while b"(retrying)" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.read1(65536)
        last = seen.decode().split(CLEAR)[-1]
        assert "distbudget status: error: Redis" in last and last.rstrip().endswith("(retrying)")
        assert proc.poll() is None  # still watching
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.stop()


def test_install_then_a_least_privilege_worker_reads_through_fcall(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``distbudget install`` loads the Functions library; a worker holding no script rights (the
    rules ``distbudget acl`` prints) then reads the fleet with FCALL: status, doctor."""
    server = RedisServer(tmp_path)
    try:
        admin = server.admin_url
        assert main(["install", "--redis", admin]) == 0
        assert capsys.readouterr().out.strip() == f"127.0.0.1:{server.port}: {library()[0]} installed"
        assert main(["install", "--redis", admin]) == 0
        assert capsys.readouterr().out.strip().endswith("present")
        server.client().execute_command("ACL", "SETUSER", "w", "reset", "on", ">pw", *acl_rules(PREFIX))
        worker = f"redis://w:pw@127.0.0.1:{server.port}/0"
        mgr = BudgetManager(redis=worker, prefix=PREFIX)
        mgr.register(BudgetScope("org", max_tokens_per_day=1000, max_tokens_per_session=800), RATES)
        mgr.record("org", "u1", "m", 300, 0)
        assert mgr._engine.path == "functions"  # type: ignore[attr-defined]
        assert main(["status", "--redis", worker, "--prefix", PREFIX, "--json"]) == 0
        (org,) = json.loads(capsys.readouterr().out)["scopes"]
        assert [(lim["limit_type"], lim["used"]) for lim in org["limits"]] == [
            ("session_tokens", 300),
            ("day_tokens", 300),
        ]
        assert main(["doctor", "--redis", worker, "--prefix", PREFIX, "--color", "never"]) == 0
        out = capsys.readouterr().out
        assert re.search(
            rf"^PASS  scripts     calls the Redis Functions library {library()[0]} \(FCALL\)", out, re.M
        ), out
        assert re.search(r"^PASS  acl ", out, re.M), out
        assert main(["install", "--redis", worker]) == 2  # a worker may not load functions
        assert "distbudget install: error:" in capsys.readouterr().err
    finally:
        server.stop()


def test_acl_prints_a_worker_and_an_admin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["acl", "--prefix", "acme", "--user", "acme"]) == 0
    worker, admin = capsys.readouterr().out.splitlines()
    assert worker.split() == ["ACL", "SETUSER", "acme-worker", "reset", "on", ">PASSWORD", *acl_rules("acme")]
    assert admin.split() == ["ACL", "SETUSER", "acme-admin", "reset", "on", ">PASSWORD", *acl_rules("acme", "admin")]
    assert "+fcall" in worker and "+evalsha" not in worker and "+function|load" in admin
