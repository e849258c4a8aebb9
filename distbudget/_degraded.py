"""What a budget does when Redis does not answer: the failure policy and the local journal.

``on_backend_error`` (per budget):

* ``"raise"`` (default): the call raises :class:`BackendError` naming the backend problem.
* ``"deny"``: fail closed. ``check`` / ``reserve`` / ``acquire`` refuse as if the budget were spent
  (``BudgetExceededError`` with ``limit_type="backend_unavailable"``; ``False`` when
  ``hard_stop=False``).
* ``"allow"``: fail open. ``check`` / ``reserve`` are admitted locally, within an optional allowance
  (``fail_open_max_cost_usd``, ``fail_open_max_tokens``) per budget object, per outage; beyond it they
  refuse as under ``"deny"``. A reservation made while Redis is down is a local hold.

In every mode a charge (``record``, or ``commit``) whose Redis call failed because Redis was
unavailable goes to a bounded journal, one per engine (so a manager's budgets share it), and is replayed
oldest first when Redis answers again: before the next operation of any budget on that engine, or by
``flush_journal()``. Under ``"raise"`` the call still raises (the error says the charge was journaled);
under ``"deny"`` / ``"allow"`` it returns the record with ``journaled=True``. A full journal raises
``BackendError``: a charge is never dropped silently.

Replay is idempotent. A charge with a request id is protected by its request key (the scripts
answer "duplicate"). Without one, each charge's ledger entry carries a unique op id: a charge whose
failure was ambiguous (the command may have run: the connection broke or timed out after sending) is
looked up in its tree's ledger first, and replayed only if absent. Only this process replays its op
ids, so the look-up cannot race another replay. A charge that surely never reached Redis (connection
refused, ``LOADING``, ``READONLY`` ...) is replayed directly. The bound: an ambiguous charge with
neither a request id nor a ledger (``ledger_maxlen=0``) cannot be resolved and is replayed (it may count
twice); so may one whose ledger entry was trimmed away meanwhile or that landed more than
``LOOKUP_MARGIN_S`` before this worker's clock says it was sent.

Errors Redis *answered* (a script error, ``NOPERM``, ``WRONGTYPE``, a bad password) are not outages:
they raise ``BackendError`` in every mode and are not journaled (replaying would fail the same way).

After a failure Redis is tried again at most every ``RETRY_INTERVAL`` seconds; calls in between go
straight to the policy without touching the network.

The logic is sans-I/O like the budgets' flows: the shells (``budget.py``) call :class:`Guard` around
each engine call, and run :func:`replay_flow` with :func:`run_sync` / :func:`run_async`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions as rx

from distbudget._core import plan as P
from distbudget._core.money import check_tokens, nano_to_usd, usd_to_nano
from distbudget._exceptions import BackendError, BatchError, BudgetExceededError, InvalidInputError, ServerConfigError

if TYPE_CHECKING:
    from distbudget._budget_base import BudgetCore

log = logging.getLogger("distbudget")

MODES = ("raise", "deny", "allow")
DEFAULT_JOURNAL_SIZE = 10_000
RETRY_INTERVAL = 0.5  # seconds between attempts to reach Redis while it is down
CONNECT_TIMEOUT = 1.0  # URL clients of "deny"/"allow" budgets: seconds to connect
LOOKUP_MARGIN_S = 300  # an ambiguous charge is looked up from this long before its failure (clock skew)
LOOKUP_PAGE = 1000
JOURNAL_LOG_EVERY = 5.0  # at most one "charges journaled" warning per this many seconds
LIMIT_TYPE = "backend_unavailable"

Call = tuple[str, tuple[Any, ...]]
CHARGES = frozenset({"record", "commit"})
# Redis answered, but with a refusal that means the command did not run and may run later.
_TRANSIENT_CODES = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "OOM", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
_TRANSIENT_TYPES = (rx.BusyLoadingError, rx.ReadOnlyError, rx.ClusterDownError, rx.TryAgainError, rx.OutOfMemoryError)


class BatchAnswers(list[Any]):
    """A ``record_many`` batch's answers under ``"raise"`` when some of its charges were journaled:
    the flow finishes every charge (records, alerts), then raises ``error``."""

    def __init__(self, answers: list[Any], error: BackendError) -> None:
        super().__init__(answers)
        self.error = error


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


TRY = _Marker("TRY")  # Guard.before: go ahead, call the engine
KEEP = _Marker("KEEP")  # the registry refresh / alert-stream announcement failed: keep what we have


@dataclass(frozen=True, slots=True)
class LocalCharge:
    """The engine answer standing in for a charge that is waiting in the journal."""

    timestamp: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """The engine answer standing in for a refusal by the failure policy (see ``finish_admit``)."""

    message: str
    used: float
    limit: float
    retry_after: float | None

    def error(self, scope: str) -> BudgetExceededError:
        return BudgetExceededError(self.message, scope, LIMIT_TYPE, self.used, self.limit, retry_after=self.retry_after)


def classify(err: BackendError) -> tuple[bool, bool]:
    """(is Redis unavailable rather than answering an error, may the command have run)."""
    cause = err.__cause__
    return _classify_cluster(cause) if isinstance(cause, rx.RedisClusterException) else _classify(cause)


def _classify_cluster(cause: rx.RedisClusterException) -> tuple[bool, bool]:
    """A Cluster client's own errors (not RedisErrors)."""
    context = cause.__context__
    if isinstance(context, (rx.ConnectionError, rx.TimeoutError)):
        # redis-py refreshes the slot map when a command's connection fails, and raises this in
        # place of that failure if no node answers: the command's failure says whether it was sent
        return _classify(context)
    text = str(cause)
    if isinstance(cause, rx.SlotNotCoveredError) or "cannot be connected" in text or "could not agree" in text:
        # no node answered (or none knows the slot): nothing was sent. Unless what the nodes
        # answered is a configuration error (a bad password, a TLS failure).
        inner = cause.__cause__
        return (False, False) if isinstance(inner, rx.RedisError) and not _classify(inner)[0] else (True, False)
    return False, False


