"""``distbudget doctor``: is this server fit to hold a fleet's budgets? One pass / warn / fail line per
check; exit status 1 when any check fails."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distbudget._core.keys import KeySpace, alert_index_key
from distbudget.cli._common import GREEN, RED, RESET, YELLOW, Connection, connect, use_colour
from distbudget.engines import functions

PASS, WARN, FAIL = "pass", "warn", "fail"
MIN_VERSION = (6, 2)  # XAUTOCLAIM-era streams and the scripts' commands; Functions need 7.0
SKEW_WARN_S = 1.0


@dataclass
class Check:
    status: str  # pass | warn | fail
    name: str
    detail: str


def run(args: argparse.Namespace) -> int:
    """Check that the server can hold this fleet's budgets: Redis version, eviction policy, the ACL
    rights workers need, the script or Functions path in use, clock skew between this machine and
    the server, registry and ledger sizes. Exit status 1 if any check fails."""
    conn = connect(args, need="")
    checks = diagnose(conn)
    colour = use_colour(sys.stdout, args.color)
    tint = {PASS: GREEN, WARN: YELLOW, FAIL: RED}
    for c in checks:
        label = f"{c.status.upper():<4}"
        if colour:
            label = tint[c.status] + label + RESET
        print(f"{label}  {c.name:<10}  {c.detail}")
    return 1 if any(c.status == FAIL for c in checks) else 0


def diagnose(conn: Connection) -> list[Check]:
    steps: list[tuple[str, Callable[[Connection], Check]]] = [
        ("server", _version),
        ("eviction", _eviction),
        ("acl", _acl),
        ("scripts", _scripts),
        ("clock", _clock),
        ("registry", _registry),
        ("ledger", _ledgers),
        ("prices", _prices),
    ]
    out = []
    for name, step in steps:
        try:
            out.append(step(conn))
        except Exception as exc:  # one check's failure (a lost connection) is that check's line
            if _denied(exc):  # an admin command a worker's ACL does not grant: not the server's fault
                out.append(Check(WARN, name, f"not permitted for this user, run doctor as an admin: {exc}"))
            else:
                out.append(Check(FAIL, name, f"{type(exc).__name__}: {exc}"))
    return out


def _denied(exc: Exception) -> bool:
    return "NOPERM" in str(exc) or "no permissions" in str(exc).lower()


def _info(client: Any, section: str) -> dict[str, Any]:
    info = client.info(section)
    if info and all(isinstance(v, dict) for v in info.values()) and "redis_version" not in info:
        return next(iter(info.values()))  # a Cluster client answers per node: any node will do
    return dict(info)


def _version(conn: Connection) -> Check:
    info = _info(conn.client, "server")
    version = str(info.get("redis_version", "?"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    mode = info.get("redis_mode", "standalone")
    if parts < MIN_VERSION:
        return Check(FAIL, "server", f"Redis {version} ({mode}): distbudget needs 6.2 or later")
    note = "" if parts >= (7, 0) else "; Redis Functions (distbudget install) need 7.0"
    return Check(PASS if not note else WARN, "server", f"Redis {version} ({mode}){note}")


def _eviction(conn: Connection) -> Check:
    try:
        policy = conn.client.config_get("maxmemory-policy").get("maxmemory-policy", "?")
        maxmemory = int(conn.client.config_get("maxmemory").get("maxmemory", 0))
    except Exception:  # CONFIG is an admin command: a least-privilege user may not run it
        policy = _info(conn.client, "memory").get("maxmemory_policy", "?")
        maxmemory = int(_info(conn.client, "memory").get("maxmemory", 0))
    limit = "no maxmemory" if not maxmemory else f"maxmemory {maxmemory:,} bytes"
    if policy == "noeviction":
        return Check(PASS, "eviction", f"maxmemory-policy noeviction ({limit}): counters are never evicted")
    if policy.startswith("allkeys") or maxmemory:
        # allkeys-*: any key may go, the registry and totals included; volatile-*: keys with a TTL
        # (sessions, windows, holds) may vanish, silently refunding spend
        return Check(FAIL, "eviction", f"maxmemory-policy {policy} ({limit}): Redis may evict budget counters")
    return Check(WARN, "eviction", f"maxmemory-policy {policy} ({limit}): set noeviction before setting maxmemory")


def _acl(conn: Connection) -> Check:
    """Run what a worker runs (read-only forms), on the keys of this prefix."""
    client = conn.client
    try:
        user = _text(client.execute_command("ACL", "WHOAMI"))
    except Exception:
        user = "?"
    needed: dict[str, Callable[[], object]] = {
        "HGETALL registry": lambda: client.hgetall(conn.registry),
        "HGETALL alert-streams": lambda: client.hgetall(alert_index_key(conn.prefix)),
        "XREVRANGE (ledger)": lambda: [client.xrevrange(key, count=1) for key in _ledger_keys(conn)[:1]],
        "the summary script (FCALL or EVALSHA)": lambda: _summary_probe(conn),
    }
    denied = []
    for what, call in needed.items():
        try:
            call()
        except Exception as exc:
            if _denied(exc):
                denied.append(what)
            else:
                raise
    if denied:
        return Check(FAIL, "acl", f"user {user} may not run: {', '.join(denied)}")
    return Check(PASS, "acl", f"user {user} may read the registry, the alert index and the ledger, and run the scripts")


def _summary_probe(conn: Connection) -> None:
    names = [_text(n) for n in conn.client.hkeys(conn.registry)[:1]]
    if names:
        conn.manager().summary(names[0])


def _scripts(conn: Connection) -> Check:
    """Which path workers take: the Functions library (FCALL) when this version is on every master,
    else the scripts (EVALSHA); a library on some masters only is a half-done install."""
    server = functions.probe(conn.client)
    partial = server.path != functions.FUNCTIONS and bool(server.installed)
    return Check(WARN if partial else PASS, "scripts", server.describe())


def _clock(conn: Connection) -> Check:
    before = time.time()
    seconds, micros = conn.client.time()
    after = time.time()
    skew = seconds + micros / 1e6 - (before + after) / 2
    detail = f"server clock {skew:+.3f} s from this machine's (round trip {(after - before) * 1000:.1f} ms)"
    # distbudget charges by the server's clock only, so skew never miscounts; it misleads humans
    # comparing timestamps, and reveals a machine without NTP.
    return Check(PASS if abs(skew) < SKEW_WARN_S else WARN, "clock", detail)


def _registry(conn: Connection) -> Check:
    names = len(conn.client.hkeys(conn.registry))
    if not names:
        return Check(FAIL, "registry", f"no registry under prefix {conn.prefix!r}: no scope was registered")
    size = _memory(conn.client, conn.registry)
    return Check(PASS, "registry", f"{names:,} scopes registered{size}")


def _ledgers(conn: Connection) -> Check:
    ledgers = _ledger_keys(conn)
    if not ledgers:
        return Check(WARN, "ledger", "no scope tree registered")
    lengths = [conn.client.xlen(key) for key in ledgers]
    largest = max(range(len(ledgers)), key=lambda i: lengths[i])
    return Check(
        PASS,
        "ledger",
        f"{len(ledgers):,} trees, {sum(lengths):,} entries; largest {ledgers[largest]} "
        f"({lengths[largest]:,}{_memory(conn.client, ledgers[largest])})",
    )


def _prices(_conn: Connection) -> Check:
    """The bundled price table's age: prices go stale (a fleet-wide book is checked by its owner)."""
    import datetime as dt

    from distbudget._core.prices import DEFAULT_MAX_AGE_DAYS, bundled_table

    table = bundled_table()
    if table.as_of is None:
        return Check(WARN, "prices", f"the bundled prices carry no date ({table.source})")
    age = (dt.date.today() - table.as_of).days
    detail = f"bundled prices as of {table.as_of.isoformat()} ({age} days old, {len(table.rates):,} models)"
    if age > DEFAULT_MAX_AGE_DAYS:
        return Check(WARN, "prices", f"{detail}: older than {DEFAULT_MAX_AGE_DAYS} days, upgrade or load a PriceBook")
    return Check(PASS, "prices", detail)


def _ledger_keys(conn: Connection) -> list[str]:
    """The ledger stream of every registered tree (one per root scope)."""
    configs = [json.loads(_text(v)) for v in conn.client.hgetall(conn.registry).values()]
    return sorted(KeySpace(conn.prefix, c["name"]).ledger for c in configs if c["parent"] is None)


def _memory(client: Any, key: str) -> str:
    try:
        used = client.memory_usage(key)
    except Exception:
        return ""
    return "" if used is None else f", {used / 1024:,.1f} KB"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
