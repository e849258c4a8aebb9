"""What a budget does when Redis does not answer: the failure policy, around each engine call.

``on_backend_error`` (per budget):

* ``"raise"`` (default): the call raises :class:`BackendError` naming the backend problem.
* ``"deny"``: fail closed. ``check`` / ``reserve`` / ``acquire`` refuse as if the budget were spent
  (``BudgetExceededError`` with ``limit_type="backend_unavailable"``; ``False`` when
  ``hard_stop=False``).
* ``"allow"``: fail open. ``check`` / ``reserve`` are admitted locally, within an optional allowance
  (``fail_open_max_cost_usd``, ``fail_open_max_tokens``) per budget object, per outage; beyond it they
  refuse as under ``"deny"``. A reservation made while Redis is down is a local hold.

In every mode a charge whose Redis call failed because Redis was unavailable is journaled (see
``journal.py``) and replayed when Redis answers. Under ``"raise"`` the call still raises (the error
says the charge was journaled); under ``"deny"`` / ``"allow"`` it returns the record with
``journaled=True``.

Errors Redis *answered* (a script error, ``NOPERM``, ``WRONGTYPE``, a bad password) are not outages:
they raise ``BackendError`` in every mode and are not journaled (replaying would fail the same way).
The engine says which is which (``BackendError.outage`` / ``.maybe_sent``): nothing here knows
redis-py.

After a failure Redis is tried again at most every ``RETRY_INTERVAL`` seconds; calls in between go
straight to the policy without touching the network.

A local answer stands in for the engine's result, of the same type: :class:`LocalCharge` (a
``ChargeResult``) for a journaled charge, :class:`Refusal` (an ``AdmitResult``) for a refusal by the
policy. The drivers (``_driver.py``) call :meth:`Guard.before`, :meth:`Guard.after` and
:meth:`Guard.failed` around each engine call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from distbudget._core import ops
from distbudget._core.errors import BackendError, BudgetExceededError, InvalidInputError
from distbudget._core.money import check_tokens, nano_to_usd, usd_to_nano
from distbudget._core.plan import US
from distbudget._policy.journal import (
    DEFAULT_JOURNAL_SIZE,
    Allowance,
    EngineState,
    Entry,
    LocalHold,
    ledger_op_id,
    replay,
    state_for,
)

R = TypeVar("R")

MODES = ("raise", "deny", "allow")
CONNECT_TIMEOUT = 1.0  # URL clients of "deny"/"allow" budgets: seconds to connect
LIMIT_TYPE = "backend_unavailable"


class Try:
    """:meth:`Guard.before`'s answer: go ahead, call the engine."""


TRY = Try()


class Kept(Exception):
    """A registry refresh or an alert-stream announcement met an outage: the budget keeps what it
    has (its cached config; the announcement is tried again), and its operation meets the policy."""


@dataclass(slots=True)
class LocalCharge(ops.ChargeResult):
    """The result standing in for a charge that is waiting in the journal."""

    timestamp: float = 0.0


@dataclass(slots=True)
class Refusal(ops.AdmitResult):
    """The result standing in for a refusal by the failure policy (see ``finish_admit``)."""

    message: str = ""
    used: float = 0.0
    limit: float = 0.0
    retry_after: float | None = None

    def error(self, scope: str) -> BudgetExceededError:
        return BudgetExceededError(self.message, scope, LIMIT_TYPE, self.used, self.limit, retry_after=self.retry_after)


def _local_charge(timestamp: float) -> LocalCharge:
    return LocalCharge(0, (), (), None, False, timestamp=timestamp)


def _refusal(message: str, used: float, limit: float, retry_after: float) -> Refusal:
    return Refusal(0, (), (), 0, -1, message=message, used=used, limit=limit, retry_after=retry_after)


class BatchAnswers(list[ops.ChargeResult]):
    """A ``record_many`` batch's answers under ``"raise"`` when some of its charges were journaled:
    the budget finishes every charge (records, alerts), then raises ``error``."""

    def __init__(self, answers: list[ops.ChargeResult], error: BackendError) -> None:
        super().__init__(answers)
        self.error = error


# ---- options --------------------------------------------------------------------------------------


