"""``distbudget demo``: a simulated agent fleet spending against hard caps.

The demo is the project's main job in miniature. N workers (threads on the embedded engine, or
processes sharing one Redis) each loop over their calls: ``reserve`` the worst case, "call the
model", ``commit`` the actual usage, and stop a scope for good once ``reserve`` refuses. The call
sizes are seeded, and the caps are sized from that plan, so every run shows the same story: two
scopes hit their hard cap (WARNING at 80 %, then refusals) and one stays under it. Which worker
wins the last dollars of a capped scope is a real race, so those exact counts vary from run to
run; what never varies is the invariant the last line checks: spend <= cap, for every scope.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import queue
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import distbudget
from distbudget import BudgetExceededError, BudgetManager, BudgetScope, DistBudgetError, ModelRates
from distbudget._core.keys import check_prefix
from distbudget._core.report import aligned
from distbudget.cli._common import amount, redact, usd

SESSION_ID = "demo-session"
ALERT_AT = 0.8
MAX_WORKERS = 64
MAX_SCOPES = 26
RESULT_TIMEOUT_S = 300.0
RUN_SUFFIX_LENGTH = 8

# What each scope is for, cycled over --scopes: its role and the model its agents call.
ROLE_COST_CAP = "session cost cap"
ROLE_TOKEN_CAP = "session token cap"
ROLE_UNDER_CAP = "day cost cap, stays under"
ROLES: tuple[tuple[str, str], ...] = (
    (ROLE_COST_CAP, "gpt-4o-mini"),
    (ROLE_TOKEN_CAP, "claude-3-5-haiku"),
    (ROLE_UNDER_CAP, "gemini-2.0-flash"),
)
# A capped scope may spend this share of what its planned calls would cost. Below 1, the cap is
# always hit. At a refusal, used > cap - (one worst-case call per worker), so from about 15 calls
# per worker on, usage has certainly passed the 80 % WARNING by then.
CAP_SHARE = 0.6
# The uncapped scope's cap leaves its planned spend at about this share of the cap (> 80 %: it warns).
UNDER_CAP_SHARE = 0.9

# An alert as workers report it: (scope, level, limit_type, pct rounded to 3 places).
AlertRow = tuple[str, str, str, float]


# ---- the seeded plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One simulated model call: what is reserved (input + max output) and what it really used."""

    model: str
    input_tokens: int
    max_output_tokens: int
    output_tokens: int


