"""A read-only view of a whole fleet (one prefix): every registered scope with, per limit, used /
held / limit / % and refusals, session limits with their top sessions. What ``distbudget status``,
the Prometheus exporter and the dashboard show; they all read it through :class:`FleetReader`.

The read is bounded whatever the number of scopes: one ``HGETALL`` of the registry, then one
pipeline holding every scope's ``summary`` script (on a Cluster, one pipeline per node). With
``sessions`` the tail of each tree's ledger is read first (one more pipeline): the sessions seen
there are the candidates for a scope's top sessions, whose summaries ride in the same pipeline.
Nothing scans the keyspace.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from distbudget._accounting import DEFAULT_SESSION
from distbudget._core import plan as P
from distbudget._core.keys import registry_key
from distbudget._core.ops import LedgerRead, LedgerRow, RegistryChain, RegistryNames, Step, SummaryResult
from distbudget._exceptions import BackendError, UnknownScopeError
from distbudget.budget import Budget
from distbudget.manager import BudgetManager

SCHEMA_VERSION = 1
# Ledger entries read per tree to find a scope's recent sessions, and candidates kept per scope.
LEDGER_TAIL = 1000
MAX_CANDIDATES = 50


@dataclass
class SessionRow:
    """One session's use of a per-session limit."""

    session_id: str
    metric: str
    used: float
    held: float
    limit: float
    pct: float
    refusals: int | None = None  # not counted per session (the limit's row has the scope's count)


@dataclass
class LimitRow:
    """One limit of a scope. ``per_session``: counted per session id, so ``used``/``held``/``pct``
    are those of the busiest session found (``sessions`` lists the top ones)."""

    limit_type: str
    metric: str  # tokens | cost | requests
    window: str
    model: str | None
    limit: float
    used: float
    held: float
    remaining: float
    pct: float
    refusals: int | None  # calls refused by the limit since the scope's reset (None: not counted)
    thresholds: list[float]  # alert thresholds as fractions of the limit, the last is 1.0
    per_session: bool = False
    sessions: list[SessionRow] = field(default_factory=list)


@dataclass
class ScopeRow:
    name: str
    parent: str | None
    depth: int
    hard_stop: bool
    total: dict[str, Any]  # tokens, cost_usd, requests since the last reset
    per_model: dict[str, dict[str, Any]]
    limits: list[LimitRow]

    @property
    def peak(self) -> float:
        """The highest % of any of its limits (how the tree is sorted)."""
        return max((lim.pct for lim in self.limits), default=0.0)


@dataclass
class Snapshot:
    prefix: str
    read_at: float  # the server's clock, seconds
    scopes: list[ScopeRow]  # tree order: each scope after its parent, siblings by peak % (highest first)

    def as_json(self) -> dict[str, Any]:
        """The documented ``distbudget status --json`` schema (docs/operate.md)."""
        return {"version": SCHEMA_VERSION, "prefix": self.prefix, "read_at": self.read_at, **_scopes(self)}


def _scopes(snap: Snapshot) -> dict[str, Any]:
    out = []
    for s in snap.scopes:
        row = asdict(s)
        row["peak_pct"] = s.peak
        out.append(row)
    return {"scopes": out}


def budget_of(manager: BudgetManager, name: str) -> Budget:
    """The budget of a registered scope; ``UnknownScopeError`` (a ``KeyError``) if unknown
    (``manager.get`` answers None there, as agent-budget's)."""
    budget = manager.get(name)
    if budget is None:
        raise UnknownScopeError(f"unknown scope {name!r}")
    return budget