def check_options(
    mode: object, max_cost_usd: object, max_tokens: object, journal_size: object
) -> tuple[str, int | None, int | None, int]:
    if mode not in MODES:
        raise InvalidInputError(f"on_backend_error must be one of 'raise', 'deny', 'allow', got {mode!r}")
    if mode != "allow" and (max_cost_usd is not None or max_tokens is not None):
        raise InvalidInputError("fail_open_max_cost_usd / fail_open_max_tokens need on_backend_error='allow'")
    nano = None if max_cost_usd is None else usd_to_nano(max_cost_usd, "fail_open_max_cost_usd")
    tokens = None if max_tokens is None else check_tokens(max_tokens, "fail_open_max_tokens")
    if isinstance(journal_size, bool) or not isinstance(journal_size, int) or journal_size < 1:
        raise InvalidInputError(f"journal_size must be a positive int, got {journal_size!r}")
    return str(mode), nano, tokens, journal_size


def connect_options(mode: str) -> dict[str, Any]:
    """The keyword arguments of ``connect()`` for the URL client of a budget or manager whose
    failure policy is ``mode``. Under ``"deny"`` / ``"allow"``: a short connect timeout, and
    ``lazy`` (a Cluster none of whose nodes answers is connected at the first call, under the policy,
    rather than failing the construction: a worker can start during an outage)."""
    return {"socket_connect_timeout": CONNECT_TIMEOUT, "lazy": True} if mode != "raise" else {}


# ---- the per-budget policy --------------------------------------------------------------------------


