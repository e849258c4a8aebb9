"""Security: TLS (``rediss://``) with a CA the test makes, password URLs, and the documented minimal
ACL (a user confined to the key prefix and the commands distbudget uses). The behavioural suite
itself runs as that ACL user (``redis_server`` and ``redis_cluster`` in conftest); here the list is
checked against the source, and a workload with a custom prefix runs under it."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from distbudget import AsyncBudget, BackendError, Budget, BudgetExceededError, BudgetManager, BudgetScope, ModelRates
from distbudget.alerts import AlertListener
from distbudget.engines import connect as C
from tests._servers import (
    Cluster,
    RedisServer,
    free_port,
    make_tls_files,
    tls_client_options,
    tls_server_args,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
RATES = {"m": ModelRates(0.001, 0.002)}


# ---- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """redis-server with TLS only (``--port 0``), its certificate signed by a CA made here."""
    d = make_tls_files(tmp_path_factory.mktemp("tls"))
    port = free_port()
    try:
        server = RedisServer(
            d, "--port", "0", "--tls-port", str(port), *tls_server_args(d), port=port, admin=tls_client_options(d)
        )
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    server.ca = d / "ca.crt"  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_tls_url_records_and_summarises(tls_server: RedisServer) -> None:
    ca = tls_server.ca  # type: ignore[attr-defined]
    url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    budget = Budget(BudgetScope("tls", max_tokens_per_session=100), RATES, redis=url, session_id="s")
    budget.record(None, "m", 85, 0)
    with pytest.raises(BudgetExceededError):
        budget.record(None, "m", 30, 0)
    assert budget.summary()["session"]["tokens"] == 115

    async def run_async() -> int:
        ab = AsyncBudget(BudgetScope("tls", max_tokens_per_session=10**6), RATES, redis=url, session_id="s")
        await ab.record(None, "m", 5, 0)
        return int((await ab.summary())["session"]["tokens"])

    assert asyncio.run(run_async()) == 120
    heard = list(_first(AlertListener(redis=url, block_ms=100), 2))  # listeners speak TLS too
    assert [a.level.value for a in heard] == ["warning", "critical"]
    assert tls_server.client().hget("distbudget:alert-streams", "tls") is not None  # what TLS carried


def test_tls_certificate_is_verified(tls_server: RedisServer, tmp_path: Path) -> None:
    """Without the CA the server's certificate is refused; plain TCP does not reach the server."""
    url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_cert_reqs=required"
    with pytest.raises(BackendError) as info:
        Budget(BudgetScope("tls2"), RATES, redis=url).record("s", "m", 1, 1)
    assert "certificate" in str(info.value).lower()
    fail_open = Budget(BudgetScope("tls2"), RATES, redis=url, on_backend_error="allow")
    with pytest.raises(BackendError):  # a configuration error, not an outage: never journaled
        fail_open.record("s", "m", 1, 1)
    assert fail_open.backend_status["journaled"] == 0
    with pytest.raises(BackendError):
        Budget(BudgetScope("tls2"), RATES, redis=f"redis://127.0.0.1:{tls_server.port}/0").record("s", "m", 1, 1)


def test_tls_cluster_url(tmp_path: Path) -> None:
    """``rediss+cluster://``: a 3-master cluster speaking TLS only (clients and cluster bus)."""
    d = make_tls_files(tmp_path)
    try:
        cluster = Cluster(tmp_path / "nodes", tls=d)
    except (RuntimeError, subprocess.CalledProcessError):
        pytest.skip("this redis-server was built without TLS")
    try:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes)
        url = f"rediss+cluster://{hosts}?ssl_cert_reqs=required&ssl_ca_certs={d / 'ca.crt'}"
        budgets = [Budget(BudgetScope(f"t{i}", max_tokens_per_session=100), RATES, redis=url) for i in range(6)]
        for b in budgets:
            b.record("s", "m", 85, 0)
        assert [b.summary("s")["session"]["tokens"] for b in budgets] == [85] * 6
        assert len(_first(AlertListener(redis=url, block_ms=100), 6)) == 6
        shards = {cluster.client().get_node_from_key(b._core.keyspace.totals(b.name)).port for b in budgets}
        assert len(shards) > 1
    finally:
        cluster.stop()


def _first(listener: AlertListener, n: int) -> list[Any]:
    out = []
    for alert in listener:
        out.append(alert)
        if len(out) == n:
            listener.stop()
    return out


# ---- passwords ------------------------------------------------------------------------------------


def test_password_url(tmp_path: Path) -> None:
    password = "p@ss:w/rd"  # URL-special characters, percent-encoded in the URL
    server = RedisServer(tmp_path, "--requirepass", password, admin={"password": password})
    try:
        url = f"redis://:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}/0"
        budget = Budget(BudgetScope("pw", max_tokens_per_session=100), RATES, redis=url, session_id="s")
        budget.record(None, "m", 10, 0)
        assert budget.summary()["session"]["tokens"] == 10
        for bad in (f"redis://127.0.0.1:{server.port}/0", f"redis://:wrong-secret@127.0.0.1:{server.port}/0"):
            with pytest.raises(BackendError) as info:
                Budget(BudgetScope("pw"), RATES, redis=bad).record("s", "m", 1, 1)
            assert "wrong-secret" not in str(info.value)
        assert server.client().hget("distbudget:{pw}:t:pw", "t") is not None
    finally:
        server.stop()