def _classify(cause: BaseException | None) -> tuple[bool, bool]:
    if isinstance(cause, _TRANSIENT_TYPES):
        return True, False
    if isinstance(cause, (rx.AuthenticationError, rx.AuthorizationError)):
        return False, False
    if isinstance(cause, (rx.ConnectionError, rx.TimeoutError)):
        text = str(cause)
        if "certificate" in text.lower():  # TLS verification failed: a configuration error, not an outage
            return False, False
        # "Error 111 connecting to host:port", "Timeout connecting to server", pool exhausted: never sent
        never_sent = "connecting to" in text or isinstance(cause, rx.MaxConnectionsError)
        return True, not never_sent
    if isinstance(cause, rx.ResponseError):
        return str(cause).split(" ", 1)[0].upper() in _TRANSIENT_CODES, False
    return False, False


# ---- the journal ----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Entry:
    """One journaled charge: the engine call exactly as first sent (same op id, request key)."""

    name: str  # "record" or "commit"
    args: tuple[Any, ...]
    maybe_sent: bool  # the command may have reached Redis (and run)
    wall: float  # time.time() when it failed
    scope: str
    op: str | None  # the op id inside its ledger entry JSON

    @property
    def request_key(self) -> str | None:
        return self.args[3] if self.name == "record" else self.args[4]  # type: ignore[no-any-return]

    @property
    def has_ledger(self) -> bool:
        return bool(self.args[-1][0])

    @property
    def ledger_key(self) -> str:
        return self.args[0].keyspace.ledger  # type: ignore[no-any-return]

    @property
    def verifiable(self) -> bool:
        """Can a replay know whether this charge already landed?"""
        return not self.maybe_sent or self.request_key is not None or (self.has_ledger and self.op is not None)