class Guard:
    """One budget's failure policy, around each engine call of its driver."""

    def __init__(
        self,
        scope: str,
        engine: object,
        mode: object = "raise",
        max_cost_usd: object = None,
        max_tokens: object = None,
        journal_size: object = DEFAULT_JOURNAL_SIZE,
    ) -> None:
        self.mode, self.max_nano, self.max_tokens, self.journal_size = check_options(
            mode, max_cost_usd, max_tokens, journal_size
        )
        self.scope = scope
        self.state: EngineState = state_for(engine, self.journal_size)
        self.allowance = Allowance()

    @property
    def lenient(self) -> bool:
        return self.mode != "raise"

    # -- around one engine call --

    def before(self, op: ops.Operation[R]) -> R | Try:
        """Only when ``state.busy``: a local answer, or :data:`TRY` (call the engine)."""
        st = self.state
        st.sweep()
        if isinstance(op, ops.Release):
            with st.lock:
                hold = st.local_holds.pop(op.hold_id, None)
                if hold is not None:
                    hold.allowance.free(hold)
                    st._update()
                    return cast("R", True)
                if op.hold_id in st.settled:
                    return cast("R", False)
        if st.claim():
            return TRY
        return self.policy(op, st.unavailable(), False)

    def after(self, op: ops.Operation[Any]) -> None:
        """Only when ``state.busy``: the engine answered."""
        st = self.state
        st.ok()
        if isinstance(op, ops.Commit) and st.local_holds:
            with st.lock:
                hold = st.local_holds.pop(op.hold_id, None)
                if hold is not None:
                    hold.allowance.free(hold)
                    st._update()

    def failed(self, op: ops.Operation[R], err: BackendError) -> R:
        """The engine raised: a local answer, or raise."""
        if isinstance(err, ops.BatchError):
            assert isinstance(op, ops.RecordMany)
            return cast("R", self._batch_failed(op, err))
        if not err.outage:
            raise err
        self.state.fail(err)
        return self.policy(op, err, err.maybe_sent)

    def policy(self, op: ops.Operation[R], err: BackendError, maybe_sent: bool) -> R:
        """The local answer to ``op`` while Redis is unavailable (or raise)."""
        if isinstance(op, (ops.Record, ops.Commit)):
            return cast("R", self._journal(op, err, maybe_sent))
        if isinstance(op, ops.RecordMany):  # the pipeline failed as a whole (maybe_sent: any charge may have run)
            n = len(op.records)
            return cast("R", self._journal_batch(op, [], [(i, maybe_sent) for i in range(n)], err))
        if isinstance(op, (ops.Check, ops.Reserve)):
            return cast("R", self._admit(op, err))
        if self.lenient and isinstance(op, ops.Release):
            return cast("R", False)  # the hold expires in Redis by itself
        if isinstance(op, (ops.RegistryChain, ops.PricesRead, ops.Announce)):
            raise Kept from err  # keep the cached config; the operation itself then meets the policy
        raise err

    def recovery(self) -> ops.Steps[tuple[int, BackendError | None]] | None:
        """Before an operation (only when ``state.busy``): the replay due now, if any."""
        st = self.state
        if not st.journal or st.replaying or not st.claim():
            return None
        return replay(st)

    # -- the policy --

    def _journal(self, op: ops.Charge, err: BackendError, maybe_sent: bool) -> LocalCharge:
        now = time.time()
        pending = self._keep(Entry(op, maybe_sent, now, self.scope, ledger_op_id(op)))
        self._answer(pending, err)
        return _local_charge(now if op.now_us is None else op.now_us / US)

    def _batch_failed(self, op: ops.RecordMany, err: ops.BatchError) -> list[ops.ChargeResult]:
        """Some charges of a ``record_many`` pipeline failed: those Redis answered stand; those that
        met an outage are journaled (never sent, or maybe sent when the round trip failed); an error
        Redis answered otherwise (a script error, ``NOPERM``) raises."""
        results = err.results
        lost: list[tuple[int, bool]] = []  # (call, may have run) of the calls that met an outage
        refused: list[int] = []
        for i, r in enumerate(results):
            if isinstance(r, BackendError):
                if r.outage:
                    lost.append((i, r.maybe_sent))
                else:
                    refused.append(i)
        if lost:
            self.state.fail(cast(BackendError, results[lost[0][0]]))
        if not refused:
            return self._journal_batch(op, list(results), lost, cast(BackendError, results[lost[0][0]]))
        first = cast(BackendError, results[refused[0]])
        note = ""
        if lost:
            self._keep_many(op, lost, len(refused))  # raises when the journal is full
            self.state.log_journaled()
            note = f", {len(lost)} journaled (will be replayed when Redis answers)"
        charged = len(results) - len(lost) - len(refused)
        exc = BackendError(
            f"Redis refused {len(refused)} of the {len(results)} charges of a record_many batch of scope "
            f"{self.scope!r} ({_calls(refused)}; NOT recorded): {first}; {charged} were recorded{note}"
        )
        raise exc from (first.__cause__ or first)

    def _journal_batch(
        self, op: ops.RecordMany, results: list[Any], lost: list[tuple[int, bool]], err: BackendError
    ) -> list[ops.ChargeResult]:
        """Journal the charges ``lost`` of a batch, all or none (``results`` holds the others'); the
        caller's answers: local ones in their place, under "raise" with the error to raise."""
        batch = op.records
        answers: list[Any] = list(results) or [None] * len(batch)
        pending = self._keep_many(op, lost, 0)
        now = time.time()
        for i, _maybe_sent in lost:
            now_us = batch[i].now_us
            answers[i] = _local_charge(now if now_us is None else now_us / US)
        self.state.log_journaled()
        if self.mode != "raise":
            return answers
        charged = len(batch) - len(lost)
        done = f"{charged} of the batch's {len(batch)} charges were recorded; the other " if charged else "the batch's "
        exc = BackendError(
            f"{err} ({done}{len(lost)} charges were journaled, will be replayed when Redis answers; {pending} pending)"
        )
        exc.journaled = True
        exc.__cause__ = err.__cause__ or err
        return BatchAnswers(answers, exc)

    def _keep_many(self, op: ops.RecordMany, lost: list[tuple[int, bool]], refused: int) -> int:
        """Journal the charges ``lost`` (call index, may have run) of a batch: all of them, or none
        when they do not fit (raises); returns how many are pending."""
        st = self.state
        now = time.time()
        batch = op.records
        entries = [Entry(batch[i], maybe, now, self.scope, ledger_op_id(batch[i])) for i, maybe in lost]
        with st.lock:
            if len(st.journal) + len(entries) > st.capacity:
                raise st.full(_not_journaled(self.scope, len(batch), lost, refused))
            for entry in entries:
                st.append(entry)
            self.allowance.roll(st.epoch)
            for entry in entries:
                self.allowance.tokens += entry.op.amounts[0]
                self.allowance.nano += entry.op.amounts[1]
            pending = len(st.journal)
            st._update()
        return pending

    def _answer(self, pending: int, err: BackendError) -> None:
        """Under "raise", journaled charges raise a BackendError saying so."""
        self.state.log_journaled()
        if self.mode == "raise":
            exc = BackendError(
                f"{err} (this charge was journaled, will be replayed when Redis answers; {pending} pending)"
            )
            exc.journaled = True
            raise exc from (err.__cause__ or err)

    def _keep(self, entry: Entry) -> int:
        """Append a charge to the journal (raises when it is full); returns how many are pending."""
        st = self.state
        op = entry.op
        with st.lock:
            st.append(entry)
            if isinstance(op, ops.Commit):
                hold = st.local_holds.pop(op.hold_id, None)
                if hold is not None:
                    hold.allowance.free(hold)
                else:
                    st.settled.add(op.hold_id)
            self.allowance.roll(st.epoch)
            self.allowance.tokens += op.amounts[0]
            self.allowance.nano += op.amounts[1]
            pending = len(st.journal)
            st._update()
        return pending

    def _admit(self, op: ops.Check | ops.Reserve, err: BackendError) -> ops.AdmitResult:
        if self.mode == "raise":
            raise err
        st = self.state
        usage = op.amounts
        retry = max(st.retry_at - time.monotonic(), 0.0) + 0.01
        if self.mode == "deny":
            return _refusal(f"Budget refused (on_backend_error='deny', Redis unavailable): {err}", 0, 0, retry)
        mine = self.allowance
        with st.lock:
            mine.roll(st.epoch)
            if self.max_tokens is not None and mine.tokens + usage[0] > self.max_tokens:
                used, limit, unit = float(mine.tokens + usage[0]), float(self.max_tokens), "tokens"
            elif self.max_nano is not None and mine.nano + usage[1] > self.max_nano:
                used, limit = nano_to_usd(mine.nano + usage[1]), nano_to_usd(self.max_nano)
                unit = "USD"
            else:
                if isinstance(op, ops.Reserve):
                    expires = time.monotonic() + op.ttl_us / US
                    st.local_holds[op.hold_id] = LocalHold(mine, usage[0], usage[1], expires, mine.epoch)
                    mine.tokens += usage[0]
                    mine.nano += usage[1]
                    st._update()
                return ops.AdmitResult(0 if op.now_us is None else op.now_us, (), (), -1, -1)
        msg = f"Budget refused (on_backend_error='allow', fail-open allowance spent: {used} > {limit} {unit}): {err}"
        return _refusal(msg, used, limit, retry)

    def status(self) -> dict[str, Any]:
        """What ``summary()["backend"]`` and ``backend_status`` show (no I/O)."""
        st = self.state
        with st.lock:
            down = st.down_since
            out: dict[str, Any] = {
                "mode": self.mode,
                "degraded": down is not None,
                "degraded_for_s": None if down is None else round(time.monotonic() - down, 3),
                "journaled": len(st.journal),
                "journal_size": st.capacity,
                "local_holds": len(st.local_holds),
                "rejected": len(st.rejected),
                **st.stats,
                "last_error": None if st.last_error is None else str(st.last_error),
            }
            if self.mode == "allow":  # this budget's use of its fail-open allowance in the current outage
                self.allowance.roll(st.epoch)
                used = (self.allowance.tokens, self.allowance.nano) if down is not None else (0, 0)
                out["fail_open_used"] = {"tokens": used[0], "cost_usd": nano_to_usd(used[1])}
        return out