def plan_calls(seed: int, worker: int, calls: int, models: Sequence[str]) -> list[list[Call]]:
    """Worker ``worker``'s calls, ``[call][scope]``; the same for the same seed in any process."""
    rng = random.Random(f"distbudget-demo:{seed}:{worker}")
    out: list[list[Call]] = []
    for _ in range(calls):
        row = []
        for model in models:
            max_out = rng.choice((512, 1024))
            row.append(Call(model, rng.randint(800, 2400), max_out, rng.randint(max_out // 3, max_out)))
        out.append(row)
    return out


@dataclass
class Spend:
    """The tokens and the cost of some calls: planned (:class:`Planned`) or made (:class:`Tally`)."""

    tokens: int = 0
    cost_nano: int = 0


@dataclass
class Planned(Spend):
    """What a scope's calls would use if every one of them ran (computed before anything runs), what
    they would reserve, and the largest reservation of one call."""

    calls: int = 0
    worst_cost_nano: int = 0
    max_call_worst_tokens: int = 0
    max_call_worst_cost_nano: int = 0

    def add(self, call: Call) -> None:
        rates = ModelRates.for_model(call.model)
        worst_nano = rates.worst_case_nano(call.input_tokens, call.max_output_tokens)
        self.calls += 1
        self.tokens += call.input_tokens + call.output_tokens
        self.cost_nano += rates.cost_nano(call.input_tokens, call.output_tokens)
        self.worst_cost_nano += worst_nano
        self.max_call_worst_tokens = max(self.max_call_worst_tokens, call.input_tokens + call.max_output_tokens)
        self.max_call_worst_cost_nano = max(self.max_call_worst_cost_nano, worst_nano)


def _round_sig(value: float, digits: int = 3, *, up: bool = False, whole: bool = False) -> Decimal:
    """``value`` to ``digits`` significant digits (rounded up if ``up``), as an exact Decimal."""
    if value <= 0:
        return Decimal(0)
    exp = math.floor(math.log10(value)) - (digits - 1)
    if whole:
        exp = max(exp, 0)
    scaled = Decimal(repr(value)).scaleb(-exp)
    n = math.ceil(scaled) if up else round(scaled)
    return Decimal(n).scaleb(exp)


@dataclass(frozen=True)
class ScopeSpec:
    """A demo scope: its role, its model and the seed-style limits sized for this run."""

    name: str
    role: str
    model: str
    max_cost_per_session_usd: float | None = None
    max_tokens_per_session: int | None = None
    max_cost_per_day_usd: float | None = None

    def budget_scope(self) -> BudgetScope:
        return BudgetScope(
            name=self.name,
            max_tokens_per_session=self.max_tokens_per_session,
            max_cost_per_session_usd=self.max_cost_per_session_usd,
            max_cost_per_day_usd=self.max_cost_per_day_usd,
            alert_at_pct=ALERT_AT,
            hard_stop=True,
        )

    @property
    def capped(self) -> bool:
        """Sized so that the fleet must hit a hard cap."""
        return self.role != ROLE_UNDER_CAP


def size_scope(name: str, role: str, model: str, planned: Planned, workers: int) -> ScopeSpec:
    """Limits for one scope, from its planned usage."""
    if role == ROLE_COST_CAP:
        cap = _round_sig(CAP_SHARE * planned.cost_nano / 1e9)
        return ScopeSpec(name, role, model, max_cost_per_session_usd=float(cap))
    if role == ROLE_TOKEN_CAP:
        tokens = int(_round_sig(CAP_SHARE * planned.tokens, whole=True))
        # A second, looser limit that can never refuse (>= the worst case of every planned call).
        day = _round_sig(planned.worst_cost_nano / 1e9, up=True)
        return ScopeSpec(name, role, model, max_tokens_per_session=tokens, max_cost_per_day_usd=float(day))
    # Never refused: at any moment used + held + this call <= all planned actual usage + one
    # worst-case hold per worker, and the cap is at least that.
    need = max(planned.cost_nano / UNDER_CAP_SHARE, planned.cost_nano + workers * planned.max_call_worst_cost_nano)
    return ScopeSpec(name, role, model, max_cost_per_day_usd=float(_round_sig(need / 1e9, up=True)))


@dataclass(frozen=True)
class DemoConfig:
    redis: str | None
    run_prefix: str
    workers: int
    calls: int
    seed: int
    latency_s: float
    scopes: tuple[ScopeSpec, ...]

    @property
    def models(self) -> list[str]:
        return [s.model for s in self.scopes]


def build_config(
    *,
    redis: str | None,
    prefix: str,
    workers: int,
    calls: int,
    n_scopes: int,
    seed: int,
    latency_ms: float,
    exact_prefix: bool = False,
) -> tuple[DemoConfig, dict[str, Planned]]:
    """The run's scopes, sized from the seeded plan of every worker; and that plan's totals."""
    roles = [ROLES[i % len(ROLES)] for i in range(n_scopes)]
    names = [f"team-{chr(ord('a') + i)}" for i in range(n_scopes)]
    planned = {name: Planned() for name in names}
    models = [model for _, model in roles]
    for worker in range(workers):
        for row in plan_calls(seed, worker, calls, models):
            for name, call in zip(names, row, strict=True):
                planned[name].add(call)
    scopes = tuple(
        size_scope(name, role, model, planned[name], workers) for name, (role, model) in zip(names, roles, strict=True)
    )
    run_prefix = prefix if exact_prefix else f"{prefix}-{uuid.uuid4().hex[:RUN_SUFFIX_LENGTH]}"
    cfg = DemoConfig(redis, run_prefix, workers, calls, seed, latency_ms / 1000, scopes)
    return cfg, planned


# ---- one worker ---------------------------------------------------------------------------------


@dataclass
class Tally(Spend):
    """One worker's own account of one scope (checked against the store at the end)."""

    committed: int = 0
    refused: int = 0
    refused_by: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Tally) -> None:
        self.tokens += other.tokens
        self.cost_nano += other.cost_nano
        self.committed += other.committed
        self.refused += other.refused
        for lt, n in other.refused_by.items():
            self.refused_by[lt] = self.refused_by.get(lt, 0) + n


@dataclass
class WorkerResult:
    worker: int
    tallies: dict[str, Tally]
    alerts: list[AlertRow]


def run_worker(worker: int, mgr: BudgetManager, cfg: DemoConfig, start: Callable[[], object]) -> WorkerResult:
    """The agent loop: reserve the worst case, call the model, commit the actual usage."""
    me = threading.current_thread()
    alerts: list[AlertRow] = []

    def collect(alert: distbudget.BudgetAlert) -> None:
        # Threads share one manager: keep only the alerts this worker's own calls raised.
        if threading.current_thread() is me:
            alerts.append((alert.scope, alert.level.value, alert.limit_type, round(alert.pct, 3)))

    names = [s.name for s in cfg.scopes]
    for name in names:
        mgr._budget(name).on_alert(collect)
    plan = plan_calls(cfg.seed, worker, cfg.calls, cfg.models)
    tallies = {name: Tally() for name in names}
    active = list(names)
    start()
    for row in plan:
        for name, call in zip(names, row, strict=True):
            if name not in active:
                continue
            tally = tallies[name]
            try:
                hold = mgr.reserve(name, call.model, call.input_tokens, call.max_output_tokens, session_id=SESSION_ID)
            except BudgetExceededError as err:
                tally.refused += 1
                tally.refused_by[err.limit_type] = tally.refused_by.get(err.limit_type, 0) + 1
                active.remove(name)
                continue
            with hold:
                if cfg.latency_s:
                    time.sleep(cfg.latency_s)  # the model call
                try:
                    record = hold.commit(call.input_tokens, call.output_tokens)
                except BudgetExceededError as err:  # charged, but now over a limit: stop this scope
                    assert err.record is not None
                    record = err.record
                    active.remove(name)
            tally.committed += 1
            tally.tokens += record.total_tokens
            tally.cost_nano += record.cost_nano_usd
    return WorkerResult(worker, tallies, alerts)


def _register(mgr: BudgetManager, cfg: DemoConfig) -> None:
    for spec in cfg.scopes:
        mgr.register(spec.budget_scope())


def run_threads(cfg: DemoConfig, mgr: BudgetManager) -> list[WorkerResult]:
    """N worker threads on one manager (the embedded engine)."""
    barrier = threading.Barrier(cfg.workers)
    results: dict[int, WorkerResult] = {}
    errors: list[str] = []

    def target(worker: int) -> None:
        try:
            results[worker] = run_worker(worker, mgr, cfg, barrier.wait)
        except BaseException:
            errors.append(traceback.format_exc())
            barrier.abort()

    threads = [threading.Thread(target=target, args=(w,), name=f"demo-worker-{w}") for w in range(cfg.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("a demo worker failed:\n" + errors[0])
    return [results[w] for w in range(cfg.workers)]


def _process_main(worker: int, cfg: DemoConfig, barrier: Any, results: Any) -> None:
    """Entry point of one worker process: its own manager on the shared Redis."""
    try:
        mgr = BudgetManager(redis=cfg.redis, prefix=cfg.run_prefix)
        _register(mgr, cfg)
        result = run_worker(worker, mgr, cfg, lambda: barrier.wait(RESULT_TIMEOUT_S))
        results.put(("ok", result))
    except BaseException:
        results.put(("error", f"worker {worker}:\n{traceback.format_exc()}"))


def run_processes(cfg: DemoConfig) -> list[WorkerResult]:
    """N worker processes (spawned), each with its own BudgetManager on the same Redis."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(cfg.workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(w, cfg, barrier, results), name=f"demo-worker-{w}", daemon=True)
        for w in range(cfg.workers)
    ]
    for p in procs:
        p.start()
    out: dict[int, WorkerResult] = {}
    error: str | None = None
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    try:
        while len(out) < cfg.workers and error is None:
            try:
                status, payload = results.get(timeout=0.5)
            except queue.Empty:
                # A worker that fails reports it; one that exits non-zero was killed or crashed hard.
                crashed = {p.name: p.exitcode for p in procs if p.exitcode not in (None, 0)}
                if crashed:
                    error = f"demo worker processes died: {crashed}"
                elif time.monotonic() > deadline:
                    error = "timed out waiting for the demo workers"
                continue
            if status == "ok":
                out[payload.worker] = payload
            else:
                error = str(payload)
        if error is not None:
            barrier.abort()
            raise RuntimeError(error)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        results.close()
    return [out[w] for w in range(cfg.workers)]


# ---- the whole run ------------------------------------------------------------------------------


@dataclass
class ScopeOutcome(Tally):
    """Every worker's tallies of one scope, summed; the calls never tried; the store's summary."""

    skipped: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoReport:
    config: DemoConfig
    planned: dict[str, Planned]
    outcomes: dict[str, ScopeOutcome]
    alerts: list[tuple[int, AlertRow]]
    elapsed_s: float
    manager: BudgetManager


def run_demo(cfg: DemoConfig, planned: dict[str, Planned]) -> DemoReport:
    """Run the fleet; summarise each scope from the store through this process's own manager."""
    mgr = BudgetManager(redis=cfg.redis, prefix=cfg.run_prefix)
    _register(mgr, cfg)
    for spec in cfg.scopes:  # a fresh prefix: nothing is there yet (this also checks the connection)
        if mgr.summary(spec.name, SESSION_ID)["total"]["requests"]:
            raise RuntimeError(f"prefix {cfg.run_prefix!r} is already in use")
    began = time.perf_counter()
    results = run_threads(cfg, mgr) if cfg.redis is None else run_processes(cfg)
    elapsed = time.perf_counter() - began
    outcomes: dict[str, ScopeOutcome] = {}
    for spec in cfg.scopes:
        o = outcomes[spec.name] = ScopeOutcome()
        for r in results:
            o.merge(r.tallies[spec.name])
        o.skipped = cfg.workers * cfg.calls - o.committed - o.refused
        o.summary = mgr.summary(spec.name, SESSION_ID)
    levels = {"critical": 0, "warning": 1, "info": 2}
    alerts = sorted(
        ((r.worker, a) for r in results for a in r.alerts),
        key=lambda wa: ([s.name for s in cfg.scopes].index(wa[1][0]), levels.get(wa[1][1], 3), wa[1][2], wa[0]),
    )
    return DemoReport(cfg, planned, outcomes, alerts, elapsed, mgr)


def violations(report: DemoReport) -> list[str]:
    """Hard-stopped limits whose usage went over the cap, per the store's summaries."""
    out = []
    for name, o in report.outcomes.items():
        if not o.summary["hard_stop"]:
            continue
        for lt, lim in o.summary["limits"].items():
            if lim["used"] > lim["limit"]:
                out.append(
                    f"{name} {lt}: used {amount(lim['metric'], lim['used'])} > "
                    f"cap {amount(lim['metric'], lim['limit'])}"
                )
    return out


def ledger_mismatches(report: DemoReport) -> list[str]:
    """Where the workers' own records disagree with the store (or a hold was left behind)."""
    out = []
    for name, o in report.outcomes.items():
        session = o.summary["session"]
        if session["requests"] != o.committed:
            out.append(f"{name}: workers committed {o.committed} calls, store has {session['requests']}")
        if session["tokens"] != o.tokens:
            out.append(f"{name}: workers used {o.tokens} tokens, store has {session['tokens']}")
        if session["cost_usd"] != o.cost_nano / 1e9:
            out.append(f"{name}: workers spent ${o.cost_nano / 1e9:.9f}, store has ${session['cost_usd']:.9f}")
        for lt, lim in o.summary["limits"].items():
            if lim["held"]:
                out.append(f"{name} {lt}: {lim['held']} still held after every call settled")
    return out


# ---- output -------------------------------------------------------------------------------------


def render(report: DemoReport) -> tuple[list[str], int]:
    """The demo's printout, and its exit code (1 if a cap was broken or the ledger disagrees)."""
    cfg = report.config
    kind = "threads" if cfg.redis is None else "processes"
    engine = "embedded (in-process)" if cfg.redis is None else f"redis {redact(cfg.redis)}"
    where = "" if cfg.redis is None else f", key prefix {cfg.run_prefix}"
    lines = [
        f"distbudget demo: engine {engine}, {cfg.workers} worker {kind} x {cfg.calls} calls"
        f" x {len(cfg.scopes)} scopes, seed {cfg.seed}{where}",
    ]
    p_calls = sum(p.calls for p in report.planned.values())
    p_tokens = sum(p.tokens for p in report.planned.values())
    p_cost = sum(p.cost_nano for p in report.planned.values()) / 1e9
    lines.append(
        f"planned (seeded): {p_calls:,} calls, {p_tokens:,} tokens, {usd(p_cost)} if every call ran;"
        f" each reserves input + max_output_tokens, 'calls the model' ({cfg.latency_s * 1000:g} ms),"
        " commits what it used"
    )
    lines.append("")
    rows = [["scope", "model", "committed", "refused", "skipped", "tokens", "cost USD"]]
    for spec in cfg.scopes:
        o = report.outcomes[spec.name]
        s = o.summary["session"]
        models = ",".join(sorted(o.summary["per_model"])) or spec.model
        rows.append(
            [
                spec.name,
                models,
                f"{s['requests']:,}",
                f"{o.refused:,}",
                f"{o.skipped:,}",
                f"{s['tokens']:,}",
                usd(s["cost_usd"]),
            ]
        )
    lines += aligned(rows, right={2, 3, 4, 5, 6}, indent="  ")
    lines.append("")
    lines.append("limits (summary()['limits'], session " + repr(SESSION_ID) + "):")
    rows = [["scope", "limit", "used", "cap", "pct", "outcome"]]
    for spec in cfg.scopes:
        o = report.outcomes[spec.name]
        for lt, lim in o.summary["limits"].items():
            n = o.refused_by.get(lt, 0)
            outcome = f"cap reached: {n} reserve() refused" if n else "never refused"
            rows.append(
                [
                    spec.name,
                    lt,
                    amount(lim["metric"], lim["used"]),
                    amount(lim["metric"], lim["limit"]),
                    f"{lim['pct']:.1%}",
                    outcome,
                ]
            )
    lines += aligned(rows, right={2, 3, 4}, indent="  ")
    lines.append("")
    lines.append(f"alerts raised ({len(report.alerts)}):")
    lines += [
        f"  {level.upper():<8}  {scope}  {lt} at {pct:.1%}  (worker {w})"
        for w, (scope, level, lt, pct) in report.alerts
    ] or ["  none"]
    lines.append("")
    code = 0
    mismatches = ledger_mismatches(report)
    if mismatches:
        code = 1
        lines.append("ledger MISMATCH: " + "; ".join(mismatches))
    else:
        lines.append(
            "ledger: the workers' own records match the store for every scope (calls, tokens, cost); no hold left"
        )
    broken = violations(report)
    if broken:
        code = 1
        lines.append("hard caps VIOLATED: " + "; ".join(broken))
    else:
        worst = max((lim["pct"] for o in report.outcomes.values() for lim in o.summary["limits"].values()), default=0.0)
        lines.append(
            f"hard caps held: spend <= cap for every scope (highest {worst:.1%} of a cap);"
            f" done in {report.elapsed_s:.2f} s"
        )
    return lines, code


# ---- command line -------------------------------------------------------------------------------


def parse_prefix(text: str) -> str:
    try:
        check_prefix(f"{text}-{'0' * RUN_SUFFIX_LENGTH}")  # the library's rule, with the run suffix
    except DistBudgetError:
        raise argparse.ArgumentTypeError(
            f"must be 1-{64 - RUN_SUFFIX_LENGTH - 1} characters without braces, spaces or '|': {text!r}"
        ) from None
    return text


def run(args: argparse.Namespace) -> int:
    """Run a simulated agent fleet against budgets and show the caps holding. N workers each reserve
    the worst case, 'call the model', commit what they used and stop a scope at its first refusal;
    the last line checks spend <= cap for every scope."""
    try:
        cfg, planned = build_config(
            redis=args.redis,
            prefix=args.prefix,
            workers=args.workers,
            calls=args.calls,
            n_scopes=args.scopes,
            seed=args.seed,
            latency_ms=args.latency_ms,
            exact_prefix=args.exact_prefix,
        )
        report = run_demo(cfg, planned)
    except RuntimeError as exc:  # a worker failed or timed out
        raise DistBudgetError(str(exc)) from exc
    lines, code = render(report)
    print("\n".join(lines), flush=True)
    return code
