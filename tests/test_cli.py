"""The ``distbudget`` command: the fleet demo (embedded threads and Redis processes), ``prices``,
``--version``. Everything runs for real; the printed numbers are checked against the store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

import distbudget
from distbudget import BudgetExceededError, BudgetManager, BudgetScope, ModelRates
from distbudget.cli import _common, demo, main
from distbudget.pricing import price_table

REDIS_URL = "redis://127.0.0.1:6379/15"
SCOPES = ("team-a", "team-b", "team-c")

ROW = re.compile(r"^\s+(team-[a-z])\s+(\S+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+\$([\d.,]+)$")
LIMIT = re.compile(r"^\s+(team-[a-z])\s+(\w+)\s+(\$?[\d.,]+)\s+(\$?[\d.,]+)\s+([\d.]+)%\s+(.+)$")
ALERT = re.compile(r"^\s+(WARNING|CRITICAL|INFO)\s+(team-[a-z])\s+(\w+) at ([\d.]+)%\s+\(worker (\d+)\)$")


def _num(text: str) -> float:
    return float(text.replace("$", "").replace(",", ""))


def parse(out: str) -> dict[str, Any]:
    """The demo's printout as data: scope rows, limit rows, alerts, header and last line."""
    rows: dict[str, dict[str, Any]] = {}
    limits: list[dict[str, Any]] = []
    alerts: list[tuple[str, str, str, float, int]] = []
    for line in out.splitlines():
        if m := ROW.match(line):
            rows[m[1]] = {
                "model": m[2],
                "committed": int(_num(m[3])),
                "refused": int(_num(m[4])),
                "skipped": int(_num(m[5])),
                "tokens": int(_num(m[6])),
                "cost": _num(m[7]),
            }
        elif m := LIMIT.match(line):
            limits.append(
                {
                    "scope": m[1],
                    "limit_type": m[2],
                    "used": _num(m[3]),
                    "cap": _num(m[4]),
                    "pct": float(m[5]),
                    "outcome": m[6],
                }
            )
        elif m := ALERT.match(line):
            alerts.append((m[2], m[1], m[3], float(m[4]), int(m[5])))
    lines = out.strip().splitlines()
    prefix = re.search(r"key prefix (\S+)$", lines[0])
    return {
        "rows": rows,
        "limits": limits,
        "alerts": alerts,
        "header": lines[0],
        "last": lines[-1],
        "prefix": prefix[1] if prefix else None,
    }


def assert_demo_story(out: str, workers: int, calls: int) -> dict[str, Any]:
    """What every demo run must show, whatever the race between workers decided."""
    got = parse(out)
    assert set(got["rows"]) == set(SCOPES), out
    for name, row in got["rows"].items():
        assert row["committed"] + row["refused"] + row["skipped"] == workers * calls, (name, out)
        assert row["refused"] <= workers  # a worker stops a scope at its first refusal
    # team-a and team-b are sized to hit their hard cap; team-c to stay under its cap.
    for name in ("team-a", "team-b"):
        assert got["rows"][name]["refused"] >= 1, out
    assert got["rows"]["team-c"] == {**got["rows"]["team-c"], "committed": workers * calls, "refused": 0, "skipped": 0}
    assert {lim["scope"] for lim in got["limits"]} == set(SCOPES)
    for lim in got["limits"]:
        assert lim["used"] <= lim["cap"], lim
        assert lim["pct"] <= 100.0, lim
    reached = {lim["scope"] for lim in got["limits"] if lim["outcome"].startswith("cap reached")}
    assert reached == {"team-a", "team-b"}, out
    warnings = [a for a in got["alerts"] if a[1] == "WARNING"]
    assert {a[0] for a in warnings} >= {"team-a", "team-b"}, out
    assert all(80.0 <= a[3] <= 100.0 for a in warnings), out
    assert all(0 <= a[4] < workers for a in got["alerts"])
    # Each threshold fires exactly once across the fleet.
    assert len({(a[0], a[1], a[2]) for a in got["alerts"]}) == len(got["alerts"]), out
    assert "ledger: the workers' own records match the store" in out
    assert got["last"].startswith("hard caps held: spend <= cap for every scope"), out
    assert "VIOLATED" not in out and "MISMATCH" not in out
    return got