def _calls(indexes: list[int]) -> str:
    """Calls of a batch by position (0-based), for messages."""
    shown = ", ".join(str(i) for i in indexes[:10])
    more = f" and {len(indexes) - 10} more" if len(indexes) > 10 else ""
    return f"call{'s' if len(indexes) > 1 else ''} {shown}{more}"


def _not_journaled(scope: str, size: int, lost: list[tuple[int, bool]], refused: int) -> str:
    """What became of a batch whose lost charges do not fit in the journal (none was journaled)."""
    charged = size - len(lost) - refused
    maybe = sum(maybe_sent for _i, maybe_sent in lost)
    batch = f"this record_many batch's {size} charges of scope {scope!r}"
    if charged or refused:
        head = f"{charged} of {batch} were recorded in Redis" + (f" and {refused} refused by it" if refused else "")
        head += f"; the other {len(lost)} ({_calls([i for i, _ in lost])}) were not journaled"
        retry = "retry only those"
    else:
        head = f"none of {batch} was journaled"
        retry = "retry the batch"
    if not maybe:
        return f"{head}: they were NOT recorded anywhere; {retry} when Redis answers"
    return (
        f"{head}, and Redis may or may not have recorded {maybe} of them (the reply was lost); {retry} when "
        "Redis answers, with request_ids (a retry without one may count a charge twice)"
    )