class FleetReader:
    """Reads snapshots of one prefix (``redis``: a ``BudgetManager``, whose prefix it reads, or a URL
    or ready client). Budgets are built once per scope config and kept between reads (a changed
    config is picked up)."""

    def __init__(self, redis: Any, prefix: str = "distbudget", *, top_sessions: int = 0) -> None:
        if isinstance(redis, BudgetManager):  # its engine and prefix
            self.manager = redis
            self.prefix = redis._settings.prefix
        else:
            self.manager = BudgetManager(redis=redis, prefix=prefix)
            self.prefix = prefix
        self.top_sessions = top_sessions

    @property
    def client(self) -> Any:
        return getattr(self.manager._engine, "client", None)

    def read(self) -> Snapshot:
        configs = self.registry()
        budgets = {name: self._budget(name, configs) for name in configs}
        candidates = self._candidates(budgets) if self.top_sessions else {}
        wanted: list[tuple[str, str]] = [(name, DEFAULT_SESSION) for name in budgets]
        wanted += [(name, sid) for name, sids in candidates.items() for sid in sids]
        steps = [budgets[name]._core.summary(sid) for name, sid in wanted]
        results = read_summaries(self.manager._engine, steps)
        summaries: dict[tuple[str, str], dict[str, Any]] = {}
        now_us = 0
        for (name, sid), step, result in zip(wanted, steps, results, strict=True):
            summaries[name, sid] = step.finish(result)
            now_us = max(now_us, result.now_us)
        rows = {
            name: _scope_row(budget, summaries, candidates.get(name, []), self.top_sessions)
            for name, budget in budgets.items()
        }
        return Snapshot(self.prefix, now_us / P.US, _tree_order(rows))

    # ---- steps ----------------------------------------------------------------------------------

    def registry(self) -> dict[str, str]:
        """Every registered scope's config (JSON), by name: one read."""
        engine = self.manager._engine
        key = registry_key(self.prefix)
        if self.client is None:  # the embedded engine (a manager of this process)
            return {n: engine.execute(RegistryChain(key, n))[0] for n in engine.execute(RegistryNames(key))}
        if getattr(engine, "_pending", None) is not None or getattr(engine, "path", "") is None:
            engine.execute(RegistryNames(key))  # the engine's first call: its checks, its path (functions.py)
        try:
            raw = self.client.hgetall(key)
        except _errors() as exc:
            raise BackendError(f"Redis reading the registry failed: {exc}") from exc
        return {_text(k): _text(v) for k, v in raw.items()}

    def _budget(self, name: str, configs: dict[str, str]) -> Budget:
        chain: list[str] = []
        at: str | None = name
        while at is not None and at in configs and len(chain) <= len(configs):
            chain.append(configs[at])
            at = json.loads(configs[at])["parent"]
        return self.manager._adopt(name, chain)

    def _candidates(self, budgets: dict[str, Budget]) -> dict[str, list[str]]:
        """Per scope with a per-session limit, the sessions charged most recently (newest first),
        from the tail of its tree's ledger."""
        wanted = {name for name, b in budgets.items() if any(lim.window == "session" for lim in b.scope.all_limits())}
        if not wanted:
            return {}
        ledgers = sorted({budgets[name]._core.keyspace.ledger for name in wanted})
        out: dict[str, list[str]] = {name: [] for name in wanted}
        for entries in read_ledger_tails(self.manager._engine, ledgers, LEDGER_TAIL):
            for _id, fields in entries:
                d = json.loads(fields.get("d", "{}"))
                sid = d.get("session_id")
                if d.get("kind") != "charge" or sid is None:
                    continue
                for scope in d.get("path", []):
                    seen = out.get(scope)
                    if seen is not None and sid not in seen and len(seen) < MAX_CANDIDATES:
                        seen.append(sid)
        return out


def _scope_row(
    budget: Budget, summaries: dict[tuple[str, str], dict[str, Any]], sessions: list[str], top: int
) -> ScopeRow:
    name = budget.name
    summary = summaries[name, DEFAULT_SESSION]
    warn = [float(t) for t in budget.scope.extra_thresholds()]
    if budget.scope.alert_at_pct is not None:
        warn.append(float(budget.scope.alert_at_pct))
    thresholds = [*sorted(set(warn)), 1.0]
    limits = []
    for key, lim in summary["limits"].items():
        if lim["scope"] != name:
            continue  # an ancestor's limit: shown under the ancestor
        row = LimitRow(
            limit_type=key,
            metric=lim["metric"],
            window=lim["window"],
            model=lim["model"],
            limit=lim["limit"],
            used=lim["used"],
            held=lim["held"],
            remaining=lim["remaining"],
            pct=lim["pct"],
            refusals=lim.get("refusals"),
            thresholds=thresholds,
        )
        if lim["window"] == "session":
            row.per_session = True
            found = [_session_row(sid, summaries[name, sid]["limits"][key]) for sid in sessions]
            found.sort(key=lambda s: (-s.pct, s.session_id))
            row.sessions = found[:top]
            busiest = found[0] if found else None
            row.used = busiest.used if busiest else 0
            row.held = busiest.held if busiest else 0
            row.pct = busiest.pct if busiest else 0.0
            row.remaining = max(row.limit - row.used - row.held, 0)
        limits.append(row)
    limits.sort(key=lambda r: (-r.pct, r.limit_type))
    parent = budget.scope.parent
    parent_name = parent.name if parent is not None and not isinstance(parent, str) else parent
    return ScopeRow(
        name=name,
        parent=parent_name,
        depth=len(budget.scope.ancestors()),
        hard_stop=budget.scope.hard_stop,
        total=summary["total"],
        per_model=summary["per_model"],
        limits=limits,
    )


