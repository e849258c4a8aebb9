"""The Prometheus exporter: its text parsed by prometheus_client's own parser equals the store's
counters; ``distbudget exporter`` serves it; a scrape of 1,000 scopes is one registry read and one
pipeline (timed and printed, never asserted); the process's client metrics count real calls."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from distbudget import BackendError, Budget, BudgetManager, BudgetScope, Limit, ModelRates
from distbudget.exporter import BudgetCollector, instrument, registry_for
from tests.conftest import RedisServer

PREFIX = "pfx"
RATES = {"m": ModelRates(0.001, 0.002), "n": ModelRates(0.01, 0.03)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from an exposition, through prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(got: dict[Any, float], name: str, **labels: str) -> float:
    return got[name, tuple(sorted(labels.items()))]


@pytest.fixture
def fleet(redis_server: RedisServer, redis_client: redis.Redis) -> BudgetManager:
    mgr = BudgetManager(redis=redis_server.url, prefix=PREFIX)
    mgr.register(BudgetScope("org", max_cost_per_day_usd=2.0, limits=[Limit("requests", 100, "hour")]), RATES)
    mgr.register(BudgetScope("team {a}", parent="org", max_tokens_per_day=50_000, max_tokens_per_session=1000), RATES)
    mgr.record("team {a}", "u1", "m", 400, 100)
    mgr.record("team {a}", "u2", "n", 300, 200)
    mgr.record("org", "u3", "m", 1000, 0)
    return mgr


def test_exposition_parses_and_equals_the_counters(fleet: BudgetManager, redis_server: RedisServer) -> None:
    hold = fleet.reserve("team {a}", "m", 100, 50, session_id="u1")
    text = generate_latest(registry_for([BudgetCollector(redis_server.url, prefix=PREFIX)])).decode()
    got = samples(text)
    assert value(got, "distbudget_up") == 1 and value(got, "distbudget_scopes") == 2
    for scope in ("org", "team {a}"):
        summary = fleet.summary(scope)
        for key, lim in summary["limits"].items():
            if lim["scope"] != scope:
                continue
            labels = {"scope": scope, "limit": key, "metric": lim["metric"]}
            assert value(got, "distbudget_limit", **labels) == lim["limit"]
            assert value(got, "distbudget_refusals_total", **labels) == lim["refusals"] == 0  # none refused
            if lim["window"] == "session":  # per session: the value only, no session labels
                assert ("distbudget_used", tuple(sorted(labels.items()))) not in got
                continue
            assert value(got, "distbudget_used", **labels) == lim["used"]
            assert value(got, "distbudget_held", **labels) == lim["held"]
            assert value(got, "distbudget_used_ratio", **labels) == lim["pct"]
        for model, row in summary["per_model"].items():
            assert value(got, "distbudget_spend_usd_total", scope=scope, model=model) == row["cost_usd"]
            assert value(got, "distbudget_tokens_total", scope=scope, model=model) == row["tokens"]
            assert value(got, "distbudget_requests_total", scope=scope, model=model) == row["requests"]
    assert value(got, "distbudget_held", scope="team {a}", limit="day_tokens", metric="tokens") == 150
    assert value(got, "distbudget_used", scope="org", limit="day_cost_usd", metric="cost") == pytest.approx(
        (1000 * 0.001 + 400 * 0.001 + 100 * 0.002 + 300 * 0.01 + 200 * 0.03) / 1000
    )
    # no session or request labels anywhere
    assert all(set(dict(labels)) <= {"scope", "limit", "metric", "model", "operation", "le"} for _n, labels in got)
    hold.release()


def test_a_lost_server_is_up_0_not_an_error(tmp_path: Any) -> None:
    server = RedisServer(tmp_path)
    mgr = BudgetManager(redis=server.url, prefix=PREFIX)
    mgr.register(BudgetScope("org", max_tokens_per_day=10), RATES)
    collector = BudgetCollector(mgr)
    assert value(samples(generate_latest(registry_for([collector])).decode()), "distbudget_up") == 1
    server.stop()
    got = samples(generate_latest(registry_for([collector])).decode())
    assert value(got, "distbudget_up") == 0 and len(got) == 1


def test_client_metrics_count_this_processs_calls(fleet: BudgetManager, redis_server: RedisServer) -> None:
    mgr = BudgetManager(redis=redis_server.url, prefix=PREFIX)
    metrics = instrument(mgr)
    budget = mgr.get("team {a}")
    for i in range(7):
        budget.record(f"s{i}", "m", 10, 5)
    with budget.reserve("m", 10, 5, session_id="s0") as hold:
        hold.commit(10, 5)
    got = samples(generate_latest(registry_for([BudgetCollector(client=metrics)])).decode())
    assert value(got, "distbudget_client_calls_total", operation="record") == 7
    assert value(got, "distbudget_client_latency_seconds_count", operation="record") == 7
    assert value(got, "distbudget_client_latency_seconds_bucket", operation="record", le="+Inf") == 7
    assert value(got, "distbudget_client_calls_total", operation="reserve") == 1
    assert value(got, "distbudget_client_calls_total", operation="commit") == 1
    assert value(got, "distbudget_client_errors_total", operation="record") == 0
    assert value(got, "distbudget_client_degraded") == 0 and value(got, "distbudget_client_journal_length") == 0
    buckets = [v for (name, labels), v in got.items() if name.endswith("_bucket") and ("operation", "record") in labels]
    assert sorted(buckets) == buckets or max(buckets) == 7  # cumulative


def test_exporter_command_serves_metrics(fleet: BudgetManager, redis_server: RedisServer) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distbudget.cli",
            "exporter",
            "--redis",
            redis_server.url,
            "--prefix",
            PREFIX,
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("distbudget exporter: reading redis://***@")
        url = proc.stderr.readline().strip().rsplit(" ", 1)[1]
        assert url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=30) as response:
            got = samples(response.read().decode())
        assert value(got, "distbudget_used", scope="team {a}", limit="day_tokens", metric="tokens") == 1000
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class RoundTrips:
    """Counts the commands and pipelines a redis-py client sends (wrapping, not replacing, its sends)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipelines: list[int] = []
        self.commands: list[str] = []
        execute = redis.client.Pipeline.execute
        command = redis.Redis.execute_command

        def counted_execute(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            self.pipelines.append(len(pipe.command_stack))
            return execute(pipe, *args, **kwargs)

        def counted_command(client: Any, *args: Any, **kwargs: Any) -> Any:
            self.commands.append(str(args[0]))
            return command(client, *args, **kwargs)

        monkeypatch.setattr(redis.client.Pipeline, "execute", counted_execute)
        monkeypatch.setattr(redis.Redis, "execute_command", counted_command)


def test_a_scrape_of_1000_scopes_is_one_registry_read_and_one_pipeline(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = BudgetManager(redis=redis_server.url, prefix=PREFIX)
    mgr.register(BudgetScope("org", max_cost_per_day_usd=1000.0), RATES)
    for i in range(1000):
        mgr.register(
            BudgetScope(f"team-{i}", parent="org", max_tokens_per_day=10_000, max_tokens_per_session=500), RATES
        )
    mgr.get("team-0").record_many([("s", "m", 10, 10)])
    for i in range(0, 1000, 100):
        mgr.record(f"team-{i}", "s", "m", i // 2, 1)
    collector = BudgetCollector(redis_server.url, prefix=PREFIX)
    registry = registry_for([collector])
    generate_latest(registry)  # the first scrape builds the budgets
    trips = RoundTrips(monkeypatch)
    took = []
    for _ in range(3):
        began = time.perf_counter()
        text = generate_latest(registry).decode()
        took.append(time.perf_counter() - began)
    got = samples(text)
    assert value(got, "distbudget_scopes") == 1001
    assert value(got, "distbudget_used", scope="team-500", limit="day_tokens", metric="tokens") == 251
    assert trips.commands == ["HGETALL"] * 3  # the registry, once per scrape ...
    assert trips.pipelines == [1001] * 3  # ... and one pipeline of every scope's summary
    print(
        f"\nscrape of 1,001 scopes: best {min(took) * 1000:.0f} ms, worst {max(took) * 1000:.0f} ms "
        f"(scrape_duration_seconds {value(got, 'distbudget_scrape_duration_seconds') * 1000:.0f} ms)"
    )


@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_client_metrics_count_the_fast_paths_charges(backend: str, tmp_path: Any) -> None:
    server = RedisServer(tmp_path) if backend == "redis" else None
    try:
        options: dict[str, Any] = {"redis": server.url} if server else {}
        budget = Budget(BudgetScope("solo", max_tokens_per_session=10**9), RATES, session_id="s", **options)
        budget.record("s", "m", 10, 5)  # the usual path (the first call announces, compiles the plan)
        metrics = instrument(budget)
        before = budget.engine.execute
        for _ in range(9):
            budget.record("s", "m", 10, 5)  # the fast path: no engine.execute
        assert budget.engine.execute is before and budget.summary()["session"]["requests"] == 10
        got = samples(generate_latest(registry_for([BudgetCollector(client=metrics)])).decode())
        assert value(got, "distbudget_client_calls_total", operation="record") == 9
        assert value(got, "distbudget_client_latency_seconds_count", operation="record") == 9
        assert value(got, "distbudget_client_errors_total", operation="record") == 0
        if server is not None:  # a charge the fast path sends to a lost server: one call, failed
            server.stop()
            with pytest.raises(BackendError):
                budget.record("s", "m", 10, 5)
            got = samples(generate_latest(registry_for([BudgetCollector(client=metrics)])).decode())
            assert value(got, "distbudget_client_calls_total", operation="record") == 10
            assert value(got, "distbudget_client_errors_total", operation="record") == 1
    finally:
        if server is not None:
            server.stop()