def _op_of(args: tuple[Any, ...]) -> str | None:
    maxlen, entry = args[-1]
    if not maxlen or not entry:
        return None
    op = json.loads(entry).get("op")
    return op if isinstance(op, str) else None


@dataclass(slots=True)
class LocalHold:
    """A reservation admitted locally while Redis was down (``"allow"``)."""

    guard: Guard
    tokens: int
    nano: int
    expires: float  # monotonic
    epoch: int


class EngineState:
    """Shared by every budget on one engine: degraded or not, the journal, local holds, counters."""

    def __init__(self, capacity: int = DEFAULT_JOURNAL_SIZE) -> None:
        self.lock = threading.Lock()
        self.capacity = capacity
        self.journal: deque[Entry] = deque()
        self.local_holds: dict[str, LocalHold] = {}
        self.settled: set[str] = set()  # holds whose commit is journaled: their release stays local
        self.down_since: float | None = None  # monotonic; None while Redis answers
        self.retry_at = 0.0
        self.last_error: BackendError | None = None
        self.epoch = 0  # outages so far (fail-open allowances are per outage)
        self.replaying = False
        self.busy = False  # anything above that calls must look at (the fast path checks only this)
        self.rejected: list[Entry] = []  # charges Redis refused on replay (logged as errors)
        # errors: calls that found Redis unavailable; journaled_total / ambiguous: charges journaled (those
        # that may have run); replayed / already_applied: settled by replay (sent again / found in Redis);
        # unverified: ambiguous, without request id or ledger, sent again anyway (may count twice)
        self.stats = dict.fromkeys(("errors", "journaled_total", "ambiguous", "replayed", "already_applied"), 0)
        self.stats["unverified"] = 0
        self._unlogged = 0
        self._next_log = 0.0
        self._next_sweep = 0.0

    def _update(self) -> None:
        self.busy = bool(self.down_since is not None or self.journal or self.local_holds or self.settled)

    def fail(self, err: BackendError) -> None:
        """Redis was unavailable for a call: enter (or stay in) degraded mode."""
        now = time.monotonic()
        with self.lock:
            self.stats["errors"] += 1
            self.last_error = err
            self.retry_at = now + RETRY_INTERVAL
            entering = self.down_since is None
            if entering:
                self.down_since = now
                self.epoch += 1
                self._update()
        if entering:
            log.warning(
                "distbudget: Redis is unavailable (%s): degraded mode, failure policies apply; charges are "
                "journaled locally and replayed when it answers (next attempt in %.1f s)",
                err,
                RETRY_INTERVAL,
            )

    def ok(self) -> None:
        """Redis answered: leave degraded mode."""
        if self.down_since is None:
            return
        with self.lock:
            since, self.down_since = self.down_since, None
            self._update()
            pending = len(self.journal)
        if since is not None:
            log.warning(
                "distbudget: Redis answers again after %.2f s of degraded mode; %d journaled charge(s) to replay",
                time.monotonic() - since,
                pending,
            )

    def claim(self) -> bool:
        """May this call try Redis now? While degraded, one call per ``RETRY_INTERVAL`` may."""
        if self.down_since is None:
            return True
        now = time.monotonic()
        with self.lock:
            if self.down_since is None:
                return True
            if now < self.retry_at:
                return False
            self.retry_at = now + RETRY_INTERVAL
            return True

    def unavailable(self) -> BackendError:
        """The error of a call not even sent (Redis is down and not due for another attempt)."""
        now = time.monotonic()
        down = 0.0 if self.down_since is None else now - self.down_since
        err = BackendError(
            f"Redis is unavailable (degraded for {down:.1f} s; last error: {self.last_error}); "
            f"next attempt in {max(self.retry_at - now, 0.0):.2f} s"
        )
        if self.last_error is not None:
            err.__cause__ = self.last_error.__cause__
        return err

    def full(self, what: str) -> BackendError:
        """The error of charges that do not fit in the journal; ``what`` says what became of them."""
        return BackendError(
            f"Redis is unavailable and the local journal is full ({len(self.journal)} charges waiting "
            f"for replay, journal_size={self.capacity}): {what}"
        )

    def append(self, entry: Entry) -> None:
        """Journal a charge (caller holds the lock); a full journal raises, dropping nothing."""
        if len(self.journal) >= self.capacity:
            if entry.maybe_sent:  # its reply was lost: it may have run
                raise self.full(
                    f"this charge of scope {entry.scope!r} was not journaled, and Redis may or may not have "
                    "recorded it (the reply was lost); retry it when Redis answers only with a request_id "
                    "(a retry without one may count it twice)"
                )
            raise self.full(
                f"this charge of scope {entry.scope!r} was NOT recorded anywhere; retry it when Redis answers"
            )
        self.journal.append(entry)
        self.stats["journaled_total"] += 1
        self.stats["ambiguous"] += entry.maybe_sent
        self._unlogged += 1
        self._update()

    def log_journaled(self) -> None:
        now = time.monotonic()
        if now < self._next_log:
            return
        with self.lock:
            count, self._unlogged = self._unlogged, 0
            self._next_log = now + JOURNAL_LOG_EVERY
            pending = len(self.journal)
        if count:
            log.warning(
                "distbudget: Redis is unavailable: %d charge(s) journaled locally (%d pending), "
                "will be replayed when it answers",
                count,
                pending,
            )

    def sweep(self) -> None:
        """Forget local holds whose lease ran out (at most once a second)."""
        now = time.monotonic()
        if not self.local_holds or now < self._next_sweep:
            return
        with self.lock:
            self._next_sweep = now + 1.0
            for hold_id in [h for h, hold in self.local_holds.items() if hold.expires <= now]:
                hold = self.local_holds.pop(hold_id)
                hold.guard.free(hold)
            self._update()