def _session_row(sid: str, lim: dict[str, Any]) -> SessionRow:
    return SessionRow(sid, lim["metric"], lim["used"], lim["held"], lim["limit"], lim["pct"], lim.get("refusals"))


def _tree_order(rows: dict[str, ScopeRow]) -> list[ScopeRow]:
    children: dict[str | None, list[ScopeRow]] = {}
    for row in rows.values():
        children.setdefault(row.parent if row.parent in rows else None, []).append(row)
    out: list[ScopeRow] = []

    def visit(parent: str | None) -> None:
        for row in sorted(children.get(parent, []), key=lambda r: (-r.peak, r.name)):
            out.append(row)
            visit(row.name)

    visit(None)
    return out


# ---- the engine reads (the one place that knows how to pipeline them) -----------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _errors() -> tuple[type[BaseException], ...]:
    from distbudget.engines.codec import ERRORS

    return ERRORS


def read_summaries(engine: Any, steps: Sequence[Step[SummaryResult, dict[str, Any]]]) -> list[SummaryResult]:
    """The answer of every ``Summary`` step: on Redis one pipeline (per Cluster node) of the script
    (``FCALL`` or ``EVALSHA``, the engine's path); on the embedded engine, one after the other. A
    summary the pipeline could not run (the script flushed, a redirection) is run again alone by the
    engine, which recovers as for any call: a read, safe to send twice."""
    if getattr(engine, "client", None) is None:
        return [engine.execute(step.op) for step in steps]
    script = engine.scripts["summary"]
    calls = [engine.codec.encode(step.op) for step in steps]
    replies = engine._send_many([_script_command(script, call.keys, call.argv) for call in calls])
    return [
        engine.execute(step.op) if isinstance(reply, Exception) else call.parse(reply)
        for step, call, reply in zip(steps, calls, replies, strict=True)
    ]


def _script_command(script: Any, keys: Sequence[Any], argv: Sequence[Any]) -> tuple[Any, ...]:
    """The raw command (for a pipeline) that runs one of the engine's scripts."""
    try:  # the Functions path (FCALL) arrives with issue 14's engines/functions.py
        functions = importlib.import_module("distbudget.engines.functions")
    except ImportError:
        return ("EVALSHA", script.sha, len(keys), *keys, *argv)
    command: tuple[Any, ...] = functions.command(script, keys, argv)
    return command


def read_ledger_tails(engine: Any, ledgers: Sequence[str], count: int) -> list[list[LedgerRow]]:
    """The newest ``count`` entries of each ledger stream (newest first), in one pipeline."""
    client = getattr(engine, "client", None)
    if client is None:
        return [engine.execute(LedgerRead(key, "-", 10**9))[-count:][::-1] for key in ledgers]
    from distbudget.engines.codec import ledger_rows
    from distbudget.engines.connect import is_cluster_client

    try:
        if is_cluster_client(client):  # each tree's ledger on its own shard: the client routes each read
            return [ledger_rows(client.xrevrange(key, count=count)) for key in ledgers]
        pipe = client.pipeline(transaction=False)
        for key in ledgers:
            pipe.xrevrange(key, count=count)
        return [ledger_rows(r) for r in pipe.execute()]
    except _errors() as exc:
        raise BackendError(f"Redis reading the ledger failed: {exc}") from exc