# ---- the minimal ACL ------------------------------------------------------------------------------

# redis-py method names that are not Redis commands
NOT_COMMANDS = {
    "register_script",
    "pipeline",
    "execute",
    "execute_command",
    "initialize",
    "close",
    "aclose",
    "get_node_from_key",  # the cluster client's slot map
    "get_redis_connection",
    "get_primaries",  # the cluster client's masters (engines/functions.py: the checks on connect)
}
METHOD_TO_COMMAND = {"script_load": "script|load"}
# `distbudget doctor` also probes admin commands (INFO, CONFIG GET, XLEN, MEMORY USAGE, ACL WHOAMI,
# FUNCTION LIST) on purpose: run as a worker's ACL user it reports them as "not permitted" warnings.
ADMIN_TOOLS = {"doctor.py"}


def commands_in_source() -> dict[str, set[str]]:
    """Every Redis command distbudget can send: called in the Lua scripts, by the engines on their
    client or pipeline, and by the listeners (their steps name client methods)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "lua").rglob("*.lua")):
        for cmd in re.findall(r"\b(?:redis\.)?p?call\(\s*'([A-Za-z]+)'", path.read_text()):
            found.setdefault(cmd.lower(), set()).add(path.name)
    for path in sorted((REPO / "distbudget").rglob("*.py")):
        if path.name in ADMIN_TOOLS:
            continue
        text = path.read_text()
        methods = re.findall(r"\b(?:client|pipe)\.([a-z_]+)\(", text)
        methods += re.findall(r'execute_command\(\s*"([A-Za-z]+)"', text)
        # the engines' script and function calls, built as raw commands (engines/functions.py); its
        # checks on connect send INFO memory (in the list as info|memory), and CONFIG GET only to a
        # user refused INFO memory
        methods += [m.lower() for m in re.findall(r'\(\s*"(EVALSHA|FCALL|FCALL_RO)",', text)]
        if path.name == "alerts.py":  # the listeners' commands: Command(key, ("XACK", ...)), "XINFO STREAM"
            methods += [c.replace(" ", "|") for c in re.findall(r'\(\s*"([A-Z]+(?: [A-Z]+)?)",', text)]
        for method in methods:
            if method in NOT_COMMANDS or method == "sleep":
                continue
            found.setdefault(METHOD_TO_COMMAND.get(method, method.lower()), set()).add(path.name)
    return found


def test_the_acl_lists_every_command_the_source_sends() -> None:
    found = commands_in_source()
    assert {"evalsha", "script|load", "time", "xadd", "publish", "xread"} <= set(found)  # the scan works
    missing = {cmd: sorted(where) for cmd, where in found.items() if cmd not in C.ACL_COMMANDS}
    assert not missing, f"add to ACL_COMMANDS in distbudget/engines/connect.py (and docs/deployment.md): {missing}"
    deployment = (REPO / "docs" / "deployment.md").read_text()
    line = next(ln for ln in deployment.splitlines() if ln.startswith("ACL SETUSER"))
    assert line.split() == ["ACL", "SETUSER", "distbudget-app", "on", ">PASSWORD", *C.acl_rules("<prefix>")]


def test_workload_as_the_minimal_acl_user_with_a_custom_prefix(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    try:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", *C.acl_rules("team-7"))
        url = f"redis://app:pw@127.0.0.1:{server.port}/0"
        mgr = BudgetManager(redis=url, prefix="team-7")
        mgr.register(BudgetScope("org", max_tokens_per_day=10_000))
        mgr.register(BudgetScope("alice", parent="org", max_tokens_per_session=100), RATES)
        listener = AlertListener(redis=url, prefix="team-7", block_ms=100)
        heard: list[Any] = []
        listener.start(heard.append)
        mgr.record("alice", "s", "m", 85, 0, request_id="r1")
        mgr.record("alice", "s", "m", 85, 0, request_id="r1")  # duplicate
        with mgr.reserve("alice", "m", 5, 5, session_id="s") as hold:
            hold.commit(5, 1)
        alice = mgr.get("alice")
        alice.reserve("m", 1, 1, session_id="s").release()
        assert alice.check("m", 1, session_id="s")
        assert mgr.summary("alice", "s")["session"]["tokens"] == 91
        assert set(mgr.all_summaries()) == {"org", "alice"}
        assert len(mgr.records("alice")) == 2
        alice.reset_session("s")
        assert wait_for(lambda: len(heard) == 1)
        listener.stop()
        strict = Budget(BudgetScope("w"), RATES, redis=url + "?wait_replicas=1&wait_timeout_ms=1", prefix="team-7")
        strict.record("s", "m", 1, 0)  # WAIT is allowed (no replica here: it reports 0)
        time.sleep(0.1)
        log = admin.execute_command("ACL", "LOG")
        assert log == [], log  # nothing was refused
        user = redis.Redis(port=server.port, username="app", password="pw")
        for forbidden in (
            lambda: user.get("distbudget:{x}:t:x"),  # another prefix
            lambda: user.keys("*"),
            user.flushall,
            lambda: user.config_get("*"),
            lambda: user.publish("other-channel", "x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
    finally:
        server.stop()
