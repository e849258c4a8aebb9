"""A budget's accounting core: everything a budget does except I/O, once for the sync and the
asyncio shells (``budget.py``).

Each public operation of a budget is a method here that validates its arguments, builds the plan
(``_core/plan.py``) and returns a *job* (``_core/ops.py``): a :class:`Step` (the one engine operation
it needs and how to finish the engine's answer into the caller's result), or, for the operations
that really take several engine steps (``acquire``'s wait loop, the ledger read page by page), a
generator of steps. The shells hand jobs to their driver (``_driver.py``): ``Budget`` runs them with
plain calls, ``AsyncBudget`` with ``await``. The signatures and docstrings here are the budgets' own
(the shells take them over unchanged).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import time
import uuid
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Literal, TypeVar, cast

from distbudget import otel
from distbudget._core import bounds as B
from distbudget._core import ledger as L
from distbudget._core import model_policy as MP
from distbudget._core import plan as P
from distbudget._core import registry as R
from distbudget._core.calendar import is_calendar, period_at
from distbudget._core.errors import (
    BackendError,
    BudgetExceededError,
    BudgetWarning,
    InvalidInputError,
    UnknownModelError,
    UnknownScopeError,
)
from distbudget._core.fast import FastCall
from distbudget._core.fleet_prices import FleetBook, inherited_rates
from distbudget._core.keys import KeySpace, alert_index_key, check_prefix, decode_model_field, model_prefix, prices_key
from distbudget._core.models import first_known
from distbudget._core.money import MAX_AMOUNT, NANO, check_tokens, nano_to_usd
from distbudget._core.ops import (
    AdmitResult,
    Amounts,
    Announce,
    ChargeResult,
    Check,
    Commit,
    Done,
    Extend,
    Job,
    LedgerRead,
    LedgerRow,
    PricesRead,
    Record,
    RecordMany,
    RegistryChain,
    Release,
    Reserve,
    Reset,
    Sleep,
    Step,
    Steps,
    Summary,
    SummaryResult,
)
from distbudget._core.prices import ModelRates, PriceBook, PriceTable
from distbudget._core.report import ReportRow, Rollup
from distbudget._core.scope import MAX_NAME_LENGTH, BudgetScope, Limit, check_name, window_label
from distbudget._core.types import AlertLevel, BudgetAlert, RequestedBy, UsageRecord, alert_message
from distbudget._core.usage import Usage, charge_args
from distbudget._policy.guard import BatchAnswers, Guard, LocalCharge, Refusal, check_options
from distbudget.engines.memory import FastPlan, MemoryEngine

log = logging.getLogger("distbudget")
T = TypeVar("T")

DEFAULT_SESSION = "default"
MAX_LOCAL_RECORDS = 10_000
_PLAN_CACHE_SIZE = 4096
HOLD_RETRY_US = 50_000
LEDGER_PAGE = 1000


LedgerSince = str | float | datetime.datetime | None
ExportTarget = str | os.PathLike[str] | IO[str]


def write_jsonl(entries: list[L.LedgerEntry], target: ExportTarget) -> int:
    """Ledger entries as JSON lines (for reconciliation) to a path or an open text file."""
    lines = [json.dumps(e.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n" for e in entries]
    if isinstance(target, (str, os.PathLike)):
        with open(target, "w", encoding="utf-8") as f:
            f.writelines(lines)
    else:
        target.writelines(lines)
    return len(lines)


# UsageRecord is a frozen dataclass, whose __init__ sets each field with object.__setattr__: a
# record() builds one per call, in half the time, by filling a new instance's __dict__ at once
# (the same object; every field without a plain default is given, checked here at import).
_RECORD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(UsageRecord) if f.default is not dataclasses.MISSING}
_RECORD_GIVEN = {"session_id", "model", "input_tokens", "output_tokens", "cost_usd", "timestamp", "metadata"}
assert {f.name for f in dataclasses.fields(UsageRecord)} <= _RECORD_DEFAULTS.keys() | _RECORD_GIVEN
_new_object = object.__new__
_set_attr = object.__setattr__


# One call of record_many(): record()'s arguments as a tuple (positional) or a dict (keywords).
RecordCall = tuple[Any, ...] | Mapping[str, Any]
_RECORD_REQUIRED = frozenset({"session_id", "model", "input_tokens"})
_RECORD_PARAMETERS = _RECORD_REQUIRED | {
    "output_tokens",
    "metadata",
    "request_id",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "service_tier",
}


# usage()'s token counts as charge_args() gives them, by the names errors give them (the 1-hour part of
# the cache write comes from a validated Usage only)
_TOKEN_ARGS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens")


def fast_made(
    keep: Callable[[tuple[Any, ...]], None],
    fp: FastCall,
    input_tokens: int,
    output_tokens: int,
    cost: int,
    now_us: int,
    ledger_id: str | None,
) -> UsageRecord:
    """The record of a plain charge a fast path made, exactly as ``_finish_charge`` makes it (with
    ``__dict__`` set at once: twice as fast as ``UsageRecord(...)``), kept with ``keep`` as the plain
    values ``kept_record`` makes it again from when ``records`` is read."""
    fields = fp.record_fields.copy()
    fields["input_tokens"] = input_tokens
    fields["output_tokens"] = output_tokens
    fields["cost_usd"] = cost / NANO
    fields["timestamp"] = now_us / P.US
    fields["metadata"] = {}
    fields["cost_nano_usd"] = cost
    fields["ledger_id"] = ledger_id
    rec = _new_object(UsageRecord)
    _set_attr(rec, "__dict__", fields)
    keep(
        (
            fp.plan.session_id,
            fields["model"],
            fp.canonical,
            fp.scope,
            input_tokens,
            output_tokens,
            cost,
            now_us,
            ledger_id,
        )
    )
    if otel._switch.trace is not None:
        otel.charged(rec, 0, 0)
    return rec


def kept_record(
    session_id: str,
    model: str,
    canonical: str,
    scope: str,
    input_tokens: int,
    output_tokens: int,
    cost: int,
    now_us: int,
    ledger_id: str | None,
) -> UsageRecord:
    """A fast-path charge's record as ``records`` shows it: the fast path keeps only these plain
    values (the garbage collector never looks at them) and the record is made again when read,
    equal to the one ``record()`` returned (with a metadata dict of its own: it had none)."""
    return UsageRecord(
        session_id,
        model,
        input_tokens,
        output_tokens,
        cost / NANO,
        now_us / P.US,
        {},
        scope,
        cost,
        ledger_id=ledger_id,
        canonical_model=canonical,
    )


def _finish_one(step: Step[ChargeResult, UsageRecord], result: ChargeResult | InvalidInputError) -> UsageRecord:
    """A charge of record_many() finished: its record; its error if it was refused."""
    if isinstance(result, InvalidInputError):
        raise result
    return step.finish(result)


def _gather(
    charge: Callable[..., UsageRecord], calls: Iterable[Iterable[Any]]
) -> tuple[list[UsageRecord], BudgetExceededError | None, InvalidInputError | None]:
    """record_many()'s charges, ``charge(*call)`` for each call in order: their records (a charge
    left over a limit: its error's record), the first charge left over a limit, the first refused (a
    counter would pass 2**53 - 1: not charged). The caller raises those after every charge was made."""
    records: list[UsageRecord] = []
    first: BudgetExceededError | None = None
    refused: InvalidInputError | None = None
    for call in calls:
        try:
            records.append(charge(*call))
        except BudgetExceededError as err:
            assert err.record is not None
            records.append(err.record)
            first = first or err
        except InvalidInputError as err:
            refused = refused or err
    return records, first, refused


def _nothing(_answer: object) -> None:
    return None


_seconds = B.check_duration  # every duration: 1 ms ... 10 years (_core/bounds.py)
# What leaving a reservation's `with` block without commit() (and without an exception) does.
ON_UNCOMMITTED = ("release", "charge_hold")


@dataclass(frozen=True, slots=True)
class CallView:
    """One charge as the caller gave it (what its UsageRecord and ledger entry show)."""

    model: str
    input_tokens: int
    output_tokens: int
    extra: tuple[int, int, int]  # cached input, cache write, reasoning tokens
    metadata: dict[str, Any] | None
    request_id: str | None


@dataclass(frozen=True)
class Settings:
    """A budget's keyword options as given (see ``Budget``; :class:`Accounting` validates them). A
    manager keeps its own and builds every budget with them."""

    session_id: str | None
    prefix: str
    clock: Callable[[], float] | None
    default_rates: ModelRates | None
    session_ttl: float
    hold_ttl: float
    request_ttl: float | None
    sleep: Callable[[float], Any] | None
    ledger_maxlen: int
    alert_stream_maxlen: int
    on_backend_error: str
    fail_open_max_cost_usd: float | None
    fail_open_max_tokens: int | None
    journal_size: int
    on_uncommitted: str = "release"
    strict_models: bool = False
    allow_eviction: bool = False  # accept an evicting server (unsafe: see engines/functions.py)
    prices: PriceBook | None = None  # the caller's book (prices=), else the fleet's, else the bundled one
    fleet: FleetBook | None = None  # a manager's budgets: the fleet price book they share

    @classmethod
    def pick(cls, given: Mapping[str, Any], **more: Any) -> Settings:
        """The settings among a constructor's keywords (``locals()`` of ``Budget`` or a manager: the
        one place where the keyword list becomes settings), plus ``more``."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: given[name] for name in names if name in given}, **more)


