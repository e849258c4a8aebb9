"""Everything a budget does except I/O, shared by the sync and asyncio shells (``budget.py``).

Each operation is a *flow*: a generator that validates, builds the plan (pure core), yields the one
engine call it needs as ``(method name, args)``, receives the engine's answer, and returns the
result (or raises). ``Budget`` drives flows with plain calls, ``AsyncBudget`` with ``await`` — the
logic exists once (the sans-I/O shape of httpx's auth flows).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import IO, Any, TypeVar

from distbudget import _degraded as D
from distbudget._core import ledger as L
from distbudget._core import plan as P
from distbudget._core import registry as R
from distbudget._core.keys import KeySpace, alert_index_key, check_prefix, model_prefix
from distbudget._core.money import MAX_AMOUNT, NANO, check_tokens, nano_to_usd
from distbudget._core.scope import MAX_NAME_LENGTH, BudgetScope, check_name, window_label
from distbudget._core.types import AlertLevel, BudgetAlert, UsageRecord, alert_message
from distbudget._exceptions import BackendError, BudgetExceededError, BudgetWarning, InvalidInputError
from distbudget.pricing import ModelRates, PriceBook

log = logging.getLogger("distbudget")

T = TypeVar("T")
# A flow yields ("engine method", args) or ("sleep", (seconds,)) and gets the answer back.
Call = tuple[str, tuple[Any, ...]]
Flow = Generator[Call, Any, T]

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
_RECORD_REQUIRED = frozenset({"session_id", "model", "input_tokens", "output_tokens"})
_RECORD_PARAMETERS = _RECORD_REQUIRED | {
    "metadata",
    "request_id",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
}


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise InvalidInputError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def allow_eviction_option(options: Mapping[str, Any]) -> bool:
    """``allow_eviction`` (unsafe: see ``engines/functions.py``): True or False, default False."""
    value = options.get("allow_eviction", False)
    if not isinstance(value, bool):
        raise TypeError(f"allow_eviction must be True or False, got {value!r}")
    return value


class BudgetCore:
    """Everything a budget does except talking to its engine (shared by sync and async shells)."""

    def __init__(
        self,
        scope: BudgetScope,
        rates: Mapping[str, ModelRates] | None = None,
        *,
        session_id: str | None = None,
        prefix: str = "distbudget",
        clock: Callable[[], float] | None = None,
        default_rates: ModelRates | None = None,
        session_ttl: float = 7 * 86400,
        hold_ttl: float = 600,
        request_ttl: float | None = None,
        sleep: Callable[[float], Any] | None = None,
        ledger_maxlen: int = L.DEFAULT_MAXLEN,
        on_backend_error: str = "raise",
        fail_open_max_cost_usd: float | None = None,
        fail_open_max_tokens: int | None = None,
        journal_size: int = D.DEFAULT_JOURNAL_SIZE,
        allow_eviction: bool = False,
        _registry: tuple[str, float, tuple[str, ...]] | None = None,
    ) -> None:
        if not isinstance(scope, BudgetScope):
            raise TypeError("scope must be a BudgetScope")
        if session_id is not None:
            check_name(session_id, "session_id")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        if isinstance(ledger_maxlen, bool) or not isinstance(ledger_maxlen, int) or ledger_maxlen < 0:
            raise InvalidInputError(f"ledger_maxlen must be an int >= 0 (0: no ledger), got {ledger_maxlen!r}")
        self.prefix = check_prefix(prefix)
        self.default_rates = default_rates
        self.clock = clock
        self.sleep = sleep
        self.session_ttl_ms = int(_seconds(session_ttl, "session_ttl") * 1000)
        self.hold_ttl_us = int(_seconds(hold_ttl, "hold_ttl") * P.US)
        self._request_ttl = None if request_ttl is None else _seconds(request_ttl, "request_ttl")
        self.ledger_maxlen = ledger_maxlen
        # accept a server that evicts keys (unsafe: an evicted counter resets its budget)
        self.allow_eviction = allow_eviction_option({"allow_eviction": allow_eviction})
        self._configure(scope, rates)
        # A budget of a BudgetManager follows the shared registry: (registry key, seconds a config
        # is trusted, the config chain it was built from).
        self._registry = _registry
        self._fresh_until = time.monotonic() + _registry[1] if _registry else 0.0
        self._fixed_session = session_id
        self._last_session: str | None = None
        self._callbacks: list[Callable[[BudgetAlert], Any]] = []
        self._records: deque[UsageRecord] = deque(maxlen=MAX_LOCAL_RECORDS)
        self._alerts: deque[BudgetAlert] = deque(maxlen=MAX_LOCAL_RECORDS)
        self._local_lock = threading.Lock()
        self._announced = False
        # What happens when Redis is unavailable (see _degraded.py); the shells bind it to their engine.
        self._guard = D.Guard(self, on_backend_error, fail_open_max_cost_usd, fail_open_max_tokens, journal_size)

    @property
    def backend_status(self) -> dict[str, Any]:
        """The failure policy and the backend's health as this process sees it (no I/O): degraded
        or not, charges journaled and replayed, errors (``summary()["backend"]`` shows the same)."""
        return self._guard.status()

    def _configure(self, scope: BudgetScope, rates: Mapping[str, ModelRates] | None) -> None:
        """Set (or replace, when the registry changed) the scope and rates and what derives from them."""
        self.scope = scope
        self.rates = rates
        self.prices = PriceBook(rates, self.default_rates)
        chain = [scope, *scope.ancestors()]
        if isinstance(chain[-1].parent, str):
            raise InvalidInputError(
                f"scope {chain[-1].name!r} names its parent {chain[-1].parent!r} by name: register the scopes in "
                "a BudgetManager, or pass the parent BudgetScope itself"
            )
        self.keyspace = KeySpace(self.prefix, chain[-1].name)
        longest = max([lim.window for s in chain for lim in s.all_limits() if isinstance(lim.window, int)], default=0)
        ttl = self._request_ttl
        self.request_ttl_ms = int(ttl * 1000) if ttl else max(longest, 86400) * 1000
        self._plans: dict[tuple[str, str | None], P.Plan] = {}

    # ---- the shared registry (budgets of a BudgetManager) ---------------------------------------

    def refresh_call(self) -> Call | None:
        """The registry read due (its config is older than the manager's ``registry_ttl``), or None."""
        if self._registry is None or time.monotonic() < self._fresh_until:
            return None
        return "registry", (self._registry[0], "chain", self.name)

    def refreshed(self, chain: list[str]) -> None:
        """Adopt the config the registry holds now; ``KeyError`` if the scope was removed."""
        assert self._registry is not None
        err = R.refusal(chain)
        if err is not None:
            raise err
        if not chain:
            raise KeyError(f"unknown scope {self.name!r} (removed from the registry)")
        key, ttl, old = self._registry
        if tuple(chain) != old:
            scope, rates = R.from_chain(chain)
            self._configure(scope, rates)
            self._registry = (key, ttl, tuple(chain))
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

    def plan(self, session_id: str, model: str | None) -> P.Plan:
        key = (session_id, model)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            plan = self._plans[key] = P.build_plan(self.scope, session_id, model, self.keyspace, self.session_ttl_ms)
        return plan

    def usage(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> tuple[int, int, int]:
        """Validated (tokens, nano-USD, requests) of one call."""
        if (  # the common call, valid at a glance: the checks below would all pass
            type(input_tokens) is int
            and type(output_tokens) is int
            and type(model) is str
            and 0 <= input_tokens <= MAX_AMOUNT
            and 0 <= output_tokens <= MAX_AMOUNT
            and 0 < len(model) <= MAX_NAME_LENGTH
            and type(cached_input_tokens) is int
            and type(cache_write_tokens) is int
            and type(reasoning_tokens) is int
            and not (cached_input_tokens or cache_write_tokens or reasoning_tokens)
        ):
            return input_tokens + output_tokens, self.prices.rates_for(model).cost_nano(input_tokens, output_tokens), 1
        check_name(model, "model")
        check_tokens(input_tokens, "input_tokens")
        check_tokens(output_tokens, "output_tokens")
        check_tokens(cached_input_tokens, "cached_input_tokens")
        check_tokens(cache_write_tokens, "cache_write_tokens")
        check_tokens(reasoning_tokens, "reasoning_tokens")
        cost = self.prices.rates_for(model).cost_nano(
            input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens
        )
        return input_tokens + output_tokens, cost, 1

    def worst_case(self, model: str, input_tokens: int, max_output_tokens: int) -> tuple[int, int, int]:
        check_name(model, "model")
        check_tokens(input_tokens, "input_tokens")
        check_tokens(max_output_tokens, "max_output_tokens")
        cost = self.prices.rates_for(model).worst_case_nano(input_tokens, max_output_tokens)
        return input_tokens + max_output_tokens, cost, 1

    def request_key(self, request_id: str | None) -> str | None:
        if request_id is None:
            return None
        return self.keyspace.request(self.name, check_name(request_id, "request_id"))

    def estimate(self, model: str, input_tokens: int, output_tokens: int = 0) -> float:
        """Cost in USD of a call; records nothing."""
        return nano_to_usd(self.usage(model, input_tokens, output_tokens)[1])

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
        where = "" if lim.scope == self.name else f" (ancestor scope {lim.scope!r})"
        msg = f"Budget {verb} {lim.limit_type} for scope {lim.scope!r}{where}: {used} > {limit}"
        retry = retry_us / P.US if retry_us >= 0 else None
        return BudgetExceededError(msg, lim.scope, lim.limit_type, used, limit, retry_after=retry, record=record)

    def _make_alerts(self, plan: P.Plan, result: P.ChargeResult, model: str) -> list[BudgetAlert]:
        out = []
        ids: list[str | None] = list(result.alert_ids) or [None] * len(result.alerts)
        for (i, level), alert_id in zip(result.alerts, ids, strict=True):
            lim = plan.limits[i]
            used = self._display(lim, P.used(plan, result.totals, i))
            limit = self._display(lim, lim.shown_value)
            lvl = (
                AlertLevel.CRITICAL if level == P.CRITICAL else AlertLevel.INFO if lim.alert_of else AlertLevel.WARNING
            )
            msg = alert_message(lvl, lim.scope, lim.shown_type, used, limit)
            out.append(
                BudgetAlert(
                    lim.scope,
                    lvl,
                    msg,
                    used,
                    limit,
                    result.now_us / P.US,
                    lim.shown_type,
                    session_id=plan.session_id,
                    model=model,
                    alert_id=alert_id,
                )
            )
        return out

    def _dispatch(self, alerts: list[BudgetAlert]) -> None:
        for alert in alerts:
            with self._local_lock:
                self._alerts.append(alert)
            for cb in list(self._callbacks):
                try:
                    cb(alert)
                except Exception:  # a broken callback must never break accounting
                    log.exception("distbudget alert callback %r failed", cb)

    def finish_charge(
        self,
        plan: P.Plan,
        result: P.ChargeResult,
        model: str,
        usage: tuple[int, int, int],
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None,
        request_id: str | None,
        over_hold: bool = False,
    ) -> UsageRecord:
        """Turn an engine's charge answer into the record; fire alerts; raise/warn if over a limit."""
        if isinstance(result, D.LocalCharge):  # Redis unavailable: the charge waits in the journal
            record = UsageRecord(
                plan.session_id,
                model,
                input_tokens,
                output_tokens,
                nano_to_usd(usage[1]),
                result.timestamp,
                dict(metadata or {}),
                self.name,
                usage[1],
                request_id,
                over_hold,
                journaled=True,
            )
            with self._local_lock:
                self._records.append(record)
            return record
        if result.original is not None:
            ts, _tok, cost = result.original
            return UsageRecord(
                plan.session_id,
                model,
                input_tokens,
                output_tokens,
                nano_to_usd(cost),
                ts / P.US,
                dict(metadata or {}),
                self.name,
                cost,
                request_id,
                over_hold,
                True,
            )
        record = _new_object(UsageRecord)  # UsageRecord(...), twice as fast (see _RECORD_DEFAULTS)
        _set_attr(
            record,
            "__dict__",
            {
                **_RECORD_DEFAULTS,
                "session_id": plan.session_id,
                "model": model,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cost_usd": usage[1] / NANO,
                "timestamp": result.now_us / P.US,
                "metadata": dict(metadata) if metadata else {},
                "scope": self.scope.name,
                "cost_nano_usd": usage[1],
                "request_id": request_id,
                "over_hold": over_hold,
                "ledger_id": result.ledger_id or None,
            },
        )
        with self._local_lock:
            self._records.append(record)
        if result.alerts:
            self._dispatch(self._make_alerts(plan, result, model))
        totals = result.totals
        for i, (c, m, value, _first) in enumerate(plan.checks):
            if totals[3 * c + m] > value:  # the first limit now over (P.exceeded()[0])
                err = self._exceeded_error(plan, i, totals[3 * c + m], record=record)
                if self.scope.hard_stop:
                    raise err
                warnings.warn(err.message, BudgetWarning, stacklevel=3)
                break
        return record

    def finish_admit(self, plan: P.Plan, result: P.AdmitResult, usage: tuple[int, int, int]) -> bool:
        """Raise (hard stop) or warn and return False when refused; True when admitted."""
        if isinstance(result, D.Refusal):  # Redis unavailable and the failure policy refuses
            refusal = result.error(self.name)
            if self.scope.hard_stop:
                raise refusal
            warnings.warn(refusal.message, BudgetWarning, stacklevel=3)
            return False
        if result.refused < 0:
            return True
        lim = plan.limits[result.refused]
        k = 3 * lim.counter + lim.metric
        projected = result.totals[k] + result.held[k] + usage[lim.metric]
        retry_us = result.retry_us
        if retry_us < 0 and result.held[k] and result.totals[k] + usage[lim.metric] <= lim.value:
            retry_us = HOLD_RETRY_US  # only in-flight holds block: they settle soon, look again then
        err = self._exceeded_error(plan, result.refused, projected, retry_us)
        if self.scope.hard_stop:
            raise err
        warnings.warn(err.message, BudgetWarning, stacklevel=3)
        return False

    def make_summary(self, plan: P.Plan, result: P.SummaryResult) -> dict[str, Any]:
        def view(counter: int) -> dict[str, Any]:
            t = result.totals[3 * counter : 3 * counter + 3]
            return {"tokens": t[0], "cost_usd": nano_to_usd(t[1]), "requests": t[2]}

        per_model: dict[str, dict[str, Any]] = {}
        from distbudget._core.keys import decode_model_field

        names = {"t": "tokens", "c": "cost_usd", "r": "requests"}
        for field, value in result.scope_totals.items():
            decoded = decode_model_field(field)
            if decoded is None:
                continue
            model, metric = decoded
            row = per_model.setdefault(model, {"tokens": 0, "cost_usd": 0.0, "requests": 0})
            row[names[metric]] = nano_to_usd(value) if metric == "c" else value
        limits: dict[str, Any] = {}
        for lim in plan.limits:
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
            "backend": self._guard.status(),
        }

    # ---- flows: one per operation, driven by the sync or the async shell ------------------------

    def announcement(self) -> Call | None:
        """Before a budget's first operation (until it succeeds): register the tree's alert stream
        under each scope's name (``<prefix>:alert-streams``), which is how listeners find it."""
        if self._announced:
            return None
        streams = {s.name: self.keyspace.alerts for s in [self.scope, *self.scope.ancestors()]}
        return "announce", (alert_index_key(self.keyspace.prefix), streams)

    def check_flow(self, model: str, input_tokens: int, output_tokens: int, session_id: str | None) -> Flow[bool]:
        usage = self.usage(model, input_tokens, output_tokens)
        plan = self.plan(self._session(session_id, False), model)
        result = yield "check", (plan, self.now_us(), usage)
        return self.finish_admit(plan, result, usage)

    def record_flow(
        self,
        session_id: str | None,
        model: str,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None,
        request_id: str | None,
        cached_input_tokens: int,
        cache_write_tokens: int,
        reasoning_tokens: int,
    ) -> Flow[UsageRecord]:
        args = self._record_args(
            session_id,
            model,
            input_tokens,
            output_tokens,
            metadata,
            request_id,
            cached_input_tokens,
            cache_write_tokens,
            reasoning_tokens,
        )
        result = yield "record", args
        return self.finish_charge(args[0], result, model, args[2], input_tokens, output_tokens, metadata, request_id)

    def _record_args(
        self,
        session_id: str | None,
        model: str,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> tuple[Any, ...]:
        """Validate one record() call; the engine's "record" arguments
        ``(plan, now µs, usage, request key, request TTL ms, ledger entry)``."""
        usage = self.usage(
            model, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens
        )
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict")
        rkey = None if request_id is None else self.request_key(request_id)
        plan = self.plan(self._session(session_id, True), model)
        extra = (cached_input_tokens, cache_write_tokens, reasoning_tokens)
        entry = self.ledger_entry(plan, input_tokens, output_tokens, extra, request_id, None, metadata)
        return plan, self.now_us(), usage, rkey, self.request_ttl_ms, entry

    def record_many_flow(self, calls: Iterable[RecordCall]) -> Flow[list[UsageRecord]]:
        """``record()`` for each call, in order, in one engine call (Redis: one pipelined round
        trip; each charge is still its own atomic script). Every call is validated before anything
        is charged; every charge is persisted; then, if ``hard_stop``, the first charge that left a
        limit exceeded raises (after the alerts and records of all of them)."""
        if isinstance(calls, (str, bytes, Mapping)):
            raise TypeError("calls must be an iterable of record() calls (tuples or dicts of its arguments)")
        batch: list[tuple[Any, ...]] = []
        shown: list[tuple[Any, ...]] = []  # (model, input_tokens, output_tokens, metadata, request_id)
        session = self._last_session  # a batch that fails validation leaves the current session alone
        try:
            self._check_calls(calls, batch, shown)
        except BaseException:
            self._last_session = session
            raise
        if not batch:
            return []
        # One engine call, also while Redis is unavailable: the failure policy journals the batch whole
        # (under "raise", the flow raises once, after finishing the charges Redis recorded).
        results = yield "record_many", (tuple(batch),)
        records: list[UsageRecord] = []
        first: BudgetExceededError | None = None
        for args, result, (model, input_tokens, output_tokens, metadata, request_id) in zip(
            batch, results, shown, strict=True
        ):
            try:
                records.append(
                    self.finish_charge(
                        args[0], result, model, args[2], input_tokens, output_tokens, metadata, request_id
                    )
                )
            except BudgetExceededError as err:
                assert err.record is not None
                records.append(err.record)
                first = first or err
        if isinstance(results, D.BatchAnswers):
            raise results.error
        if first is not None:
            raise first
        return records

    def _check_calls(
        self, calls: Iterable[RecordCall], batch: list[tuple[Any, ...]], shown: list[tuple[Any, ...]]
    ) -> None:
        """Validate record_many()'s calls into ``batch`` (engine arguments) and ``shown``."""
        for call in calls:
            if isinstance(call, tuple | list) and 4 <= len(call) <= 6:  # record()'s positional arguments
                args = self._record_args(*call)
                shown.append((call[1], call[2], call[3], *call[4:6], *(None,) * (6 - len(call))))
            elif isinstance(call, Mapping) and _RECORD_REQUIRED <= call.keys() <= _RECORD_PARAMETERS:
                args = self._record_args(**call)
                shown.append(
                    (
                        call["model"],
                        call["input_tokens"],
                        call["output_tokens"],
                        call.get("metadata"),
                        call.get("request_id"),
                    )
                )
            else:
                raise TypeError(
                    "each record_many() call must be record()'s arguments: a tuple (session_id, model, "
                    "input_tokens, output_tokens[, metadata[, request_id]]) or a dict of them (keywords "
                    f"cached_input_tokens, cache_write_tokens, reasoning_tokens too), got {call!r}"
                )
            batch.append(args)

    def reserve_flow(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        session_id: str | None,
        request_id: str | None,
        ttl: float | None,
    ) -> Flow[Hold]:
        usage = self.worst_case(model, input_tokens, max_output_tokens)
        ttl_us = self.hold_ttl_us if ttl is None else int(_seconds(ttl, "ttl") * P.US)
        rkey = self.request_key(request_id)  # fixed now: the tree is the hold's, whatever happens later
        plan = self.plan(self._session(session_id, True), model)
        hold_id = uuid.uuid4().hex
        result = yield "reserve", (plan, self.now_us(), usage, hold_id, ttl_us)
        admitted = self.finish_admit(plan, result, usage)
        return Hold(plan, model, usage, hold_id, request_id, admitted, rkey)

    def acquire_flow(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        timeout: float,
        session_id: str | None,
        request_id: str | None,
        ttl: float | None,
    ) -> Flow[Hold]:
        deadline = self.monotonic() + _seconds(timeout, "timeout")
        while True:
            try:
                return (
                    yield from self.reserve_flow(model, input_tokens, max_output_tokens, session_id, request_id, ttl)
                )
            except BudgetExceededError as err:
                wait = err.retry_after
                if wait is None or self.monotonic() + wait > deadline:
                    raise
                yield "sleep", (wait,)

    def commit_flow(
        self,
        hold: Hold,
        input_tokens: int,
        output_tokens: int,
        metadata: dict[str, Any] | None,
        cached_input_tokens: int,
        cache_write_tokens: int,
        reasoning_tokens: int,
    ) -> Flow[UsageRecord]:
        usage = self.usage(
            hold.model, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens
        )
        if hold.record is not None:
            raise InvalidInputError("reservation already committed")
        if hold.committing:  # a first commit raised after it was sent or journaled: never charge twice
            raise InvalidInputError(
                "reservation already committed: its first commit failed after it was sent or journaled "
                "(a journaled charge is replayed when Redis answers)"
            )
        rkey = hold.request_key
        extra = (cached_input_tokens, cache_write_tokens, reasoning_tokens)
        entry = self.ledger_entry(
            hold.plan, input_tokens, output_tokens, extra, hold.request_id, hold.hold_id, metadata
        )
        hold.committing = True
        result = yield "commit", (hold.plan, self.now_us(), usage, hold.hold_id, rkey, self.request_ttl_ms, entry)
        hold.open = False
        over = usage[0] > hold.held[0] or usage[1] > hold.held[1]
        try:
            hold.record = self.finish_charge(
                hold.plan,
                result,
                hold.model,
                usage,
                input_tokens,
                output_tokens,
                metadata,
                hold.request_id,
                over_hold=over,
            )
        except BudgetExceededError as err:
            hold.record = err.record
            raise
        return hold.record

    def release_flow(self, hold: Hold) -> Flow[bool]:
        if not hold.open:
            return False
        hold.open = False
        return bool((yield "release", (hold.plan, hold.hold_id)))

    def summary_flow(self, session_id: str | None) -> Flow[dict[str, Any]]:
        plan = self.plan(self._session(session_id, False), None)
        result = yield "summary", (plan, self.now_us())
        return self.make_summary(plan, result)

    def _reset_entry(self, what: str, session_id: str | None, model: str | None) -> tuple[int, str]:
        if not self.ledger_maxlen:
            return 0, ""
        path = [s.name for s in [self.scope, *self.scope.ancestors()]]
        return self.ledger_maxlen, L.reset_entry(what, self.name, path, session_id, model)

    def reset_session_flow(self, session_id: str | None) -> Flow[None]:
        """Zero one session's counters of this scope (the seed's ``reset_session``)."""
        sid = self._session(session_id, False)
        ks = self.keyspace
        keys = [ks.ledger, ks.session(self.name, sid)]
        yield "reset", ("session", keys, self.now_us(), "", self._reset_entry("session", sid, None))

    def reset_model_flow(self, model: str) -> Flow[None]:
        """Zero this scope's counters of one model: its cumulative totals (the seed's per-model
        limits) and its rolling per-model windows."""
        check_name(model, "model")
        ks = self.keyspace
        keys = [ks.ledger, ks.totals(self.name)]
        for lim in self.scope.all_limits():
            if lim.model == model and isinstance(lim.window, int):
                keys.extend(k for k in ks.window(self.name, lim.window, model) if k not in keys)
        yield "reset", ("model", keys, self.now_us(), model_prefix(model), self._reset_entry("model", None, model))

    def reset_flow(self, session_id: str | None) -> Flow[None]:
        """Zero the whole scope: totals (all models), every rolling window, and the current (or
        given) session. Ancestors keep their usage; other sessions keep theirs (``reset_session``)."""
        sid = self._session(session_id, False)
        ks = self.keyspace
        keys = [ks.ledger, ks.totals(self.name), *ks.window(self.name, P.DAY, None)]
        for lim in self.scope.all_limits():
            if isinstance(lim.window, int):
                keys.extend(k for k in ks.window(self.name, lim.window, lim.model) if k not in keys)
        keys.append(ks.session(self.name, sid))
        yield "reset", ("scope", keys, self.now_us(), "", self._reset_entry("scope", sid, None))

    def ledger_flow(self, since: object, limit: int | None, charges_only: bool = False) -> Flow[list[L.LedgerEntry]]:
        """This scope's ledger: charges that count against it (its own and its descendants') and
        its own resets, oldest first, after ``since`` (see :func:`distbudget._core.ledger.since_id`)."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidInputError(f"limit must be a positive int or None, got {limit!r}")
        start = L.since_id(since)
        out: list[L.LedgerEntry] = []
        while limit is None or len(out) < limit:
            page = yield "ledger_read", (self.keyspace.ledger, start, LEDGER_PAGE)
            for entry_id, fields in page:
                entry = L.parse_entry(entry_id, fields)
                charge = entry.kind == "charge"
                if (self.name in entry.path) if charge else (entry.scope == self.name and not charges_only):
                    out.append(entry)
            if len(page) < LEDGER_PAGE:
                break
            last = page[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        return out if limit is None else out[:limit]

    def ledger_entry(
        self,
        plan: P.Plan,
        input_tokens: int,
        output_tokens: int,
        extra: tuple[int, int, int],
        request_id: str | None,
        hold_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> tuple[int, str]:
        """(MAXLEN, entry JSON) for a charge's ledger append; (0, "") when the ledger is off."""
        if not self.ledger_maxlen:
            return 0, ""
        return self.ledger_maxlen, L.charge_entry(
            plan.ledger_head, input_tokens, output_tokens, extra, request_id, hold_id, metadata
        )

    # ---- local state ----------------------------------------------------------------------------

    def on_alert(self, callback: Callable[[BudgetAlert], Any]) -> None:
        """Call ``callback(alert)`` for each threshold crossing this object's calls cause."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._callbacks.append(callback)

    @property
    def records(self) -> list[UsageRecord]:
        """Records charged through this object (the latest 10,000)."""
        with self._local_lock:
            return list(self._records)

    @property
    def alerts(self) -> list[BudgetAlert]:
        """Alerts fired by this object's calls (the latest 10,000)."""
        with self._local_lock:
            return list(self._alerts)


class Hold:
    """The state of one reservation (shared by ``Reservation`` and ``AsyncReservation``)."""

    __slots__ = (
        "admitted",
        "committing",
        "held",
        "hold_id",
        "model",
        "open",
        "plan",
        "record",
        "request_id",
        "request_key",
    )

    def __init__(
        self,
        plan: P.Plan,
        model: str,
        held: tuple[int, int, int],
        hold_id: str,
        request_id: str | None,
        admitted: bool,
        request_key: str | None = None,
    ) -> None:
        self.plan = plan
        self.model = model
        self.held = held
        self.hold_id = hold_id
        self.request_id = request_id
        self.request_key = request_key
        self.admitted = admitted
        self.open = admitted
        self.record: UsageRecord | None = None
        self.committing = False  # a commit was sent (or journaled)


class ReservationBase:
    """What sync and async reservations share: the hold and its read-only views."""

    def __init__(self, budget: Any, hold: Hold) -> None:
        self.budget = budget
        self.hold = hold

    @property
    def admitted(self) -> bool:
        return self.hold.admitted

    @property
    def model(self) -> str:
        return self.hold.model

    @property
    def session_id(self) -> str:
        return self.hold.plan.session_id

    @property
    def request_id(self) -> str | None:
        return self.hold.request_id

    @property
    def hold_id(self) -> str:
        return self.hold.hold_id

    @property
    def held_tokens(self) -> int:
        return self.hold.held[0]

    @property
    def held_nano_usd(self) -> int:
        return self.hold.held[1]

    @property
    def held_cost_usd(self) -> float:
        return nano_to_usd(self.hold.held[1])

    @property
    def record(self) -> UsageRecord | None:
        """The charge, once committed."""
        return self.hold.record

    def commit_failed(self, exc: BaseException) -> None:
        """A commit raised. It may be committed again unless that could charge twice: refused while
        its charge is journaled (replayed later) or may have run (a cancellation, a lost reply)
        without a request id to deduplicate it. An error Redis answered ran nothing."""
        if self.hold.record is not None:
            return
        journaled = isinstance(exc, BackendError) and exc.journaled
        if self.hold.request_key is not None or (isinstance(exc, BackendError) and not journaled):
            self.hold.committing = False
