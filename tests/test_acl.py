"""Trust boundaries (issue 14): the Redis Functions library, least-privilege worker users and
prefixes kept apart, on real servers the tests start with real ACL users; and the behavioural suite
run again on the functions path, as a worker."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from distbudget import AsyncBudget, BackendError, Budget, BudgetManager, BudgetScope, InvalidInputError, ModelRates
from distbudget.alerts import AlertListener
from distbudget.engines import functions, scripts
from distbudget.engines.functions import acl_rules, install_library
from tests import test_budget, test_ledger, test_registry, test_reservations
from tests._servers import Cluster, RedisServer, wait_for
from tests.conftest import Backend, Clock, LoopThread

RATES = {"m": ModelRates(0.001, 0.002)}
WORKER = ("worker", "worker-secret")
LIBRARY, _ = scripts.library()


def make_user(node_client: Any, user: tuple[str, str], prefixes: tuple[str, ...], role: str = "worker") -> None:
    rules = dict.fromkeys(r for p in prefixes for r in acl_rules(p, role))
    node_client.execute_command("ACL", "SETUSER", user[0], "reset", "on", f">{user[1]}", *rules)


def commandstat(server: RedisServer, command: str) -> int:
    return int(server.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def nopermission(call: Callable[[], Any]) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:  # a function's own call refused: "ERR ... can't run this command"
        return "can't run this command" in str(exc) or "no permissions" in str(exc)
    return False


# ---- the rules ----------------------------------------------------------------------------------------


def test_worker_rules_grant_no_lua_of_its_own_and_one_prefix() -> None:
    worker, admin = acl_rules("acme"), acl_rules("acme", "admin")
    assert worker[:3] == ["~acme:*", "&acme:*", "-@all"]
    for forbidden in ("+eval", "+evalsha", "+eval_ro", "+script|load", "+function|load", "+config|get", "+keys"):
        assert forbidden not in worker
    assert {"+fcall", "+fcall_ro", "+info|memory"} <= set(worker)
    assert set(worker) < set(admin) and "+function|load" in admin
    with pytest.raises(ValueError, match="role"):
        acl_rules("acme", "root")


def test_a_worker_holds_every_command_the_scripts_call() -> None:
    """Redis checks each command a function calls against the caller's ACL."""
    import re

    called = set()
    for path in scripts.lua_dir().rglob("*.lua"):
        called |= {c.lower() for c in re.findall(r"\bcall\(\s*'([A-Za-z]+)'", path.read_text())}
    assert {"hset", "zadd", "xadd", "publish", "time"} <= called  # the scan works
    assert called <= {r[1:] for r in acl_rules("acme")}


@pytest.mark.parametrize("prefix", ["acme:b", "acme*", "a?c", "a[b]", "a\\b", "a{b}", "a b", ""])
def test_a_prefix_holds_no_separator_nor_glob(prefix: str, redis_client: redis.Redis) -> None:
    with pytest.raises(InvalidInputError, match="prefix"):
        Budget(BudgetScope("s"), RATES, prefix=prefix)
    with pytest.raises(InvalidInputError):
        acl_rules(prefix)
    assert redis_client.dbsize() == 0  # nothing written


# ---- the library -------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    yield s
    s.stop()


def test_install_is_idempotent_and_upgrades_beside_the_old_version(server: RedisServer) -> None:
    admin = server.client()
    old = "#!lua name=distbudget_0ld\nredis.register_function('distbudget_0ld_version', function() return 1 end)"
    admin.function_load(old)
    (node,) = install_library(admin)
    assert install_library(admin) == {node: "present"}
    assert sorted(functions.installed_libraries(admin)) == sorted([LIBRARY, "distbudget_0ld"])
    assert install_library(admin, prune=True) == {node: "present, removed distbudget_0ld"}
    assert functions.installed_libraries(admin) == [LIBRARY]