_states: weakref.WeakKeyDictionary[Any, EngineState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def state_for(engine: Any, capacity: int = DEFAULT_JOURNAL_SIZE) -> EngineState:
    """The state shared by every budget on ``engine`` (its journal holds at least ``capacity``)."""
    with _states_lock:
        try:
            state = _states.get(engine)
            if state is None:
                state = _states[engine] = EngineState(capacity)
        except TypeError:  # an engine that cannot be weakly referenced: not shared
            return EngineState(capacity)
        state.capacity = max(state.capacity, capacity)
        return state


def _report_unreplayed() -> None:
    """At exit, charges still journaled are lost with this process (the journal is in memory):
    log each one so that an operator can reconcile by hand."""
    for st in list(_states.values()):
        if not st.journal:
            continue
        log.error("distbudget: exiting with %d journaled charge(s) never replayed (Redis unavailable)", len(st.journal))
        for e in st.journal:
            tokens, nano, _requests = e.args[2]
            log.error(
                "distbudget: unreplayed %s of scope %r: %d tokens, %d nano-USD, ledger entry %s",
                e.name,
                e.scope,
                tokens,
                nano,
                e.args[-1][1] or "(none)",
            )


atexit.register(_report_unreplayed)


# ---- options --------------------------------------------------------------------------------------


def _options(
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


def connect_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a budget's or manager's failure-policy options; the keyword arguments of
    ``connect()`` for its URL client. Under ``"deny"`` / ``"allow"``: a short connect timeout, and
    ``lazy`` (a Cluster none of whose nodes answers is connected at the first call, under the policy,
    rather than failing the construction: a worker can start during an outage)."""
    mode, *_ = _options(
        options.get("on_backend_error", "raise"),
        options.get("fail_open_max_cost_usd"),
        options.get("fail_open_max_tokens"),
        options.get("journal_size", DEFAULT_JOURNAL_SIZE),
    )
    return {"socket_connect_timeout": CONNECT_TIMEOUT, "lazy": True} if mode != "raise" else {}


# ---- the per-budget policy --------------------------------------------------------------------------


class Guard:
    """One budget's failure policy, around each engine call of its shell (``budget.py``)."""

    def __init__(
        self,
        budget: BudgetCore,
        mode: object = "raise",
        max_cost_usd: object = None,
        max_tokens: object = None,
        journal_size: object = DEFAULT_JOURNAL_SIZE,
    ) -> None:
        self.mode, self.max_nano, self.max_tokens, self.journal_size = _options(
            mode, max_cost_usd, max_tokens, journal_size
        )
        self.budget = budget
        self.state = EngineState(self.journal_size)  # until bind()
        self.epoch = 0
        self.used_tokens = 0  # fail-open usage in outage ``epoch``: local holds + journaled charges
        self.used_nano = 0

    def bind(self, engine: Any) -> None:
        self.state = state_for(engine, self.journal_size)

    @property
    def lenient(self) -> bool:
        return self.mode != "raise"

    # -- around one engine call --

    def before(self, name: str, args: tuple[Any, ...]) -> Any:
        """Only when ``state.busy``: a local answer, or :data:`TRY` (call the engine)."""
        st = self.state
        st.sweep()
        if name == "release":
            with st.lock:
                hold = st.local_holds.pop(args[1], None)
                if hold is not None:
                    hold.guard.free(hold)
                    st._update()
                    return True
                if args[1] in st.settled:
                    return False
        if st.claim():
            return TRY
        return self.policy(name, args, st.unavailable(), False)

    def after(self, name: str, args: tuple[Any, ...]) -> None:
        """Only when ``state.busy``: the engine answered."""
        st = self.state
        st.ok()
        if name == "commit" and st.local_holds:
            with st.lock:
                hold = st.local_holds.pop(args[3], None)
                if hold is not None:
                    hold.guard.free(hold)
                    st._update()

    def failed(self, name: str, args: tuple[Any, ...], err: BackendError) -> Any:
        """The engine raised: a local answer, or raise."""
        if isinstance(err, BatchError):
            return self._batch_failed(args[0], err)
        outage, maybe_sent = classify(err)
        if not outage:
            raise err
        self.state.fail(err)
        return self.policy(name, args, err, maybe_sent)

    def policy(self, name: str, args: tuple[Any, ...], err: BackendError, maybe_sent: bool) -> Any:
        if name in CHARGES:
            return self._journal(name, args, err, maybe_sent)
        if name == "record_many":  # the pipeline failed as a whole (maybe_sent: any charge may have run)
            batch = args[0]
            return self._journal_batch(batch, [None] * len(batch), [(i, maybe_sent) for i in range(len(batch))], err)
        if name in ("check", "reserve"):
            return self._admit(name, args, err)
        if self.lenient and name == "release":
            return False  # the hold expires in Redis by itself
        if name in ("registry", "announce"):
            return KEEP  # keep the cached config; the operation itself then meets the policy
        raise err

    def refresh_due(self) -> bool:
        """A manager's registry refresh: try it now? (Not while Redis is down between attempts: the
        cached config is kept.)"""
        return self.state.claim()

    def refresh_answered(self) -> None:
        self.state.ok()

    def refresh_failed(self, err: BackendError) -> None:
        """A manager's registry refresh failed: keep the cached config if Redis is unavailable."""
        if not classify(err)[0]:
            raise err
        self.state.fail(err)

    # -- the policy --

    def _roll(self) -> None:
        """(lock held) Allowances start afresh with each outage."""
        if self.epoch != self.state.epoch:
            self.epoch = self.state.epoch
            self.used_tokens = self.used_nano = 0

    def free(self, hold: LocalHold) -> None:
        """(lock held) A local hold ended: give its allowance back."""
        if hold.epoch == self.epoch:
            self.used_tokens = max(self.used_tokens - hold.tokens, 0)
            self.used_nano = max(self.used_nano - hold.nano, 0)

    def _journal(self, name: str, args: tuple[Any, ...], err: BackendError, maybe_sent: bool) -> Any:
        pending = self._keep(Entry(name, args, maybe_sent, time.time(), self.budget.name, _op_of(args)))
        return self._answer(pending, err, [LocalCharge(time.time() if args[1] is None else args[1] / P.US)])[0]

    def _batch_failed(self, batch: tuple[tuple[Any, ...], ...], err: BatchError) -> Any:
        """Some charges of a ``record_many`` pipeline failed: those Redis answered stand; those that
        met an outage are journaled (never sent, or maybe sent when the round trip failed); an error
        Redis answered otherwise (a script error, ``NOPERM``) raises."""
        answers = list(err.results)
        lost: list[tuple[int, bool]] = []  # (call, may have run) of the calls that met an outage
        refused: list[int] = []
        for i, r in enumerate(answers):
            if isinstance(r, BackendError):
                outage, maybe_sent = classify(r)
                if outage:
                    lost.append((i, maybe_sent))
                else:
                    refused.append(i)
        if lost:
            self.state.fail(answers[lost[0][0]])
        if not refused:
            return self._journal_batch(batch, answers, lost, answers[lost[0][0]])
        first = answers[refused[0]]
        note = ""
        if lost:
            self._keep_many(batch, lost, len(refused))  # raises when the journal is full
            self.state.log_journaled()
            note = f", {len(lost)} journaled (will be replayed when Redis answers)"
        charged = len(batch) - len(lost) - len(refused)
        exc = BackendError(
            f"Redis refused {len(refused)} of the {len(batch)} charges of a record_many batch of scope "
            f"{self.budget.name!r} ({_calls(refused)}; NOT recorded): {first}; {charged} were recorded{note}"
        )
        raise exc from (first.__cause__ or first)

    def _journal_batch(
        self, batch: tuple[tuple[Any, ...], ...], answers: list[Any], lost: list[tuple[int, bool]], err: BackendError
    ) -> list[Any]:
        """Journal the charges ``lost`` of a batch, all or none (``answers`` holds the others'); the
        caller's answers: local ones in their place, under "raise" with the error to raise."""
        pending = self._keep_many(batch, lost, 0)
        now = time.time()
        for i, _maybe_sent in lost:
            answers[i] = LocalCharge(now if batch[i][1] is None else batch[i][1] / P.US)
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

    def _keep_many(self, batch: tuple[tuple[Any, ...], ...], lost: list[tuple[int, bool]], refused: int) -> int:
        """Journal the charges ``lost`` (call index, may have run) of a batch: all of them, or none
        when they do not fit (raises); returns how many are pending."""
        st = self.state
        now = time.time()
        entries = [Entry("record", batch[i], maybe, now, self.budget.name, _op_of(batch[i])) for i, maybe in lost]
        with st.lock:
            if len(st.journal) + len(entries) > st.capacity:
                raise st.full(_not_journaled(self.budget.name, len(batch), lost, refused))
            for entry in entries:
                st.append(entry)
            self._roll()
            for entry in entries:
                self.used_tokens += entry.args[2][0]
                self.used_nano += entry.args[2][1]
            pending = len(st.journal)
            st._update()
        return pending

    def _answer(self, pending: int, err: BackendError, answers: list[Any]) -> list[Any]:
        """What the caller of journaled charges gets: under "raise" a BackendError saying so; else
        the local answers."""
        self.state.log_journaled()
        if self.mode == "raise":
            exc = BackendError(
                f"{err} (this charge was journaled, will be replayed when Redis answers; {pending} pending)"
            )
            exc.journaled = True
            raise exc from (err.__cause__ or err)
        return answers

    def _keep(self, entry: Entry) -> int:
        """Append a charge to the journal (raises when it is full); returns how many are pending."""
        st = self.state
        name, args = entry.name, entry.args
        usage = args[2]
        with st.lock:
            st.append(entry)
            if name == "commit":
                hold = st.local_holds.pop(args[3], None)
                if hold is not None:
                    hold.guard.free(hold)
                else:
                    st.settled.add(args[3])
            self._roll()
            self.used_tokens += usage[0]
            self.used_nano += usage[1]
            pending = len(st.journal)
            st._update()
        return pending

    def _admit(self, name: str, args: tuple[Any, ...], err: BackendError) -> Any:
        if self.mode == "raise":
            raise err
        st = self.state
        usage = args[2]
        retry = max(st.retry_at - time.monotonic(), 0.0) + 0.01
        if self.mode == "deny":
            return Refusal(f"Budget refused (on_backend_error='deny', Redis unavailable): {err}", 0, 0, retry)
        with st.lock:
            self._roll()
            if self.max_tokens is not None and self.used_tokens + usage[0] > self.max_tokens:
                used, limit, unit = float(self.used_tokens + usage[0]), float(self.max_tokens), "tokens"
            elif self.max_nano is not None and self.used_nano + usage[1] > self.max_nano:
                used, limit = nano_to_usd(self.used_nano + usage[1]), nano_to_usd(self.max_nano)
                unit = "USD"
            else:
                if name == "reserve":
                    _plan, _now, _usage, hold_id, ttl_us = args
                    expires = time.monotonic() + ttl_us / P.US
                    st.local_holds[hold_id] = LocalHold(self, usage[0], usage[1], expires, self.epoch)
                    self.used_tokens += usage[0]
                    self.used_nano += usage[1]
                    st._update()
                return P.AdmitResult(0 if args[1] is None else args[1], (), (), -1, -1)
        msg = f"Budget refused (on_backend_error='allow', fail-open allowance spent: {used} > {limit} {unit}): {err}"
        return Refusal(msg, used, limit, retry)

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
                self._roll()
                used = (self.used_tokens, self.used_nano) if down is not None else (0, 0)
                out["fail_open_used"] = {"tokens": used[0], "cost_usd": nano_to_usd(used[1])}
        return out

    def recovery_flow(self) -> Generator[Call, Any, tuple[int, BackendError | None]] | None:
        """Before an operation (only when ``state.busy``): the replay due now, if any."""
        st = self.state
        if not st.journal or st.replaying or not st.claim():
            return None
        return replay_flow(st)


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


# ---- replay -----------------------------------------------------------------------------------------


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _lookup(entries: list[Entry]) -> Generator[Call, Any, set[str]]:
    """The op ids of ``entries`` (ambiguous, no request id) that are in their tree's ledger."""
    wanted: dict[str, dict[str, float]] = {}
    for e in entries:
        if e.maybe_sent and e.request_key is None and e.has_ledger and e.op is not None:
            wanted.setdefault(e.ledger_key, {})[e.op] = e.wall
    found: set[str] = set()
    for key, ops in wanted.items():
        start = str(max(0, int((min(ops.values()) - LOOKUP_MARGIN_S) * 1000)))
        remaining = set(ops)
        while remaining:
            page = yield "ledger_read", (key, start, LOOKUP_PAGE)
            for _id, fields in page:
                raw = fields.get("d", fields.get(b"d"))
                if raw is None:
                    continue
                op = json.loads(_text(raw)).get("op")
                if op in remaining:
                    remaining.discard(op)
                    found.add(op)
            if len(page) < LOOKUP_PAGE:
                break
            start = "(" + _text(page[-1][0])
    return found


def replay_flow(st: EngineState, force: bool = False) -> Generator[Call, Any, tuple[int, BackendError | None]]:
    """Replay the journal, oldest first: (charges settled, the error that stopped it or None).

    One replay at a time per engine (``force``: wait for a running one, then replay regardless of
    the retry interval). Entries journaled meanwhile wait for the next replay."""
    while True:
        with st.lock:
            if not st.replaying:
                if not st.journal:
                    return 0, None
                st.replaying = True
                batch = list(st.journal)
                break
        if not force:
            return 0, None
        yield "sleep", (0.01,)
    started = time.monotonic()
    settled = replayed = already = 0
    stop: BackendError | None = None
    try:
        try:
            found = yield from _lookup(batch)
        except BackendError as err:
            if classify(err)[0]:
                st.fail(err)
                return 0, err
            raise
        for e in batch:
            if e.op is not None and e.op in found:
                already += 1
            else:
                was, verifiable = e.maybe_sent, e.verifiable
                e.maybe_sent = True  # from here on this attempt may have run (cancellation included)
                try:
                    answer = yield e.name, e.args
                except BackendError as err:
                    outage, maybe_sent = classify(err)
                    e.maybe_sent = was or maybe_sent
                    if outage or isinstance(err, ServerConfigError):  # the server, not this charge: keep all
                        if outage:
                            st.fail(err)
                        stop = err
                        break
                    log.error(
                        "distbudget: Redis refused a journaled charge of scope %r on replay (%s); it is kept "
                        "in the engine state's `rejected` list and NOT counted: %s %s",
                        e.scope,
                        err,
                        e.name,
                        e.args[-1][1] or e.args[2],
                    )
                    with st.lock:
                        st.rejected.append(e)
                        st.journal.popleft()
                        st._update()
                    continue
                if not verifiable:  # ambiguous, without request id or ledger: it may now count twice
                    with st.lock:
                        st.stats["unverified"] += 1
                if getattr(answer, "original", None) is not None:
                    already += 1
                else:
                    replayed += 1
            st.ok()
            with st.lock:
                st.journal.popleft()
                if e.name == "commit":
                    st.settled.discard(e.args[3])
                st._update()
            settled += 1
    finally:
        with st.lock:
            st.replaying = False
            st.stats["replayed"] += replayed
            st.stats["already_applied"] += already
            if not st.journal:
                st.settled.clear()
            st._update()
            pending = len(st.journal)
        if settled or stop is not None:
            log.warning(
                "distbudget: replayed the local journal: %d charge(s) applied, %d already in Redis, "
                "%d pending, in %.3f s%s",
                replayed,
                already,
                pending,
                time.monotonic() - started,
                "" if stop is None else f" (stopped: {stop})",
            )
    return settled, stop


# ---- drivers ----------------------------------------------------------------------------------------


def run_sync(engine: Any, flow: Generator[Call, Any, Any]) -> Any:
    """Drive a flow on a sync engine; a ``BackendError`` is thrown back into the flow."""
    try:
        name, args = next(flow)
        while True:
            if name == "sleep":
                time.sleep(*args)
                name, args = flow.send(None)
                continue
            try:
                answer = engine.apply(name, args)
            except BackendError as err:
                name, args = flow.throw(err)
            else:
                name, args = flow.send(answer)
    except StopIteration as stop:
        return stop.value
    finally:
        flow.close()


async def run_async(engine: Any, flow: Generator[Call, Any, Any]) -> Any:
    """The same on an async engine."""
    try:
        name, args = next(flow)
        while True:
            if name == "sleep":
                await asyncio.sleep(*args)
                name, args = flow.send(None)
                continue
            try:
                answer = await engine.apply(name, args)
            except BackendError as err:
                name, args = flow.throw(err)
            else:
                name, args = flow.send(answer)
    except StopIteration as stop:
        return stop.value
    finally:
        flow.close()


def flush_sync(engine: Any) -> int:
    """Replay the engine's journal now (see ``Budget.flush_journal``)."""
    st = state_for(engine)
    total = 0
    while st.journal:
        done, err = run_sync(engine, replay_flow(st, force=True))
        total += done
        if err is not None:
            raise BackendError(f"Redis is still unavailable: {len(st.journal)} charge(s) stay journaled ({err})")
        if not done:
            break
    return total


async def flush_async(engine: Any) -> int:
    st = state_for(engine)
    total = 0
    while st.journal:
        done, err = await run_async(engine, replay_flow(st, force=True))
        total += done
        if err is not None:
            raise BackendError(f"Redis is still unavailable: {len(st.journal)} charge(s) stay journaled ({err})")
        if not done:
            break
    return total