class Accounting:
    """Everything a budget does except talking to its engine (held by the sync and async shells).
    ``attach(engine)`` gives it the failure policy of that engine."""

    def __init__(
        self,
        scope: BudgetScope,
        rates: Mapping[str, ModelRates] | None,
        settings: Settings,
        registry: tuple[str, float, tuple[str, ...]] | None = None,
    ) -> None:
        session_id, clock, ledger_maxlen = settings.session_id, settings.clock, settings.ledger_maxlen
        if not isinstance(scope, BudgetScope):
            raise TypeError("scope must be a BudgetScope")
        if isinstance(rates, str):
            raise TypeError(
                f"rates must be a dict of model name -> ModelRates, got the str {rates!r}: to use Redis, pass "
                "it by keyword, redis=... (the second positional argument of a budget is rates)"
            )
        if settings.on_uncommitted not in ON_UNCOMMITTED:
            raise InvalidInputError(f"on_uncommitted must be one of {ON_UNCOMMITTED}, got {settings.on_uncommitted!r}")
        if not isinstance(settings.strict_models, bool):
            raise TypeError("strict_models must be a bool")
        self.on_uncommitted = settings.on_uncommitted
        self.strict_models = settings.strict_models
        if session_id is not None:
            check_name(session_id, "session_id")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        if isinstance(ledger_maxlen, bool) or not isinstance(ledger_maxlen, int) or ledger_maxlen < 0:
            raise InvalidInputError(f"ledger_maxlen must be an int >= 0 (0: no ledger), got {ledger_maxlen!r}")
        alert_maxlen = settings.alert_stream_maxlen
        if isinstance(alert_maxlen, bool) or not isinstance(alert_maxlen, int) or alert_maxlen < 1:
            raise InvalidInputError(f"alert_stream_maxlen must be an int >= 1, got {alert_maxlen!r}")
        self.prefix = check_prefix(settings.prefix)
        self.default_rates = settings.default_rates
        self.clock = clock
        self.session_ttl_ms = int(_seconds(settings.session_ttl, "session_ttl") * 1000)
        self.hold_ttl_us = int(_seconds(settings.hold_ttl, "hold_ttl") * P.US)
        request_ttl = settings.request_ttl
        self._request_ttl = None if request_ttl is None else _seconds(request_ttl, "request_ttl")
        self.ledger_maxlen = ledger_maxlen
        self.alert_stream_maxlen = alert_maxlen
        if settings.prices is not None and not isinstance(settings.prices, PriceBook):
            raise TypeError("prices must be a PriceBook")
        self.book, self.fleet = settings.prices, settings.fleet
        self._fleet_rev = -1  # the fleet book revision this budget prices with (-1: not read yet)
        self._prices_fresh_until = 0.0
        # A budget of a BudgetManager follows the shared registry: (registry key, seconds a config
        # is trusted, the config chain it was built from).
        self._registry = registry
        self._configure(scope, rates)
        self._fresh_until = time.monotonic() + registry[1] if registry else 0.0
        self._fixed_session = session_id
        self._last_session: str | None = None
        self._server_skew_us = 0  # the server's clock minus this host's, as the last answer showed
        self._callbacks: list[Callable[[BudgetAlert], Any]] = []
        # holds that ended without a plain commit, through this object (summary()["holds"])
        self._hold_stats = dict.fromkeys(("released_uncommitted", "charged_uncommitted", "expired_before_commit"), 0)
        # Appended to and copied whole by deque's own C code, which no other thread interrupts: no lock.
        # a fast-path charge's record is kept as a tuple of its plain values (see kept_record)
        self._records: deque[UsageRecord | tuple[Any, ...]] = deque(maxlen=MAX_LOCAL_RECORDS)
        self._alerts: deque[BudgetAlert] = deque(maxlen=MAX_LOCAL_RECORDS)
        self.announced = False
        self.preamble_due = True  # False once announced, for a budget outside a manager's registry
        # What happens when Redis is unavailable (_policy/guard.py): validated now, bound to the
        # engine's shared state by attach().
        self.policy = (
            settings.on_backend_error,
            settings.fail_open_max_cost_usd,
            settings.fail_open_max_tokens,
            settings.journal_size,
        )
        self.mode = check_options(*self.policy)[0]
        self.guard: Guard | None = None
        self._fast_engine: MemoryEngine | None = None
        self._fast_kind: type[FastCall] = FastPlan  # what _fast_plan compiles: the engine's fast plan

    def attach(self, engine: object) -> Guard:
        """The failure policy of this budget on ``engine`` (whose journal and state it shares)."""
        self.guard = Guard(self.name, engine, *self.policy)
        return self.guard

    def backend_status(self) -> dict[str, Any]:
        assert self.guard is not None
        return self.guard.status()

    def _configure(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None) -> None:
        """Set (or replace, when the registry changed) the scope and rates and what derives from them."""
        self.scope = scope
        self.rates = rates
        self.prices = self._price_book(rates)
        chain = [scope, *scope.ancestors()]
        if isinstance(chain[-1].parent, str):
            raise InvalidInputError(
                f"scope {chain[-1].name!r} names its parent {chain[-1].parent!r} by name: register the scopes in "
                "a BudgetManager, or pass the parent BudgetScope itself"
            )
        self.keyspace = KeySpace(self.prefix, chain[-1].name)
        named = [(s.name, lim.limit_type, lim.model) for s in chain for lim in s.all_limits() if lim.model is not None]
        table = self.prices.table.ids
        problems = MP.unknown_model_problems(
            named,
            self.prices.custom,
            self.prices.model_id,
            lambda name: first_known(name, table.get),
            set(table.values()),
            self.default_rates is not None,
        )
        MP.check_models(problems, self.strict_models)
        longest = max([lim.window for s in chain for lim in s.all_limits() if isinstance(lim.window, int)], default=0)
        ttl = self._request_ttl
        self.request_ttl_ms = int(ttl * 1000) if ttl else max(longest, 86400) * 1000
        self._plans: dict[tuple[str, str | None], P.Plan] = {}
        self._fast_plans: dict[tuple[str, str], FastCall | Literal[False]] = {}  # record()'s fast path (False: never)

    def _price_book(self, rates: Mapping[str, ModelRates] | None) -> PriceBook:
        """Custom rates (a manager's scope: each model's nearest override up the tree) over the
        caller's book, else the fleet's, else the bundled snapshot."""
        table: PriceBook | PriceTable | None = self.book
        if table is None and self.fleet is not None:
            table = self.fleet.table
        if self._registry is not None:
            canonical = PriceBook(table=table, max_age_days=float("inf")).model_id
            rates = inherited_rates(R.rates_chain(self._registry[2]), canonical)
        return PriceBook(rates, self.default_rates, table=table)

    def prices_refresh(self) -> Step[tuple[int, str | None], None] | None:
        """The fleet price book's revision read (the book itself when it changed), due for a
        manager's budget without its own ``prices=`` before its first call, then once its last read
        is older than the registry's ``registry_ttl``."""
        if self.fleet is None or self.book is not None or self._registry is None:
            return None
        if self._fleet_rev >= 0 and time.monotonic() < self._prices_fresh_until:
            return None
        return Step(PricesRead(prices_key(self.prefix), self.fleet.rev), self._prices_read)

    def _prices_read(self, reply: tuple[int, str | None]) -> None:
        assert self.fleet is not None and self._registry is not None
        self._prices_fresh_until = time.monotonic() + self._registry[1]
        self.fleet.update(*reply)
        if self.fleet.rev != self._fleet_rev:
            self._fleet_rev = self.fleet.rev
            self.prices = self._price_book(self.rates)
            self._fast_plans = {}

    # ---- the shared registry (budgets of a BudgetManager) ---------------------------------------

    def refresh(self) -> Step[list[str], None] | None:
        """The registry read due (its config is older than the manager's ``registry_ttl``), or None."""
        if self._registry is None or time.monotonic() < self._fresh_until:
            return None
        return Step(RegistryChain(self._registry[0], self.name), self.refreshed)

    def refreshed(self, chain: list[str]) -> None:
        """Adopt the config the registry holds now; ``UnknownScopeError`` if the scope was removed."""
        assert self._registry is not None
        err = R.refusal(chain)
        if err is not None:
            raise err
        if not chain:
            raise UnknownScopeError(f"unknown scope {self.name!r} (removed from the registry)")
        key, ttl, old = self._registry
        if tuple(chain) != old:
            scope, rates = R.from_chain(chain)
            self._registry = (key, ttl, tuple(chain))  # first: the rates inherited come from it
            self._configure(scope, rates)
        self._fresh_until = time.monotonic() + ttl

    # ---- inputs ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.scope.name

    @property
    def session_id(self) -> str:
        """The current session: the constructor's, else the latest record/reserve's."""
        return self._fixed_session or self._last_session or DEFAULT_SESSION

    def _session(self, session_id: str | None, remember: bool) -> str:
        if session_id is None:
            return self.session_id
        check_name(session_id, "session_id")
        if remember:
            self._last_session = session_id
        return session_id

    def monotonic(self) -> float:
        """Seconds for timeouts: the injected clock when there is one."""
        return time.monotonic() if self.clock is None else self.clock()

    def now_us(self) -> int | None:
        """The injected clock in µs, or None: the engine uses the server's time."""
        return None if self.clock is None else round(self.clock() * P.US)

    def period_now_us(self) -> int:
        """The time that picks a calendar limit's period: the injected clock, else the server's
        clock as its last answer showed it, moved on by the time passed here since."""
        now = self.now_us()
        return time.time_ns() // 1000 + self._server_skew_us if now is None else now

    def saw_server_time(self, now_us: int) -> None:
        self._server_skew_us = now_us - time.time_ns() // 1000

    def plan(self, session_id: str, model: str | None) -> P.Plan:
        """The plan of a call (cached per session and model; with calendar limits, until the first
        of their periods ends)."""
        key = (session_id, model)
        plan = self._plans.get(key)
        if plan is None or (plan.valid_until_us and self.period_now_us() >= plan.valid_until_us):
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            plan = self._plans[key] = P.build_plan(
                self.scope,
                session_id,
                None if model is None else self.model_id(model),
                self.keyspace,
                self.session_ttl_ms,
                model,
                self.model_id,
                self.alert_stream_maxlen,
                self.period_now_us(),
            )
        return plan

    def model_id(self, model: str) -> str:
        """The canonical id of a model name: limits, per-model totals and summaries use it."""
        return self.prices.model_id(model) or model

    def _rates(self, model: str) -> ModelRates:
        try:
            return self.prices.rates_for(model)
        except UnknownModelError as err:
            if self._registry is None:
                raise
            raise UnknownModelError(
                f"{err} (with a BudgetManager: register(scope, rates={{{model!r}: ModelRates(...)}}), or give the "
                "manager default_rates=)"
            ) from None

    def usage(self, model: str, tokens: tuple[int, ...], service_tier: str | None = None) -> Amounts:
        """Validated (tokens, nano-USD, requests) of one call. ``tokens``: (input, output, cached
        input, cache write, reasoning, the 1-hour part of the cache write), as ``charge_args`` gives
        them (a :class:`~distbudget.Usage` knows the last); ``service_tier``: ``batch``, ``flex``,
        ``priority`` ... (None: the standard tier)."""
        input_tokens, output_tokens, cached, written, reasoning, written_1h = tokens
        if (  # the common call, valid at a glance: the checks below would all pass
            type(input_tokens) is int
            and type(output_tokens) is int
            and type(model) is str
            and 0 <= input_tokens <= MAX_AMOUNT
            and 0 <= output_tokens <= MAX_AMOUNT
            and 0 < len(model) <= MAX_NAME_LENGTH
            and type(cached) is int
            and type(written) is int
            and type(reasoning) is int
            and not (cached or written or reasoning)
            and model.isascii()
            and service_tier is None
        ):
            total = input_tokens + output_tokens
            cost = self._rates(model).cost_nano(input_tokens, output_tokens)
            if total > MAX_AMOUNT or cost > MAX_AMOUNT:
                B.check_amounts(total, cost)
            return total, cost, 1
        check_name(model, "model")
        for value, what in zip(tokens, _TOKEN_ARGS, strict=False):
            check_tokens(value, what)
        if not 0 <= written_1h <= written:  # Usage validated it: never from a caller
            raise InvalidInputError("cache_write_1h_tokens must be a part of cache_write_tokens")
        rates = self._rates(model)
        cost = rates.cost_nano(
            input_tokens,
            output_tokens,
            cached,
            written - written_1h,
            reasoning,
            cache_write_1h_tokens=written_1h,
            service_tier=service_tier,
        )
        B.check_amounts(input_tokens + output_tokens, cost)
        return input_tokens + output_tokens, cost, 1

    def worst_case(self, model: str, input_tokens: int, max_output_tokens: int) -> Amounts:
        check_name(model, "model")
        check_tokens(input_tokens, "input_tokens")
        check_tokens(max_output_tokens, "max_output_tokens")
        cost = self._rates(model).worst_case_nano(input_tokens, max_output_tokens)
        B.check_amounts(input_tokens + max_output_tokens, cost, "reservation")
        return input_tokens + max_output_tokens, cost, 1

    def request_key(self, request_id: str | None) -> str | None:
        if request_id is None:
            return None
        return self.keyspace.request(self.name, check_name(request_id, "request_id"))

    def estimate(self, model: str, input_tokens: int, output_tokens: int = 0) -> float:
        """Cost in USD of a call; records nothing."""
        return nano_to_usd(self.usage(model, (input_tokens, output_tokens, 0, 0, 0, 0))[1])

    # ---- reading results ------------------------------------------------------------------------

    @staticmethod
    def _display(lim: P.LimitSpec, amount: int) -> float:
        return nano_to_usd(amount) if lim.metric == P.COST else amount

    def _exceeded_error(
        self, plan: P.Plan, i: int, amount: int, retry_us: int = -1, record: UsageRecord | None = None
    ) -> BudgetExceededError:
        lim = plan.limits[i]
        used, limit = self._display(lim, amount), self._display(lim, lim.value)
        verb = "is over" if record is not None else "would exceed"
        if lim.scope == self.name:
            msg = f"Budget {verb} {lim.limit_type} for scope {self.name!r}: {used} > {limit}"
        else:  # the requesting scope, then the ancestor whose limit blocks it
            what = "refused" if record is None else "exceeded"
            msg = f"Budget {what} for scope {self.name!r}: ancestor {lim.scope!r} {verb} {lim.limit_type}: "
            msg += f"{used} > {limit}"
        retry = retry_us / P.US if retry_us >= 0 else None
        return BudgetExceededError(msg, lim.scope, lim.limit_type, used, limit, retry_after=retry, record=record)

    def _make_alerts(self, plan: P.Plan, result: ChargeResult, model: str) -> list[BudgetAlert]:
        out = []
        ids: list[str | None] = list(result.alert_ids) or [None] * len(result.alerts)
        for (i, level), alert_id in zip(result.alerts, ids, strict=True):
            lim = plan.limits[i]
            lvl = (
                AlertLevel.CRITICAL if level == P.CRITICAL else AlertLevel.INFO if lim.alert_of else AlertLevel.WARNING
            )
            used = P.used(plan, result.totals, i)
            out.append(self._alert(plan, lim, lvl, used, result.now_us, model, alert_id))
        return out

    def _alert(
        self,
        plan: P.Plan,
        lim: P.LimitSpec,
        level: AlertLevel,
        used: int,
        now: int,
        model: str,
        alert_id: str | None,
    ) -> BudgetAlert:
        """An alert the engine decided for ``lim``, as the payload of the alert stream reads
        (``alerts.alert_from_payload``): driven by this scope's call in the plan's session on ``model``."""
        shown_used, limit = self._display(lim, used), self._display(lim, lim.shown_value)
        return BudgetAlert(
            lim.scope,
            level,
            alert_message(level, lim.scope, lim.shown_type, shown_used, limit),
            shown_used,
            limit,
            now / P.US,
            lim.shown_type,
            session_id=plan.session_id,
            model=model,
            alert_id=alert_id,
            requested_by=RequestedBy(self.name, plan.session_id, model or None),
        )

    def _dispatch(self, alerts: list[BudgetAlert]) -> None:
        for alert in alerts:
            self._alerts.append(alert)
            for cb in list(self._callbacks):
                try:
                    cb(alert)
                except Exception:  # a broken callback must never break accounting
                    log.exception("distbudget alert callback %r failed", cb)

    def _finish_charge(
        self,
        plan: P.Plan,
        result: ChargeResult,
        usage: Amounts,
        call: CallView,
        over_hold: bool = False,
        hold_expired: bool = False,
    ) -> UsageRecord:
        """Turn an engine's charge answer into the record; fire alerts; raise/warn if over a limit."""
        cached, written, reasoning = call.extra
        if isinstance(result, LocalCharge):  # Redis unavailable: the charge waits in the journal
            record = UsageRecord(
                plan.session_id,
                call.model,
                call.input_tokens,
                call.output_tokens,
                nano_to_usd(usage[1]),
                result.timestamp,
                dict(call.metadata or {}),
                self.name,
                usage[1],
                call.request_id,
                over_hold,
                journaled=True,
                cached_input_tokens=cached,
                cache_write_tokens=written,
                reasoning_tokens=reasoning,
                canonical_model=plan.model or call.model,
            )
            self._records.append(record)
            otel.charged(record, cached, written)
            return record
        if result.original is not None:
            ts, _tok, cost = result.original
            return UsageRecord(
                plan.session_id,
                call.model,
                call.input_tokens,
                call.output_tokens,
                nano_to_usd(cost),
                ts / P.US,
                dict(call.metadata or {}),
                self.name,
                cost,
                call.request_id,
                over_hold,
                True,
                cached_input_tokens=cached,
                cache_write_tokens=written,
                reasoning_tokens=reasoning,
                canonical_model=plan.model or call.model,
            )
        record = _new_object(UsageRecord)  # UsageRecord(...), twice as fast (see _RECORD_DEFAULTS)
        _set_attr(
            record,
            "__dict__",
            {
                **_RECORD_DEFAULTS,
                "session_id": plan.session_id,
                "model": call.model,
                "input_tokens": call.input_tokens,
                "output_tokens": call.output_tokens,
                "cost_usd": usage[1] / NANO,
                "timestamp": result.now_us / P.US,
                "metadata": dict(call.metadata) if call.metadata else {},
                "scope": self.scope.name,
                "cost_nano_usd": usage[1],
                "request_id": call.request_id,
                "over_hold": over_hold,
                "ledger_id": result.ledger_id or None,
                "cached_input_tokens": cached,
                "cache_write_tokens": written,
                "reasoning_tokens": reasoning,
                "canonical_model": plan.model or call.model,
                "hold_expired": hold_expired,
            },
        )
        self._records.append(record)
        if plan.valid_until_us:
            self.saw_server_time(result.now_us)
        otel.charged(record, cached, written)
        if result.alerts:
            self._dispatch(self._make_alerts(plan, result, call.model))
        if hold_expired:
            self._hold_expired(plan, record)
        totals = result.totals
        for i, (k, value) in enumerate(plan.used_at):
            if totals[k] > value:  # the first limit now over (P.exceeded()[0])
                err = self._exceeded_error(plan, i, totals[k], record=record)
                otel.refused(err, call.model, plan.session_id)
                if self.scope.hard_stop:
                    raise err
                warnings.warn(err.message, BudgetWarning, stacklevel=3)
                break
        return record

    def _count_hold(self, what: str) -> None:
        self._hold_stats[what] += 1

    def _hold_expired(self, plan: P.Plan, record: UsageRecord) -> None:
        """A commit found its hold lapsed: count it and fire a WARNING alert for the scope (local)."""
        self._count_hold("expired_before_commit")
        message = (
            f"Budget warning for scope {self.name!r}: a reservation's hold expired before its commit; the "
            f"commit was charged all the same ({record.total_tokens} tokens, ${record.cost_usd:.6f}) but was not "
            "held meanwhile: give long calls a longer ttl= or call Reservation.extend(ttl)"
        )
        alert = BudgetAlert(
            self.name,
            AlertLevel.WARNING,
            message,
            float(record.total_tokens),
            0.0,
            record.timestamp,
            "hold_expired",
            session_id=plan.session_id,
            model=record.model,
        )
        self._dispatch([alert])

    def _finish_admit(self, plan: P.Plan, result: AdmitResult, usage: Amounts, model: str) -> bool:
        """Raise (hard stop) or warn and return False when refused; True when admitted."""
        if isinstance(result, Refusal):  # Redis unavailable and the failure policy refuses
            refusal = result.error(self.name)
            if self.scope.hard_stop:
                raise refusal
            warnings.warn(refusal.message, BudgetWarning, stacklevel=3)
            return False
        if plan.valid_until_us:
            self.saw_server_time(result.now_us)
        if result.refused < 0:
            return True
        lim = plan.limits[result.refused]
        k = 3 * lim.counter + lim.metric
        projected = result.totals[k] + result.held[k] + usage[lim.metric]
        retry_us = result.retry_us
        if lim.period_end_us and usage[lim.metric] <= lim.value:  # the next period starts empty
            retry_us = max(lim.period_end_us - result.now_us, 0)
        if retry_us < 0 and result.held[k] and result.totals[k] + usage[lim.metric] <= lim.value:
            retry_us = HOLD_RETRY_US  # only in-flight holds block: they settle soon, look again then
        err = self._exceeded_error(plan, result.refused, projected, retry_us)
        if result.alerted:  # the limit's first refusal in its window
            alert = self._alert(plan, lim, AlertLevel.REFUSED, projected, result.now_us, model, result.alert_id or None)
            self._dispatch([alert])
        otel.refused(err, plan.model, plan.session_id)
        if self.scope.hard_stop:
            raise err
        warnings.warn(err.message, BudgetWarning, stacklevel=3)
        return False

    def _make_summary(self, plan: P.Plan, result: SummaryResult) -> dict[str, Any]:
        def view(counter: int) -> dict[str, Any]:
            t = result.totals[3 * counter : 3 * counter + 3]
            return {"tokens": t[0], "cost_usd": nano_to_usd(t[1]), "requests": t[2]}

        per_model: dict[str, dict[str, Any]] = {}
        names = {"t": "tokens", "c": "cost_usd", "r": "requests"}
        for field, value in result.scope_totals.items():
            decoded = decode_model_field(field)
            if decoded is None:
                continue
            model, metric = decoded
            row = per_model.setdefault(model, {"tokens": 0, "cost_usd": 0.0, "requests": 0})
            row[names[metric]] = nano_to_usd(value) if metric == "c" else value
        limits: dict[str, Any] = {}
        for i, lim in enumerate(plan.limits):
            if lim.alert_of:
                continue  # an extra alert threshold, not a limit
            k = 3 * lim.counter + lim.metric
            used, held = result.totals[k], result.held[k]
            key = lim.limit_type if lim.scope == self.name else f"{lim.scope}:{lim.limit_type}"
            limits[key] = {
                "scope": lim.scope,
                "metric": ("tokens", "cost", "requests")[lim.metric],
                "window": window_label(lim.window),
                "model": lim.model,
                "limit": self._display(lim, lim.value),
                "used": self._display(lim, used),
                "held": self._display(lim, held),
                "remaining": self._display(lim, max(lim.value - used - held, 0)),
                "pct": (used / lim.value) if lim.value else (0.0 if not used else float("inf")),
                "refusals": result.refusals[i] if result.refusals else None,
            }
        return {
            "scope": self.name,
            "session_id": plan.session_id,
            "session": view(plan.session_counter),
            "day": view(plan.day_counter),
            "total": view(plan.totals_counter),
            "per_model": per_model,
            "limits": limits,
            "hard_stop": self.scope.hard_stop,
            "holds": dict(self._hold_stats),
            "backend": self.backend_status(),
        }

    # ---- the operations: each returns the job its shell's driver runs ---------------------------

    def preamble(self, settle: bool = False) -> tuple[Step[Any, None], ...]:
        """The steps due before an operation: the registry refresh (not when settling a reservation:
        it carries its plan, and must settle even if the scope was removed meanwhile), then the
        alert stream's announcement."""
        if self.announced and self._registry is None:
            return ()
        steps = (None if settle else self.refresh(), None if settle else self.prices_refresh(), self.announcement())
        return tuple(step for step in steps if step is not None)

    def announcement(self) -> Step[None, None] | None:
        """Before a budget's first operation (until it succeeds): register the tree's alert stream
        under each scope's name (``<prefix>:alert-streams``), which is how listeners find it."""
        if self.announced:
            return None
        streams = {s.name: self.keyspace.alerts for s in [self.scope, *self.scope.ancestors()]}
        return Step(Announce(alert_index_key(self.keyspace.prefix), streams), self._announced)

    def _announced(self, _answer: None) -> None:
        self.announced = True
        self.preamble_due = self._registry is not None

    def quiet(self) -> bool:
        """No step of the preamble is due now (a manager's budget between its registry and price
        book reads: ``preamble_due`` stays True for it), so an operation may skip it."""
        return self.announced and self.refresh() is None and self.prices_refresh() is None

    def check(
        self, model: str, input_tokens: int, output_tokens: int = 0, session_id: str | None = None
    ) -> Step[AdmitResult, bool]:
        """Would this call fit now? Records no usage (a refusal is counted). Advisory under
        concurrency: use ``reserve``."""
        usage = self.usage(model, (input_tokens, output_tokens, 0, 0, 0, 0))
        plan = self.plan(self._session(session_id, False), model)
        maxlen, entry = self._refusal_entry(plan, "check", input_tokens, output_tokens)
        op = Check(plan, self.now_us(), usage, True, maxlen, entry)
        return Step(op, lambda result: self._finish_admit(plan, result, usage, model))

    def _refusal_entry(self, plan: P.Plan, operation: str, input_tokens: int, output_tokens: int) -> tuple[int, str]:
        """(MAXLEN, head of the entry) of a refusal's ledger append; (0, "") when the ledger is off."""
        if not self.ledger_maxlen:
            return 0, ""
        return self.ledger_maxlen, L.refusal_head(plan.ledger_head, operation, input_tokens, output_tokens)

    def record(
        self,
        session_id: str | None,
        model: str,
        input_tokens: int | Usage,
        output_tokens: int | None = None,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        service_tier: str | None = None,
    ) -> Step[ChargeResult, UsageRecord]:
        """Charge actual usage (always persisted), then raise if ``hard_stop`` and over a limit.
        ``input_tokens`` may be one :class:`Usage` value instead of the token counts; ``service_tier``
        prices the call in that tier (``batch``, ``flex``, ``priority`` ...)."""
        tokens = charge_args(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens)
        usage = self.usage(model, tokens, service_tier)
        B.check_metadata(metadata)
        rkey = None if request_id is None else self.request_key(request_id)
        plan = self.plan(self._session(session_id, True), model)
        call = CallView(model, tokens[0], tokens[1], tokens[2:5], metadata, request_id)
        maxlen, entry = self._ledger_entry(plan, call, None)

        def finish(result: ChargeResult) -> UsageRecord:
            return self._finish_charge(plan, result, usage, call)

        return Step(Record(plan, self.now_us(), usage, rkey, self.request_ttl_ms, maxlen, entry), finish)

    # ---- record()'s fast path on the embedded engine ----------------------------------------------

    def fast_recording(self, engine: object, slow: Callable[..., T]) -> Callable[..., UsageRecord | T] | None:
        """``record()`` with a fast path when ``engine`` is the embedded one (else None): a call
        without metadata, request id or keywords that is a plain charge (valid plain ints, a model
        priced flat, no calendar limit, no alert to fire, no limit passed: see
        ``MemoryEngine.fast_record``) is charged there and its record made here, exactly as
        ``record()`` makes it; any other call, or one the fast path declines having changed
        nothing, goes to ``slow`` (the budget's ``record()``), which raises what it raises, and its
        answer is returned (``AsyncBudget``: the coroutine, which its shell awaits). The plan of a
        (session, model) is compiled once: validated, priced (``_fast_plan``); a manager's budget
        takes the fast path between its registry reads (``quiet``)."""
        if not isinstance(engine, MemoryEngine):
            return None
        # memory.fast_record is looked up at each call: exporter.instrument() may wrap it (a FastPlan's
        # charge: its plans are FastPlans, _fast_kind)
        memory: Any = engine
        clock, keep = self.clock, self._records.append
        switch, new, set_attr, us, time_ns = otel._switch, _new_object, _set_attr, P.US, time.time_ns
        core = self

        def record(
            session_id: str | None,
            model: str,
            input_tokens: Any,
            output_tokens: Any = None,
            metadata: dict[str, Any] | None = None,
            request_id: str | None = None,
            **keywords: Any,
        ) -> UsageRecord | T:
            if metadata is not None or request_id is not None or keywords or (core.preamble_due and not core.quiet()):
                return slow(session_id, model, input_tokens, output_tokens, metadata, request_id, **keywords)
            sid = core.session_id if session_id is None else session_id
            try:
                fp = core._fast_plans.get((sid, model))
            except TypeError:  # unhashable: record() says what is wrong
                fp = False
            if fp is None:
                fp = core._fast_plan(sid, model)
            if fp and type(input_tokens) is int and type(output_tokens) is int and input_tokens >= 0 <= output_tokens:
                cost = (input_tokens * fp.i_rate + output_tokens * fp.o_rate + 500_000) // 1_000_000  # money.cost_nano
                if clock is None:
                    now = time_ns() // 1000
                    ms = now // 1000
                else:
                    now, ms = round(clock() * us), time_ns() // 1_000_000
                ledger_id = memory.fast_record(
                    fp, input_tokens + output_tokens, cost, now, ms, input_tokens, output_tokens
                )
                if ledger_id is not False:
                    if session_id is not None:
                        core._last_session = session_id
                    # fast_made(keep, fp, ...), inlined: a call more costs ~5 % of this path (row 5a)
                    fields = fp.record_fields.copy()
                    fields["input_tokens"] = input_tokens
                    fields["output_tokens"] = output_tokens
                    fields["cost_usd"] = cost / NANO
                    fields["timestamp"] = now / us
                    fields["metadata"] = {}
                    fields["cost_nano_usd"] = cost
                    fields["ledger_id"] = ledger_id
                    rec = new(UsageRecord)
                    set_attr(rec, "__dict__", fields)
                    keep((sid, model, fp.canonical, fp.scope, input_tokens, output_tokens, cost, now, ledger_id))
                    if switch.trace is not None:
                        otel.charged(rec, 0, 0)
                    return rec
            return slow(session_id, model, input_tokens, output_tokens, metadata, request_id, **keywords)

        return functools.wraps(slow)(record)

    def fast_recording_many(
        self, record: Callable[..., UsageRecord], slow: Callable[..., T]
    ) -> Callable[..., list[UsageRecord] | T]:
        """``record_many()`` over ``record`` (``fast_recording``'s): a list or tuple of calls each
        one the fast path may take (``_fast_call``: all validated before any is charged) is recorded
        call by call with ``record``, as ``record_many()`` does (every charge made; the first left
        over a limit raised, or the first refused, afterwards); any other batch goes to ``slow``."""
        core = self

        def record_many(calls: Iterable[RecordCall]) -> list[UsageRecord] | T:
            due = core.preamble_due and not core.quiet()
            if due or type(calls) not in (list, tuple) or not all(map(core._fast_call, calls)):
                return slow(calls)
            records, first, refused = _gather(record, calls)
            if refused is not None:
                raise refused
            if first is not None:
                raise first
            return records

        return functools.wraps(slow)(record_many)

    # ---- record()'s fast path on Redis -------------------------------------------------------------

    def fast_charging(self, engine: object, slow: Callable[..., UsageRecord]) -> Callable[..., UsageRecord] | None:
        """``record()`` with the Redis engine's fast path when it has one (``fast_recorder``: a plain
        standalone client, its charges packed and sent by hand), else None. A plain call (session,
        model, input and output tokens, positional or by name: valid plain ints on a fast plan, see
        ``_fast_plan``; no metadata, request id or other keyword), outside a preamble (a manager's
        budget: between its registry reads, ``quiet``) or an outage, is packed from its compiled
        call (``_fast_charge``), sent, and its answer read cheaply when plain (``_fast_finish``); any
        other answer is finished as ``record()`` finishes it, an error through the failure policy.
        Any other call, or one the engine sends back untouched (the script was not loaded:
        NOSCRIPT), goes to ``slow`` (``record()``)."""
        fast = self._fast_recorder(engine)
        if fast is None:
            return None
        fast_engine, prepare, finish = fast, self._fast_charge, self._fast_finish

        def record(
            session_id: str | None,
            model: str,
            input_tokens: Any,
            output_tokens: Any = None,
            metadata: dict[str, Any] | None = None,
            request_id: str | None = None,
            **keywords: Any,
        ) -> UsageRecord:
            call = prepare(session_id, model, input_tokens, output_tokens, metadata, request_id, keywords)
            if call is not None:
                answer = fast_engine.record_fast(*call[:5])  # looked up per call: instrument() wraps it
                if answer is not None:
                    return finish(call, answer, input_tokens, output_tokens)
            return slow(session_id, model, input_tokens, output_tokens, metadata, request_id, **keywords)

        return functools.wraps(slow)(record)

    def fast_charging_async(
        self, engine: object, slow: Callable[..., Awaitable[UsageRecord]]
    ) -> Callable[..., Awaitable[UsageRecord]] | None:
        """:meth:`fast_charging` for an asyncio engine (its ``fast_recorder`` a coroutine function)."""
        fast = self._fast_recorder(engine)
        if fast is None:
            return None
        fast_engine, prepare, finish = fast, self._fast_charge, self._fast_finish

        async def record(
            session_id: str | None,
            model: str,
            input_tokens: Any,
            output_tokens: Any = None,
            metadata: dict[str, Any] | None = None,
            request_id: str | None = None,
            **keywords: Any,
        ) -> UsageRecord:
            call = prepare(session_id, model, input_tokens, output_tokens, metadata, request_id, keywords)
            if call is not None:
                answer = await fast_engine.record_fast(*call[:5])
                if answer is not None:
                    return finish(call, answer, input_tokens, output_tokens)
            return await slow(session_id, model, input_tokens, output_tokens, metadata, request_id, **keywords)

        return functools.wraps(slow)(record)

    def _fast_recorder(self, engine: object) -> Any:
        """The engine, when it has a fast charge (``fast_recorder``: its ``record_fast``, looked up
        at each call so that ``exporter.instrument`` counts it) and a failure policy (its state is
        read at each call: ``_fast_charge``), else None; the fast plans then compiled for it are
        plain ``FastCall``s."""
        recorder = getattr(engine, "fast_recorder", None)
        if recorder is None or recorder() is None or self.guard is None:
            return None
        self._fast_kind = FastCall
        return engine

    def _fast_charge(
        self,
        session_id: str | None,
        model: str,
        input_tokens: Any,
        output_tokens: Any,
        metadata: object,
        request_id: object,
        keywords: dict[str, Any],
    ) -> tuple[FastCall, int | None, int, int, str] | None:
        """The charge ``record()`` would send for a plain call on a fast plan, as the engine's fast
        path takes it: (the plan, the injected clock's µs or None, tokens, nano-USD, the ledger
        entry); None when the call is not one — metadata, a request id or another keyword, a
        preamble due (a manager's budget: its registry read, see ``quiet``), an outage pending
        (the failure policy first) — and ``record()`` validates it, raises or charges it."""
        guard = self.guard
        if metadata is not None or request_id is not None or keywords or guard is None or guard.state.busy:
            return None
        if self.preamble_due and not self.quiet():
            return None
        sid = self.session_id if session_id is None else session_id
        try:
            fp = self._fast_plans.get((sid, model))
        except TypeError:  # unhashable: record() says what is wrong
            return None
        if fp is None:
            fp = self._fast_plan(sid, model)
        if not (fp and type(input_tokens) is int and type(output_tokens) is int and input_tokens >= 0 <= output_tokens):
            return None
        tokens = input_tokens + output_tokens
        cost = (input_tokens * fp.i_rate + output_tokens * fp.o_rate + 500_000) // 1_000_000  # money.cost_nano
        if tokens > MAX_AMOUNT or cost > MAX_AMOUNT:
            return None
        if session_id is not None:
            self._last_session = session_id
        entry = L.plain_charge(fp.ledger_head, L.op_ids.next(), input_tokens, output_tokens) if fp.maxlen else ""
        return fp, self.now_us(), tokens, cost, entry

    def _fast_finish(
        self,
        call: tuple[FastCall, int | None, int, int, str],
        answer: tuple[int, str] | ChargeResult | BackendError,
        input_tokens: int,
        output_tokens: int,
    ) -> UsageRecord:
        """The record of a charge the fast path sent (``_fast_charge``), from the engine's answer:
        a plain charge's (now µs, ledger id), made here as ``_finish_charge`` makes it; any other
        result finished by ``_finish_charge``; a ``BackendError`` through the failure policy, as
        the driver does."""
        fp, now, tokens, cost, entry = call
        guard = self.guard
        assert guard is not None
        if type(answer) is tuple:
            now_us, ledger_id = answer
            if guard.state.busy:  # another call met an outage meanwhile: this one says Redis answers
                guard.after(Record(fp.plan, now, (tokens, cost, 1), None, self.request_ttl_ms, fp.maxlen, entry))
            return fast_made(self._records.append, fp, input_tokens, output_tokens, cost, now_us, ledger_id or None)
        usage = (tokens, cost, 1)
        op = Record(fp.plan, now, usage, None, self.request_ttl_ms, fp.maxlen, entry)
        if isinstance(answer, BackendError):
            result = guard.failed(op, answer)
        else:
            result = cast("ChargeResult", answer)  # not a plain charge's tuple
            if guard.state.busy:
                guard.after(op)
        call_view = CallView(fp.record_fields["model"], input_tokens, output_tokens, (0, 0, 0), None, None)
        return self._finish_charge(fp.plan, result, usage, call_view)

    def _fast_call(self, call: object) -> bool:
        """Is this call of ``record_many()`` one the fast path may take (a tuple (session, model,
        input tokens, output tokens) of a fast plan, valid plain ints whose amounts fit)? Then it is
        valid for ``record()`` too."""
        if type(call) is not tuple or len(call) != 4:
            return False
        session_id, model, i, o = call
        if type(session_id) is not str or type(i) is not int or type(o) is not int or i < 0 or o < 0:
            return False
        try:
            fp = self._fast_plans.get((session_id, model))
        except TypeError:
            return False
        if fp is None:
            fp = self._fast_plan(session_id, model)
        if not fp:
            return False
        return i + o <= MAX_AMOUNT and (i * fp.i_rate + o * fp.o_rate + 500_000) // 1_000_000 <= MAX_AMOUNT

    def _fast_plan(self, session_id: str, model: str) -> FastCall | Literal[False]:
        """The fast plan of (session, model), compiled and kept (False kept when the fast path can
        never apply to it); False when the call is invalid (``record()`` raises)."""
        try:
            check_name(session_id, "session_id")
            self.usage(model, (0, 0, 0, 0, 0, 0))  # a valid, priced model
        except Exception:
            return False
        if len(self._fast_plans) >= _PLAN_CACHE_SIZE:
            self._fast_plans.clear()
        key = (session_id, model)
        plan = self.plan(session_id, model)
        rates = self._rates(model)
        if plan.valid_until_us or rates.long_context:
            self._fast_plans[key] = False
            return False
        fields = {
            **_RECORD_DEFAULTS,
            "session_id": plan.session_id,
            "model": model,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": 0.0,
            "timestamp": 0.0,
            "metadata": {},
            "scope": self.scope.name,
            "cost_nano_usd": 0,
            "request_id": None,
            "over_hold": False,
            "ledger_id": None,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "canonical_model": plan.model or model,
            "hold_expired": False,
        }
        inp, out = rates.flat_rates()
        fp = self._fast_plans[key] = self._fast_kind(plan, self.ledger_maxlen, inp, out, fields)
        fp.canonical, fp.scope = fields["canonical_model"], fields["scope"]
        return fp

    def _ledger_entry(
        self, plan: P.Plan, call: CallView, hold_id: str | None, uncommitted: str | None = None
    ) -> tuple[int, str]:
        """(MAXLEN, entry JSON) of a charge's ledger append; (0, "") when the ledger is off."""
        if not self.ledger_maxlen:
            return 0, ""
        entry = L.charge_entry(
            plan.ledger_head,
            call.input_tokens,
            call.output_tokens,
            call.extra,
            call.request_id,
            hold_id,
            call.metadata,
            uncommitted,
        )
        return self.ledger_maxlen, entry

    def record_many(
        self, calls: Iterable[RecordCall]
    ) -> Step[list[ChargeResult | InvalidInputError], list[UsageRecord]] | Done[list[UsageRecord]]:
        """``record()`` for many calls at once, for bulk recorders: each call a tuple of record()'s
        positional arguments or a dict of its arguments. On Redis the charges go in one pipelined
        round trip (each still its own atomic script); every call is validated before anything is
        charged, every charge is persisted, and with ``hard_stop`` the first charge left over a
        limit raises afterwards (``err.record``; ``records`` has them all)."""
        if isinstance(calls, (str, bytes, Mapping)):
            raise TypeError("calls must be an iterable of record() calls (tuples or dicts of its arguments)")
        steps: list[Step[ChargeResult, UsageRecord]] = []
        session = self._last_session  # a batch that fails validation leaves the current session alone
        try:
            for call in calls:
                steps.append(self._record_call(call))
        except BaseException:
            self._last_session = session
            raise
        if not steps:
            return Done([])

        def finish(results: list[ChargeResult | InvalidInputError]) -> list[UsageRecord]:
            records, first, refused = _gather(_finish_one, zip(steps, results, strict=True))
            if isinstance(results, BatchAnswers):  # some were journaled under "raise"
                raise results.error
            if refused is not None:
                raise refused
            if first is not None:
                raise first
            return records

        # One engine call, also while Redis is unavailable: the failure policy journals the batch whole
        # (under "raise", finish raises once, after finishing the charges Redis recorded).
        return Step(RecordMany(tuple(step.op for step in steps)), finish)  # type: ignore[misc]

    def _record_call(self, call: RecordCall) -> Step[ChargeResult, UsageRecord]:
        """One call of record_many(): record()'s arguments, positional (a tuple) or by name (a dict)."""
        if isinstance(call, tuple | list) and 3 <= len(call) <= 6:
            return self.record(*call)
        if isinstance(call, Mapping) and _RECORD_REQUIRED <= call.keys() <= _RECORD_PARAMETERS:
            return self.record(**call)
        raise TypeError(
            "each record_many() call must be record()'s arguments: a tuple (session_id, model, "
            "input_tokens, output_tokens[, metadata[, request_id]]) or (session_id, model, Usage), or a dict "
            f"of them (keywords cached_input_tokens, cache_write_tokens, reasoning_tokens too), got {call!r}"
        )

    def reserve(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> Step[AdmitResult, Hold]:
        """Hold the worst case against every limit atomically, or raise having held nothing."""
        return self._reserve(model, input_tokens, max_output_tokens, session_id, request_id, ttl, True)

    def _reserve(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        session_id: str | None,
        request_id: str | None,
        ttl: float | None,
        count: bool,
    ) -> Step[AdmitResult, Hold]:
        """``reserve``; a refusal is counted unless ``count`` is False (an attempt ``acquire`` repeats)."""
        usage = self.worst_case(model, input_tokens, max_output_tokens)
        ttl_us = self.hold_ttl_us if ttl is None else int(_seconds(ttl, "ttl") * P.US)
        rkey = self.request_key(request_id)  # fixed now: the tree is the hold's, whatever happens later
        plan = self.plan(self._session(session_id, True), model)
        hold_id = uuid.uuid4().hex

        def finish(result: AdmitResult) -> Hold:
            admitted = self._finish_admit(plan, result, usage, model)
            hold = Hold(plan, model, usage, hold_id, request_id, admitted, rkey)
            hold.requested = (input_tokens, max_output_tokens)
            return hold

        maxlen, entry = self._refusal_entry(plan, "reserve", input_tokens, max_output_tokens)
        return Step(Reserve(plan, self.now_us(), usage, hold_id, ttl_us, count, maxlen, entry), finish)

    def acquire(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        *,
        timeout: float = 60.0,
        session_id: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
    ) -> Steps[Hold]:
        """``reserve``, waiting on rolling windows (sleeping ``retry_after``) for up to ``timeout``
        seconds. Raises at once when no window will free room by itself (the budget is spent).
        Only the attempt it gives up on counts as a refusal: the waits are not counted, and giving
        up is one more ``reserve`` (which may still admit), counted when refused."""
        deadline = self.monotonic() + _seconds(timeout, "timeout")
        args = (model, input_tokens, max_output_tokens, session_id, request_id, ttl)
        while True:
            # without a hard stop a refusal raises nothing (reserve answers an unadmitted hold): it is final
            step = self._reserve(*args, count=not self.scope.hard_stop)
            try:
                return step.finish((yield step.op))
            except BudgetExceededError as err:
                wait = err.retry_after
                if wait is None or self.monotonic() + wait > deadline:
                    last = self._reserve(*args, count=True)
                    return last.finish((yield last.op))
                yield Sleep(wait)

    def commit(
        self,
        hold: Hold,
        input_tokens: int | Usage,
        output_tokens: int | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        service_tier: str | None = None,
    ) -> Step[ChargeResult, UsageRecord]:
        """Free the hold and charge the actual usage in one step (charged even above the hold).
        ``input_tokens`` may be one :class:`Usage` value; ``service_tier`` as for ``record``. A commit
        refused for its usage (say ``cached_input_tokens + cache_write_tokens > input_tokens``) leaves
        the hold held: commit corrected numbers (a ``with`` block its error leaves charges the hold,
        flagged)."""
        try:  # validated before the hold is touched
            tokens = charge_args(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens)
            usage = self.usage(hold.model, tokens, service_tier)
            B.check_metadata(metadata)
        except (InvalidInputError, TypeError):
            hold.refused = True
            raise
        call = CallView(hold.model, tokens[0], tokens[1], tokens[2:5], metadata, hold.request_id)
        return self._settle(hold, usage, call, None)

    def charge_hold(self, hold: Hold, why: str) -> Step[ChargeResult, UsageRecord]:
        """Charge what the hold holds, as a commit flagged ``uncommitted=why`` in the ledger."""
        call = CallView(hold.model, hold.requested[0], hold.requested[1], (0, 0, 0), None, hold.request_id)
        return self._settle(hold, hold.held, call, why)

    def _settle(
        self, hold: Hold, usage: Amounts, call: CallView, uncommitted: str | None
    ) -> Step[ChargeResult, UsageRecord]:
        if hold.record is not None:
            raise InvalidInputError("reservation already committed")
        if hold.committing:  # a first commit raised after it was sent or journaled: never charge twice
            raise InvalidInputError(
                "reservation already committed: its first commit failed after it was sent or journaled "
                "(a journaled charge is replayed when Redis answers)"
            )
        maxlen, entry = self._ledger_entry(hold.plan, call, hold.hold_id, uncommitted)
        hold.committing = True
        op = Commit(hold.plan, self.now_us(), usage, hold.hold_id, hold.request_key, self.request_ttl_ms, maxlen, entry)

        def finish(result: ChargeResult) -> UsageRecord:
            hold.open = False
            hold.refused = False
            over = usage[0] > hold.held[0] or usage[1] > hold.held[1]
            expired = isinstance(result, ChargeResult) and result.original is None and not result.hold_found
            if uncommitted is not None:
                self._count_hold("charged_uncommitted")
            try:
                hold.record = self._finish_charge(hold.plan, result, usage, call, over, expired and not uncommitted)
            except BudgetExceededError as err:
                hold.record = err.record
                raise
            return hold.record

        return Step(op, finish)

    def release(self, hold: Hold, uncommitted: bool = False) -> Step[bool, bool] | Done[bool]:
        """Free the hold; True if it was still live. ``uncommitted``: its ``with`` block was left
        without a commit: the release is written to the ledger (``kind="released_uncommitted"``) in
        the same step, and counted in ``summary()["holds"]``."""
        if not hold.open:
            return Done(False)
        hold.open = False
        maxlen, entry = 0, ""
        if uncommitted:
            self._count_hold("released_uncommitted")
            if self.ledger_maxlen:
                maxlen = self.ledger_maxlen
                entry = L.released_entry(hold.plan.ledger_head, hold.hold_id, hold.request_id)
        return Step(Release(hold.plan, hold.hold_id, self.now_us(), hold.held, maxlen, entry), bool)

    def extend(self, hold: Hold, ttl: float) -> Step[bool, bool] | Done[bool]:
        """Keep a long call (a stream) held: its lease now ends ``ttl`` seconds from now, in one
        round trip. False if the hold had lapsed already (a later commit is flagged ``hold_expired``)."""
        ttl_us = int(_seconds(ttl, "ttl") * P.US)
        if not hold.open:
            return Done(False)
        return Step(Extend(hold.plan, hold.hold_id, self.now_us(), ttl_us), bool)

    def leave(self, hold: Hold, exc: BaseException | None) -> Job[Any] | None:
        """What leaving a reservation's ``with`` block does to a hold still open: released quietly
        when an exception (the call failed) leaves it; charged, flagged ``commit_refused``, when the
        exception is a refused commit's (the call happened: its money is never dropped); else, left
        without a commit, a ``BudgetWarning`` and ``on_uncommitted``: released (in the ledger as
        ``released_uncommitted``) or the hold charged (flagged ``exit``)."""
        if not hold.open:
            return None
        if hold.refused and isinstance(exc, (InvalidInputError, TypeError)):
            return self.charge_hold(hold, "commit_refused")
        if exc is not None:
            return self.release(hold)
        charge = self.on_uncommitted == "charge_hold"
        warnings.warn(
            f"a reservation of scope {self.name!r} ({hold.held[0]} tokens, ${nano_to_usd(hold.held[1]):.6f}) was "
            f"left without commit(): its hold was {'charged' if charge else 'released, nothing charged'} "
            "(on_uncommitted=...)",
            BudgetWarning,
            stacklevel=3,
        )
        return self.charge_hold(hold, "exit") if charge else self.release(hold, uncommitted=True)

    def summary(self, session_id: str | None = None) -> Step[SummaryResult, dict[str, Any]]:
        """Usage of the current (or given) session, the rolling day, totals, per model, per limit."""
        plan = self.plan(self._session(session_id, False), None)
        return Step(Summary(plan, self.now_us()), lambda result: self._make_summary(plan, result))

    def alert_check(self) -> Step[ChargeResult, list[BudgetAlert]]:
        """A charge of nothing over every limit (the current session's): it fires, in the atomic step
        and so once across the fleet, the alerts a changed config crossed without any call (a cap
        lowered under usage). It adds no amount, no request and no ledger entry."""
        plan = self.plan(self.session_id, None)

        def finish(result: ChargeResult) -> list[BudgetAlert]:
            if isinstance(result, LocalCharge) or not result.alerts:
                return []  # Redis unavailable: the journal replays it, and its alerts fire then
            alerts = self._make_alerts(plan, result, "")
            self._dispatch(alerts)
            return alerts

        return Step(Record(plan, self.now_us(), (0, 0, 0), None, 0, 0, ""), finish)

    def _reset(
        self,
        what: Literal["session", "model", "scope"],
        keys: list[str],
        session_id: str | None,
        model: str | None = None,
    ) -> Step[Any, None]:
        maxlen, entry = 0, ""
        if self.ledger_maxlen:
            path = [s.name for s in [self.scope, *self.scope.ancestors()]]
            maxlen, entry = self.ledger_maxlen, L.reset_entry(what, self.name, path, session_id, model)
        field_prefix = "" if model is None else model_prefix(model)
        op = Reset(what, tuple(keys), self.now_us(), field_prefix, maxlen, entry)
        return Step(op, _nothing)

    def reset_session(self, session_id: str | None = None) -> Step[Any, None]:
        """Clear this scope's counters of the current (or given) session (atomic; in the ledger)."""
        sid = self._session(session_id, False)
        ks = self.keyspace
        return self._reset("session", [ks.ledger, ks.session(self.name, sid)], sid)

    def reset_model(self, model: str) -> Step[Any, None]:
        """Clear this scope's counters of one model: its cumulative totals (the seed's per-model
        limits) and its rolling per-model windows (atomic; in the ledger)."""
        model = self.model_id(check_name(model, "model"))
        ks = self.keyspace
        keys = [ks.ledger, ks.totals(self.name)]
        for lim in self.scope.all_limits():
            if lim.model is not None and self.model_id(lim.model) == model:
                keys.extend(k for k in self._window_keys(lim) if k not in keys)
        return self._reset("model", keys, None, model)

    def _window_keys(self, lim: Limit) -> list[str]:
        """The keys of a limit's window: a rolling window's two, the current calendar period's one."""
        model = None if lim.model is None else self.model_id(lim.model)
        if isinstance(lim.window, int):
            return list(self.keyspace.window(self.name, lim.window, model))
        if is_calendar(lim.window):
            assert lim.tz is not None
            label = period_at(lim.window, lim.tz, self.period_now_us()).label
            return [self.keyspace.calendar(self.name, lim.window, lim.tz, model, label)]
        return []

    def reset(self, session_id: str | None = None) -> Step[Any, None]:
        """Clear the whole scope: totals, every rolling window and the current (or given) session
        (atomic; in the ledger). Ancestors keep their usage; other sessions keep theirs."""
        sid = self._session(session_id, False)
        ks = self.keyspace
        keys = [ks.ledger, ks.totals(self.name), *ks.window(self.name, P.DAY, None)]
        for lim in self.scope.all_limits():
            keys.extend(k for k in self._window_keys(lim) if k not in keys)
        keys.append(ks.session(self.name, sid))
        return self._reset("scope", keys, sid)

    def ledger(self, since: LedgerSince = None, limit: int | None = None) -> Steps[list[L.LedgerEntry]]:
        """The shared ledger of this scope (charges counting against it, its resets), oldest first.
        ``since``: a ledger id (exclusive), or seconds since the epoch (server time)."""
        return self.ledger_pages(since, limit)

    def ledger_pages(self, since: object, limit: int | None, charges_only: bool = False) -> Steps[list[L.LedgerEntry]]:
        """The ledger read page by page: charges that count against this scope (its own and its
        descendants') and its own resets, oldest first, after ``since`` (see ``_core.ledger.since_id``)."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidInputError(f"limit must be a positive int or None, got {limit!r}")
        out: list[L.LedgerEntry] = []

        def take(page: list[LedgerRow]) -> bool:
            for entry_id, fields in page:
                entry = L.parse_entry(entry_id, fields)
                counted = entry.kind in ("charge", "refusal")  # against the scope and its ancestors
                if entry.kind == "refusal" and charges_only:
                    continue
                if (self.name in entry.path) if counted else (entry.scope == self.name and not charges_only):
                    out.append(entry)
            return limit is None or len(out) < limit

        yield from self._read_ledger(L.since_id(since), take)
        return out if limit is None else out[:limit]

    def report(
        self, since: object = None, until: object = None, by: object = (), tz: str | None = None
    ) -> Steps[list[ReportRow]]:
        """This scope's ledger rolled up into rows (see ``_core/report.py``): read page by page,
        each page folded into the rows before the next is read."""
        rollup = Rollup(self.name, by, since, until, tz)
        start, stop_ms = "-", None
        if self.clock is None:  # entry ids are then the server's time too: read only the range
            slack_ms = 1000  # an id and its entry's timestamp are taken apart (a clock step, a script)
            if rollup.since_us is not None:
                start = str(max(rollup.since_us // 1000 - slack_ms, 0))
            if rollup.until_us is not None:
                stop_ms = rollup.until_us // 1000 + slack_ms

        def take(page: list[LedgerRow]) -> bool:
            for entry_id, fields in page:
                if stop_ms is not None and int(entry_id.partition("-")[0]) > stop_ms:
                    return False
                rollup.add(L.parse_entry(entry_id, fields))
            return True

        yield from self._read_ledger(start, take)
        return rollup.rows()

    def _read_ledger(self, start: str, take: Callable[[list[LedgerRow]], bool]) -> Steps[None]:
        """The tree's ledger page by page from ``start`` (an XRANGE start), each page handed to
        ``take`` (which answers whether to read on)."""
        while True:
            page = yield LedgerRead(self.keyspace.ledger, start, LEDGER_PAGE)
            if not take(page) or len(page) < LEDGER_PAGE:
                return
            start = "(" + page[-1][0]

    # ---- local state ----------------------------------------------------------------------------

    def on_alert(self, callback: Callable[[BudgetAlert], Any]) -> None:
        """Call ``callback(alert)`` for each threshold crossing this object's calls cause."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._callbacks.append(callback)

    @property
    def records(self) -> list[UsageRecord]:
        """Records charged through this object (the latest 10,000)."""
        return [r if isinstance(r, UsageRecord) else kept_record(*r) for r in self._records]

    @property
    def alerts(self) -> list[BudgetAlert]:
        """Alerts fired by this object's calls (the latest 10,000)."""
        return list(self._alerts)


@dataclass(slots=True, eq=False)
class Hold:
    """The state of one reservation (shared by ``Reservation`` and ``AsyncReservation``)."""

    plan: P.Plan
    model: str
    held: Amounts
    hold_id: str
    request_id: str | None
    admitted: bool
    request_key: str | None = None
    open: bool = False  # held and not settled yet (set from ``admitted``)
    record: UsageRecord | None = None  # the charge, once committed
    committing: bool = False  # a commit was sent (or journaled)
    refused: bool = False  # the latest commit was refused (bad usage): the hold is still held
    requested: tuple[int, int] = (0, 0)  # (input tokens, max output tokens) reserved

    def __post_init__(self) -> None:
        self.open = self.admitted