def test_the_path_follows_the_library(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    budget = Budget(BudgetScope("p", max_tokens_per_session=100), RATES, redis=server.admin_url, session_id="s")
    with caplog.at_level(logging.DEBUG, logger="distbudget"):
        budget.record(None, "m", 10, 0)
    assert budget.engine.path == "scripts" and "calls scripts (EVALSHA)" in caplog.text
    install_library(server.client())
    evalsha = commandstat(server, "evalsha")
    fresh = Budget(BudgetScope("p", max_tokens_per_session=100), RATES, redis=server.admin_url, session_id="s")
    with caplog.at_level(logging.DEBUG, logger="distbudget"):
        fresh.record(None, "m", 10, 0)
    assert fresh.engine.path == "functions" and f"calls the Redis Functions library {LIBRARY}" in caplog.text
    assert commandstat(server, "fcall") == 1 and commandstat(server, "evalsha") == evalsha
    assert fresh.summary()["session"]["tokens"] == 20  # both paths charge the same keys
    half = functions.survey({"a:1": [{}, LIBRARY, None], "b:2": [{}, redis.ResponseError("Function not found"), None]})
    assert half.path == "scripts" and "not on b:2" in half.describe()  # an install half done


def test_a_lost_library_falls_back_to_scripts_where_the_user_may_load_them(server: RedisServer) -> None:
    admin = server.client()
    install_library(admin)
    make_user(admin, WORKER, ("distbudget",))
    worker_url = f"redis://{WORKER[0]}:{WORKER[1]}@127.0.0.1:{server.port}/0"
    scope = BudgetScope("lost", max_tokens_per_session=100)
    owner = Budget(scope, RATES, redis=server.admin_url, session_id="s")
    worker = Budget(scope, RATES, redis=worker_url, session_id="s")
    owner.record(None, "m", 10, 0)
    worker.record(None, "m", 10, 0)
    assert owner.engine.path == worker.engine.path == "functions"
    admin.function_flush()  # or a restart without persistence
    owner.record(None, "m", 10, 0)  # the function did not run: its script did, once
    with owner.reserve("m", 5, 5) as hold:
        hold.commit(5, 5)
    owner.record_many([("s", "m", 1, 0)])
    with pytest.raises(BackendError, match="distbudget install"):
        worker.record(None, "m", 10, 0)
    assert owner.summary()["session"]["tokens"] == 41  # nothing lost, nothing counted twice
    install_library(admin)
    assert worker.summary()["session"]["tokens"] == 41  # checked again after the error: functions


# ---- a worker user -------------------------------------------------------------------------------------


def _worker_workload(url: str, prefix: str) -> list[Any]:
    """Everything a worker does: registers, records (a retry too), reserves, commits, releases,
    checks, summarises, reads the ledger, resets a session, batches, and listens."""
    mgr = BudgetManager(redis=url, prefix=prefix)
    mgr.register(BudgetScope("org", max_tokens_per_day=10_000), RATES)
    mgr.register(BudgetScope("alice", parent="org", max_tokens_per_session=100), RATES)
    listener = AlertListener(redis=url, prefix=prefix, block_ms=100)
    heard: list[Any] = []
    listener.start(heard.append)
    try:
        mgr.record("alice", "s", "m", 85, 0, request_id="r1")
        mgr.record("alice", "s", "m", 85, 0, request_id="r1")  # the retry is not charged again
        with mgr.reserve("alice", "m", 5, 5, session_id="s") as hold:
            hold.commit(5, 1)
        alice = mgr.get("alice")
        alice.reserve("m", 1, 1, session_id="s").release()
        assert alice.check("m", 1, session_id="s")
        alice.record_many([("t", "m", 1, 0), ("t", "m", 2, 0)])
        assert mgr.summary("alice", "s")["session"]["tokens"] == 91
        assert set(mgr.all_summaries()) == {"org", "alice"}
        assert len(mgr.records("alice")) == 4
        alice.reset_session("s")
        assert wait_for(lambda: len(heard) == 1)  # the WARNING at 80 of 100
        assert alice.engine.path == "functions"
    finally:
        listener.stop()
    return heard


def _forbidden(worker: Any, own_key: str, other_key: str) -> dict[str, Callable[[], Any]]:
    record = scripts.function_name("record")
    return {
        "EVAL": lambda: worker.eval("return 1", 0),
        "EVALSHA": lambda: worker.evalsha("0" * 40, 0),
        "SCRIPT LOAD": lambda: worker.script_load("return 1"),
        "FUNCTION LOAD": lambda: worker.function_load("#!lua name=x\nredis.register_function('x', function() end)"),
        "FUNCTION DELETE": lambda: worker.function_delete(LIBRARY),
        "FUNCTION FLUSH": worker.function_flush,
        "CONFIG GET": lambda: worker.config_get("*"),
        "KEYS": lambda: worker.keys("*"),
        "FLUSHALL": worker.flushall,
        "GET other prefix": lambda: worker.get(other_key),
        "HGETALL other prefix": lambda: worker.hgetall("acme2:registry"),
        "HSET other prefix": lambda: worker.hset(other_key, "c", 0),
        "DEL other prefix": lambda: worker.delete(other_key),
        "XRANGE other prefix": lambda: worker.xrange("acme2:{org}:ledger"),
        "FCALL other prefix": lambda: worker.fcall(record, 1, other_key, "", 0, 0, 0, "", "", "", ""),
        "PUBLISH other prefix": lambda: worker.publish("acme2:alerts", "x"),
    }


def test_a_worker_with_the_printed_rules_runs_everything_and_nothing_more(server: RedisServer) -> None:
    admin = server.client()
    install_library(admin)
    make_user(admin, WORKER, ("acme",))
    other = BudgetManager(redis=server.admin_url, prefix="acme2")  # another tenant, written as admin
    other.register(BudgetScope("org", max_tokens_per_day=10_000), RATES)
    other.record("org", "s", "m", 5, 0)
    url = f"redis://{WORKER[0]}:{WORKER[1]}@127.0.0.1:{server.port}/0"
    evalsha = commandstat(server, "evalsha")
    _worker_workload(url, "acme")
    strict = Budget(BudgetScope("w"), RATES, redis=url + "?wait_replicas=1&wait_timeout_ms=1", prefix="acme")
    strict.record("s", "m", 1, 0)  # FCALL and WAIT in one pipeline (no replica here: WAIT answers 0)
    strict.record_many([("s", "m", 1, 0), ("s", "m", 2, 0)])
    assert strict.summary("s")["session"]["tokens"] == 4 and strict.engine.under_replicated == 3
    assert admin.execute_command("ACL", "LOG") == []  # nothing the worker did was refused
    assert commandstat(server, "evalsha") == evalsha  # every script ran as a function

    worker = server.client(*WORKER)
    other_key = "acme2:{org}:t:org"
    refused = {name: nopermission(call) for name, call in _forbidden(worker, "acme:{org}:t:org", other_key).items()}
    assert refused == dict.fromkeys(refused, True)
    with pytest.raises(BackendError, match=r"NOPERM|permission"):
        Budget(BudgetScope("org"), RATES, redis=url, prefix="acme2").record("s", "m", 1, 0)
    assert other.summary("org", "s")["session"]["tokens"] == 5  # the other tenant is untouched


def test_functions_run_with_the_callers_acl(server: RedisServer) -> None:
    """Why a worker holds HSET, ZADD, ... on its keys: Redis checks each command a function runs
    against the caller's ACL. So the rules keep a worker from running Lua of its own and from any
    other prefix, but cannot stop it writing its own keys directly (see docs/deployment-acl.md)."""
    admin = server.client()
    install_library(admin)
    rules = [r for r in acl_rules("acme") if r != "+hset"]
    admin.execute_command("ACL", "SETUSER", "nohset", "reset", "on", ">pw", *rules)
    url = f"redis://nohset:pw@127.0.0.1:{server.port}/0"
    with pytest.raises(BackendError, match=r"can.t run this command|no permissions"):
        Budget(BudgetScope("org"), RATES, redis=url, prefix="acme").record("s", "m", 1, 0)
    make_user(admin, WORKER, ("acme",))
    worker = server.client(*WORKER)
    assert worker.hset("acme:{org}:t:org", "t", 0) == 1  # the limit of ACLs: its own keys are writable


def test_a_worker_on_the_cluster(redis_cluster: Cluster) -> None:
    admin = redis_cluster.client()
    try:
        assert set(install_library(admin).values()) == {"installed"}  # on every master
        assert set(install_library(admin).values()) == {"present"}
        for node in redis_cluster.nodes:
            make_user(node.client(), WORKER, ("acme",))
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in redis_cluster.nodes)
        url = f"redis+cluster://{WORKER[0]}:{WORKER[1]}@{hosts}"
        BudgetManager(redis=redis_cluster.url, prefix="acme2").register(BudgetScope("org"), RATES)
        for node in redis_cluster.nodes:
            node.client().execute_command("ACL", "LOG", "RESET")
        evalsha = [commandstat(node, "evalsha") for node in redis_cluster.nodes]
        heard = _worker_workload(url, "acme")
        assert [a.level.value for a in heard] == ["warning"]
        assert [commandstat(node, "evalsha") for node in redis_cluster.nodes] == evalsha  # functions only
        for node in redis_cluster.nodes:
            assert node.client().execute_command("ACL", "LOG") == []
        asyncio.run(_async_worker(url))
        for node in redis_cluster.nodes:  # each node checks its own keys' commands
            worker = node.client(*WORKER)
            refused = {n: nopermission(c) for n, c in _forbidden(worker, "acme:{x}:t:x", "acme2:{x}:t:x").items()}
            assert refused == dict.fromkeys(refused, True), node.port
    finally:
        for node in redis_cluster.nodes:
            node.client().function_flush()
            node.client().execute_command("ACL", "DELUSER", WORKER[0])
            node.client().execute_command("ACL", "LOG", "RESET")


