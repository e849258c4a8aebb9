"""Everything a budget does except I/O, shared by the sync and asyncio shells (``budget.py``).

Each operation is a *flow*: a generator that validates, builds the plan (pure core), yields the one
engine call it needs as ``(method name, args)``, receives the engine's answer, and returns the
result (or raises). ``Budget`` drives flows with plain calls, ``AsyncBudget`` with ``await`` — the
logic exists once (the sans-I/O shape of httpx's auth flows).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Generator, Mapping
from typing import Any, TypeVar

from distbudget._core import plan as P
from distbudget._core.keys import KeySpace, alert_index_key, check_prefix
from distbudget._core.money import check_tokens, nano_to_usd
from distbudget._core.scope import BudgetScope, check_name, window_label
from distbudget._core.types import AlertLevel, BudgetAlert, UsageRecord, alert_message
from distbudget._exceptions import BudgetExceededError, BudgetWarning, InvalidInputError
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


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise InvalidInputError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


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
    ) -> None:
        if not isinstance(scope, BudgetScope):
            raise TypeError("scope must be a BudgetScope")
        if session_id is not None:
            check_name(session_id, "session_id")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        self.scope = scope
        self.prices = PriceBook(rates, default_rates)
        chain = [scope, *scope.ancestors()]
        self.keyspace = KeySpace(check_prefix(prefix), chain[-1].name)
        self.clock = clock
        self.sleep = sleep
        self.session_ttl_ms = int(_seconds(session_ttl, "session_ttl") * 1000)
        self.hold_ttl_us = int(_seconds(hold_ttl, "hold_ttl") * P.US)
        longest = max([lim.window for s in chain for lim in s.all_limits() if isinstance(lim.window, int)], default=0)
        self.request_ttl_ms = (
            int(_seconds(request_ttl, "request_ttl") * 1000) if request_ttl else max(longest, 86400) * 1000
        )
        self._fixed_session = session_id
        self._last_session: str | None = None
        self._plans: dict[tuple[str, str | None], P.Plan] = {}
        self._callbacks: list[Callable[[BudgetAlert], Any]] = []
        self._records: deque[UsageRecord] = deque(maxlen=MAX_LOCAL_RECORDS)
        self._alerts: deque[BudgetAlert] = deque(maxlen=MAX_LOCAL_RECORDS)
        self._local_lock = threading.Lock()
        self._announced = False

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
        return self.keyspace.request(check_name(request_id, "request_id"))

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
        record = UsageRecord(
            plan.session_id,
            model,
            input_tokens,
            output_tokens,
            nano_to_usd(usage[1]),
            result.now_us / P.US,
            dict(metadata or {}),
            self.name,
            usage[1],
            request_id,
            over_hold,
        )
        with self._local_lock:
            self._records.append(record)
        if result.alerts:
            self._dispatch(self._make_alerts(plan, result, model))
        over = P.exceeded(plan, result.totals)
        if over:
            i = over[0]
            err = self._exceeded_error(plan, i, P.used(plan, result.totals, i), record=record)
            if self.scope.hard_stop:
                raise err
            warnings.warn(err.message, BudgetWarning, stacklevel=3)
        return record

    def finish_admit(self, plan: P.Plan, result: P.AdmitResult, usage: tuple[int, int, int]) -> bool:
        """Raise (hard stop) or warn and return False when refused; True when admitted."""
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
        usage = self.usage(
            model, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens
        )
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict")
        rkey = self.request_key(request_id)
        plan = self.plan(self._session(session_id, True), model)
        result = yield "record", (plan, self.now_us(), usage, rkey, self.request_ttl_ms)
        return self.finish_charge(plan, result, model, usage, input_tokens, output_tokens, metadata, request_id)

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
        self.request_key(request_id)
        plan = self.plan(self._session(session_id, True), model)
        hold_id = uuid.uuid4().hex
        result = yield "reserve", (plan, self.now_us(), usage, hold_id, ttl_us)
        admitted = self.finish_admit(plan, result, usage)
        return Hold(plan, model, usage, hold_id, request_id, admitted)

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
        rkey = self.request_key(hold.request_id)
        result = yield "commit", (hold.plan, self.now_us(), usage, hold.hold_id, rkey, self.request_ttl_ms)
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

    def reset_session_flow(self, session_id: str | None) -> Flow[None]:
        sid = self._session(session_id, False)
        yield "delete", ([self.keyspace.session(self.name, sid)],)

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

    __slots__ = ("admitted", "held", "hold_id", "model", "open", "plan", "record", "request_id")

    def __init__(
        self, plan: P.Plan, model: str, held: tuple[int, int, int], hold_id: str, request_id: str | None, admitted: bool
    ) -> None:
        self.plan = plan
        self.model = model
        self.held = held
        self.hold_id = hold_id
        self.request_id = request_id
        self.admitted = admitted
        self.open = admitted
        self.record: UsageRecord | None = None


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