def test_demo_embedded_shows_warnings_refusals_and_caps_holding(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--workers", "3", "--calls", "30"])
    out = capsys.readouterr().out
    assert code == 0, out
    got = assert_demo_story(out, workers=3, calls=30)
    assert "engine embedded (in-process), 3 worker threads x 30 calls x 3 scopes" in got["header"]


def test_demo_numbers_are_the_store_summaries() -> None:
    cfg, planned = demo.build_config(
        redis=None, prefix="distbudget-test", workers=4, calls=25, n_scopes=3, seed=11, latency_ms=0.5
    )
    report = demo.run_demo(cfg, planned)
    lines, code = demo.render(report)
    assert code == 0, lines
    got = parse("\n".join(lines))
    mgr = report.manager
    for spec in cfg.scopes:
        s = mgr.summary(spec.name, demo.SESSION_ID)
        row = got["rows"][spec.name]
        # The printed table is the store's session summary ...
        assert row["committed"] == s["session"]["requests"] == s["total"]["requests"] == s["day"]["requests"]
        assert row["tokens"] == s["session"]["tokens"]
        assert row["cost"] == round(s["session"]["cost_usd"], 6)
        assert row["model"] == spec.model and list(s["per_model"]) == [spec.model]
        # ... and the workers' own records, summed, are exactly what the store holds.
        o = report.outcomes[spec.name]
        assert (o.committed, o.tokens, o.cost_nano / 1e9) == (
            s["session"]["requests"],
            s["session"]["tokens"],
            s["session"]["cost_usd"],
        )
        assert o.committed + o.refused + o.skipped == cfg.workers * cfg.calls
        for lt, lim in s["limits"].items():
            assert lim["held"] == 0
            assert lim["used"] <= lim["limit"], (spec.name, lt, lim)
        plan = planned[spec.name]
        if spec.capped:
            # Refused only because the cap was (almost) full: at the refusal used + holds in flight
            # + that call's worst case exceeded the cap, with at most one hold per worker in flight.
            binding = s["limits"]["session_cost_usd" if spec.role == demo.ROLE_COST_CAP else "session_tokens"]
            worst = (
                plan.max_call_worst_cost_nano / 1e9 if spec.role == demo.ROLE_COST_CAP else plan.max_call_worst_tokens
            )
            assert o.refused >= 1
            assert binding["used"] > binding["limit"] - cfg.workers * worst
            assert sum(o.refused_by.values()) == o.refused
            assert set(o.refused_by) == {"session_cost_usd" if spec.role == demo.ROLE_COST_CAP else "session_tokens"}
        else:
            # Every planned call ran: the totals are exactly the seeded plan's.
            assert (o.committed, o.refused) == (cfg.workers * cfg.calls, 0)
            assert s["session"]["tokens"] == plan.tokens
            assert s["session"]["cost_usd"] == plan.cost_nano / 1e9
    # Alerts came from the callbacks, one per crossing, and agree with the limits they name.
    seen = [(scope, level, lt) for _w, (scope, level, lt, _pct) in report.alerts]
    assert len(seen) == len(set(seen))
    for _w, (scope, level, lt, pct) in report.alerts:
        # (CRITICAL fires only if a commit lands exactly on the cap: possible, and still within it.)
        assert (level == "warning" and 0.8 <= pct <= 1.0) or (level == "critical" and pct == 1.0) or level == "refused"
        assert lt in mgr.summary(scope, demo.SESSION_ID)["limits"]
    assert {(scope, lt) for scope, _level, lt in seen} >= {("team-a", "session_cost_usd"), ("team-b", "session_tokens")}


def test_demo_plan_and_caps_are_seeded() -> None:
    def caps(seed: int) -> tuple[tuple[demo.ScopeSpec, ...], dict[str, demo.Planned]]:
        cfg, planned = demo.build_config(
            redis=None, prefix="p", workers=3, calls=10, n_scopes=5, seed=seed, latency_ms=0
        )
        return cfg.scopes, planned

    assert caps(5) == caps(5)
    assert caps(5)[0] != caps(6)[0]
    scopes, planned = caps(5)
    assert [s.name for s in scopes] == ["team-a", "team-b", "team-c", "team-d", "team-e"]
    assert [s.role for s in scopes] == [
        demo.ROLE_COST_CAP,
        demo.ROLE_TOKEN_CAP,
        demo.ROLE_UNDER_CAP,
        demo.ROLE_COST_CAP,
        demo.ROLE_TOKEN_CAP,
    ]
    for spec in scopes:
        p = planned[spec.name]
        assert p.calls == 30
        if spec.role == demo.ROLE_COST_CAP:
            assert spec.max_cost_per_session_usd is not None
            assert spec.max_cost_per_session_usd < p.cost_nano / 1e9  # the fleet must hit it
        elif spec.role == demo.ROLE_TOKEN_CAP:
            assert spec.max_tokens_per_session is not None and spec.max_cost_per_day_usd is not None
            assert spec.max_tokens_per_session < p.tokens
            assert spec.max_cost_per_day_usd >= p.worst_cost_nano / 1e9  # can never refuse
        else:
            assert spec.max_cost_per_day_usd is not None
            assert spec.max_cost_per_day_usd >= (p.cost_nano + 3 * p.max_call_worst_cost_nano) / 1e9
    # Two runs of the same seed: the uncapped scope's totals are identical.
    totals = []
    for _ in range(2):
        cfg, planned = demo.build_config(redis=None, prefix="p", workers=3, calls=10, n_scopes=3, seed=5, latency_ms=0)
        report = demo.run_demo(cfg, planned)
        totals.append(report.outcomes["team-c"].summary["session"])
    assert totals[0] == totals[1]


def _summary_over_cap() -> dict[str, Any]:
    """A real summary of a hard-stopped scope whose recorded usage went over its cap."""
    mgr = BudgetManager()
    mgr.register(BudgetScope("team-a", max_tokens_per_session=1000))
    mgr.record("team-a", demo.SESSION_ID, "gpt-4o-mini", 600, 0)
    with pytest.raises(BudgetExceededError):
        mgr.record("team-a", demo.SESSION_ID, "gpt-4o-mini", 600, 0)  # persisted, then raises
    return mgr.summary("team-a", demo.SESSION_ID)


def _report(summary: dict[str, Any], committed: int, tokens: int) -> demo.DemoReport:
    spec = demo.ScopeSpec("team-a", demo.ROLE_TOKEN_CAP, "gpt-4o-mini", max_tokens_per_session=1000)
    cfg = demo.DemoConfig(None, "p-00000000", 1, 2, 0, 0.0, (spec,))
    cost_nano = round(summary["session"]["cost_usd"] * 1e9)
    outcome = demo.ScopeOutcome(committed=committed, tokens=tokens, cost_nano=cost_nano, summary=summary)
    return demo.DemoReport(cfg, {"team-a": demo.Planned()}, {"team-a": outcome}, [], 0.0, BudgetManager())


def test_render_reports_a_broken_cap_and_exits_1() -> None:
    summary = _summary_over_cap()
    assert summary["limits"]["session_tokens"]["used"] == 1200
    lines, code = demo.render(_report(summary, committed=2, tokens=1200))
    assert code == 1
    assert lines[-1] == "hard caps VIOLATED: team-a session_tokens: used 1,200 > cap 1,000"
    assert not any(line.startswith("hard caps held") for line in lines)


def test_render_reports_a_ledger_mismatch_and_exits_1() -> None:
    summary = _summary_over_cap()
    lines, code = demo.render(_report(summary, committed=1, tokens=600))
    assert code == 1
    mismatch = next(line for line in lines if line.startswith("ledger MISMATCH"))
    assert "workers committed 1 calls, store has 2" in mismatch
    assert "workers used 600 tokens, store has 1200" in mismatch


def test_version_via_module_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "distbudget.cli", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"distbudget {distbudget.__version__}"


def test_a_closed_pipe_exits_quietly_offline() -> None:
    """``distbudget prices | head -1`` (no Redis): main() alone turns the broken pipe into exit
    status 141, whichever command printed; no traceback (see also test_cli_ops, ``ledger``)."""
    from distbudget.cli.main import BROKEN_PIPE

    proc = subprocess.Popen(
        [sys.executable, "-m", "distbudget.cli", "prices"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"built-in prices as of ")
    proc.stdout.close()  # what head does after its line; the table is far larger than a pipe buffer
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == BROKEN_PIPE
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "distbudget"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"distbudget {distbudget.__version__}")


def test_prices_lists_the_builtin_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices"]) == 0
    out = capsys.readouterr().out
    table = price_table()
    assert f"as of {table['as_of']}" in out.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == set(table["models"])
    for model, entry in table["models"].items():
        _name, provider, inp, outp, cached = rows[model]
        assert provider == entry["provider"]
        assert (float(inp), float(outp)) == pytest.approx((entry["input"], entry["output"]), rel=1e-5)  # 6 digits
        assert cached == ("-" if entry.get("cached_input") is None else f"{entry['cached_input']:g}")
        # The same prices the budgets charge: USD per 1M tokens is 1000 x the per-1K rate (a rate, not
        # a 1M-token call: above a long-context threshold the whole call is priced higher).
        assert ModelRates.for_model(model).input_per_1k * 1000 == pytest.approx(entry["input"])


def test_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--workers", "0"]) == 2
    assert main(["demo", "--prefix", "has space"]) == 2
    assert main([]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"distbudget {distbudget.__version__}"


def test_unreachable_redis_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--redis", "redis://127.0.0.1:1/0", "--calls", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distbudget demo: error: Redis") and "Traceback" not in err


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _redis_up(), reason=f"no Redis at {REDIS_URL}")
def test_demo_redis_processes_share_the_caps(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--redis", REDIS_URL, "--workers", "2", "--calls", "20"])
    out = capsys.readouterr().out
    assert code == 0, out
    got = assert_demo_story(out, workers=2, calls=20)
    assert f"engine redis {REDIS_URL}, 2 worker processes x 20 calls x 3 scopes" in got["header"]
    prefix = got["prefix"]
    assert prefix is not None and re.fullmatch(r"distbudget-demo-[0-9a-f]{8}", prefix)
    # Read the run's keys back with a manager of our own: the printout is what Redis holds.
    mgr = BudgetManager(redis=REDIS_URL, prefix=prefix)
    for name in SCOPES:  # registered by the demo: found by name in the shared registry
        s = mgr.summary(name, demo.SESSION_ID)["session"]
        row = got["rows"][name]
        assert (row["committed"], row["tokens"], row["cost"]) == (s["requests"], s["tokens"], round(s["cost_usd"], 6))


def test_watch_prints_fleet_alerts_once(tmp_path: Any) -> None:
    """``distbudget watch --from-start --count 2`` prints the two crossings another budget caused."""
    from distbudget import Budget
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path)
    try:
        budget = Budget(
            BudgetScope("watched", max_tokens_per_session=100),
            {"m": ModelRates(0.001, 0.001)},
            redis=server.url,
            session_id="s",
        )
        budget.record(None, "m", 85, 0)
        with pytest.raises(BudgetExceededError):
            budget.record(None, "m", 30, 0)
        done = subprocess.run(
            [sys.executable, "-m", "distbudget.cli", "watch", "--redis", server.url, "--from-start", "--count", "2"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 2
        assert "[warning]" in lines[0] and "[critical]" in lines[1]
        assert all("'watched'" in line and "session_tokens" in line for line in lines)
        assert all(line.endswith("(session s, model m)") for line in lines)  # the call that drove it
        ids = [line.split()[0] for line in lines]
        stream = redis.Redis(port=server.port).hget("distbudget:alert-streams", "watched")
        assert ids == [i.decode() for i, _ in redis.Redis(port=server.port).xrange(stream)]
    finally:
        server.stop()


def test_scopes_and_ledger_commands(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``distbudget scopes`` lists the registry with usage per limit; ``distbudget ledger`` exports a
    scope's ledger as JSON lines that sum to its totals."""
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path)
    try:
        mgr = BudgetManager(redis=server.url, prefix="ops")
        mgr.register(BudgetScope("org", max_tokens_per_day=10_000), {"m": ModelRates(0.001, 0.002)})
        mgr.register(
            BudgetScope("dev", parent="org", max_tokens_per_day=1000, max_tokens_per_session=500),
            {"m": ModelRates(0.001, 0.002)},
        )
        for i in range(4):
            mgr.record("dev", f"s{i}", "m", 100, 50)
        assert main(["scopes", "--redis", server.url, "--prefix", "ops"]) == 0  # the old name of status
        out = capsys.readouterr().out.splitlines()
        dev = next(i for i, line in enumerate(out) if line.split()[:1] == ["dev"])
        assert out[dev + 1].split() == ["day_tokens", "600", "0", "1,000", "60.0%", "0"]
        assert out[dev + 2].split() == ["session_tokens", "(top", "session)", "150", "0", "500", "30.0%", "0"]
        path = tmp_path / "dev.jsonl"
        assert main(["ledger", "org", "--redis", server.url, "--prefix", "ops", "--out", str(path)]) == 0
        assert "4 ledger entries" in capsys.readouterr().out
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["scope"] for r in rows] == ["dev"] * 4 and sum(r["tokens"] for r in rows) == 600
        assert main(["ledger", "org", "--redis", server.url, "--prefix", "ops", "--since", rows[1]["id"]]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2
        assert main(["ledger", "nobody", "--redis", server.url, "--prefix", "ops"]) == 2
        assert "unknown scope" in capsys.readouterr().err
    finally:
        server.stop()


def test_redact_hides_credentials_however_written() -> None:
    for url in (
        "redis://:s3cret@h:6379/0",
        "redis://user:s3cret@h:6379/0",
        "redis://:s3#cr?et/x@h:6379/0",
        "redis+sentinel://:s3cret@h1:26379,h2:26379/svc",
    ):
        shown = _common.redact(url)
        assert "s3" not in shown and "cret" not in shown and shown.endswith(url.rsplit("@", 1)[1])
    assert _common.redact("redis://h:6379/0") == "redis://h:6379/0"
    for url in ("redis+sentinel://h:26379/m?sentinel_password=TOPSECRET", "unix:///tmp/r.sock?db=1&password=TOPSECRET"):
        assert "TOPSECRET" not in _common.redact(url) and "password=***" in _common.redact(url)
    assert _common.redact("unix:///tmp/r.sock?db=1") == "unix:///tmp/r.sock?db=1"