async def _async_worker(url: str) -> None:
    """The asyncio engine on the functions path (each call routed to its key's node)."""
    budgets = [
        AsyncBudget(BudgetScope(f"a{i}", max_tokens_per_session=100), RATES, redis=url, prefix="acme") for i in range(4)
    ]
    for b in budgets:
        await b.record("s", "m", 60, 0)
        async with b.reserve("m", 10, 10, session_id="s") as hold:
            await hold.commit(10, 5)
        assert (await b.summary("s"))["session"]["tokens"] == 75
        assert b.engine.path == "functions"


# ---- the behavioural suite on the functions path, as a worker -------------------------------------------


@pytest.fixture(scope="module")
def functions_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("functions"))
    install_library(server.client())
    make_user(server.client(), WORKER, ("distbudget", "pfx"))
    yield server
    server.stop()


# It flushes the Functions too: a worker, who may not load scripts, cannot go on (see
# test_a_lost_library_falls_back_to_scripts_where_the_user_may_load_them).
NOT_AS_WORKER = {"test_script_cache_loss_is_invisible"}


def _behaviour() -> list[Any]:
    tests = []
    for module in (test_budget, test_reservations, test_ledger, test_registry):
        for name, test in sorted(vars(module).items()):
            if name.startswith("test_") and callable(test):
                params = set(inspect.signature(test).parameters)
                if "backend" in params and params <= {"backend", "clock"} and name not in NOT_AS_WORKER:
                    tests.append(pytest.param(test, id=f"{module.__name__.rsplit('.', 1)[1]}.{name}"))
    return tests


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("test", _behaviour())
def test_behaviour_on_the_functions_path(test: Any, api: str, functions_server: RedisServer) -> None:
    admin = functions_server.client()
    admin.flushall()
    install_library(admin)
    admin.execute_command("ACL", "LOG", "RESET")
    runner = LoopThread() if api == "async" else None
    backend = Backend("redis", admin, api, runner, client=functions_server.client(*WORKER))
    port = functions_server.port
    backend.connect_async = lambda: redis.asyncio.Redis(port=port, username=WORKER[0], password=WORKER[1])
    evalsha = commandstat(functions_server, "evalsha")
    try:
        kwargs = {"backend": backend, "clock": Clock()}
        test(**{k: v for k, v in kwargs.items() if k in inspect.signature(test).parameters})
    finally:
        if runner is not None:
            if backend.async_store is not None:
                runner.run(backend.async_store.aclose())
            runner.close()
    assert commandstat(functions_server, "evalsha") == evalsha  # nothing ran as a script
    assert admin.execute_command("ACL", "LOG") == []


def test_the_deployment_docs_show_the_printed_rules() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "deployment-acl.md").read_text()
    line = next(ln for ln in page.splitlines() if ln.startswith("ACL SETUSER acme-worker"))
    assert line.split() == ["ACL", "SETUSER", "acme-worker", "reset", "on", ">PASSWORD", *acl_rules("acme")]
    admin_only = [r for r in acl_rules("acme", "admin") if r not in acl_rules("acme")]
    assert f"add `{' '.join(admin_only)}`" in page


# ---- the CLI -----------------------------------------------------------------------------------------


def test_cli_install_and_acl(server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    from distbudget.cli import main

    assert main(["install", "--redis", server.admin_url]) == 0
    assert f"{LIBRARY} installed" in capsys.readouterr().out
    assert main(["install", "--redis", server.admin_url]) == 0
    assert f"{LIBRARY} present" in capsys.readouterr().out
    assert main(["acl", "--prefix", "acme"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[2] for ln in lines] == ["acme-worker", "acme-admin"]
    admin = server.client()
    admin.execute_command(*lines[0].replace(">PASSWORD", ">pw").split())  # the printed line, as is
    url = f"redis://acme-worker:pw@127.0.0.1:{server.port}/0"
    budget = Budget(BudgetScope("cli", max_tokens_per_session=100), RATES, redis=url, prefix="acme")
    budget.record("s", "m", 10, 0)
    assert budget.engine.path == "functions" and admin.execute_command("ACL", "LOG") == []
    assert main(["acl", "--prefix", "acme:b"]) == 2  # refused: no tenant's pattern may match another's
