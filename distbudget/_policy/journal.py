"""The local journal of charges Redis did not take, the per-engine state of the failure policy, and
the replay (see ``guard.py`` for the policy itself).

In every mode a charge (``record``, or ``commit``) whose Redis call failed because Redis was
unavailable goes to a bounded journal, one per engine (so a manager's budgets share it), and is replayed
oldest first when Redis answers again: before the next operation of any budget on that engine, or by
``flush_journal()``. A full journal raises ``BackendError``: a charge is never dropped silently.

Replay is idempotent. A charge with a request id is protected by its request key (the scripts
answer "duplicate"). Without one, each charge's ledger entry carries a unique op id: a charge whose
failure was ambiguous (the command may have run: the connection broke or timed out after sending) is
looked up in its tree's ledger first, and replayed only if absent. Only this process replays its op
ids, so the look-up cannot race another replay. A charge that surely never reached Redis (connection
refused, ``LOADING``, ``READONLY`` ...) is replayed directly. The bound: an ambiguous charge with
neither a request id nor a ledger (``ledger_maxlen=0``) cannot be resolved and is replayed (it may count
twice); so may one whose ledger entry was trimmed away meanwhile or that landed more than
``LOOKUP_MARGIN_S`` before this worker's clock says it was sent.

:func:`replay` is a generator of engine operations (it takes several engine steps: look-ups, then
one charge at a time), run by the drivers of ``_driver.py``: engine errors are thrown into it.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

from distbudget._core.errors import BackendError
from distbudget._core.ops import Charge, ChargeResult, Commit, LedgerRead, LedgerRow, Sleep, Steps

log = logging.getLogger("distbudget")

DEFAULT_JOURNAL_SIZE = 10_000
RETRY_INTERVAL = 0.5  # seconds between attempts to reach Redis while it is down
LOOKUP_MARGIN_S = 300  # an ambiguous charge is looked up from this long before its failure (clock skew)
LOOKUP_PAGE = 1000
JOURNAL_LOG_EVERY = 5.0  # at most one "charges journaled" warning per this many seconds


@dataclass(slots=True, eq=False)
class Entry:
    """One journaled charge: the engine operation exactly as first sent (same op id, request key)."""

    op: Charge
    maybe_sent: bool  # the command may have reached Redis (and run)
    wall: float  # time.time() when it failed
    scope: str
    op_id: str | None  # the op id inside its ledger entry JSON

    @property
    def verifiable(self) -> bool:
        """Can a replay know whether this charge already landed?"""
        op = self.op
        return not self.maybe_sent or op.request_key is not None or (bool(op.ledger_maxlen) and self.op_id is not None)


def ledger_op_id(op: Charge) -> str | None:
    """The op id in a charge's ledger entry (None without a ledger)."""
    if not op.ledger_maxlen or not op.ledger_entry:
        return None
    op_id = json.loads(op.ledger_entry).get("op")
    return op_id if isinstance(op_id, str) else None


class Allowance:
    """One budget's fail-open usage in the current outage (``on_backend_error="allow"``): its local
    holds and journaled charges. Changed under the engine state's lock."""

    def __init__(self) -> None:
        self.epoch = 0
        self.tokens = 0
        self.nano = 0

    def roll(self, epoch: int) -> None:
        """Allowances start afresh with each outage."""
        if self.epoch != epoch:
            self.epoch = epoch
            self.tokens = self.nano = 0

    def free(self, hold: LocalHold) -> None:
        """A local hold ended: give its allowance back."""
        if hold.epoch == self.epoch:
            self.tokens = max(self.tokens - hold.tokens, 0)
            self.nano = max(self.nano - hold.nano, 0)


@dataclass(slots=True)
class LocalHold:
    """A reservation admitted locally while Redis was down (``"allow"``)."""

    allowance: Allowance
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
                hold.allowance.free(hold)
            self._update()


_states: weakref.WeakKeyDictionary[object, EngineState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def state_for(engine: object, capacity: int = DEFAULT_JOURNAL_SIZE) -> EngineState:
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
            tokens, nano, _requests = e.op.amounts
            log.error(
                "distbudget: unreplayed %s of scope %r: %d tokens, %d nano-USD, ledger entry %s",
                type(e.op).__name__.lower(),
                e.scope,
                tokens,
                nano,
                e.op.ledger_entry or "(none)",
            )


atexit.register(_report_unreplayed)


# ---- replay -----------------------------------------------------------------------------------------


def _lookup(entries: list[Entry]) -> Generator[LedgerRead, list[LedgerRow], set[str]]:
    """The op ids of ``entries`` (ambiguous, no request id) that are in their tree's ledger."""
    wanted: dict[str, dict[str, float]] = {}
    for e in entries:
        if e.maybe_sent and e.op.request_key is None and e.op.ledger_maxlen and e.op_id is not None:
            wanted.setdefault(e.op.plan.keyspace.ledger, {})[e.op_id] = e.wall
    found: set[str] = set()
    for key, ops in wanted.items():
        start = str(max(0, int((min(ops.values()) - LOOKUP_MARGIN_S) * 1000)))
        remaining = set(ops)
        while remaining:
            page = yield LedgerRead(key, start, LOOKUP_PAGE)
            for _id, fields in page:
                raw = fields.get("d")
                if raw is None:
                    continue
                op = json.loads(raw).get("op")
                if op in remaining:
                    remaining.discard(op)
                    found.add(op)
            if len(page) < LOOKUP_PAGE:
                break
            start = "(" + page[-1][0]
    return found


def replay(st: EngineState, force: bool = False) -> Steps[tuple[int, BackendError | None]]:
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
        yield Sleep(0.01)
    started = time.monotonic()
    settled = replayed = already = 0
    stop: BackendError | None = None
    try:
        try:
            found = yield from _lookup(batch)
        except BackendError as err:
            if err.outage:
                st.fail(err)
                return 0, err
            raise
        for e in batch:
            if e.op_id is not None and e.op_id in found:
                already += 1
            else:
                was, verifiable = e.maybe_sent, e.verifiable
                e.maybe_sent = True  # from here on this attempt may have run (cancellation included)
                try:
                    answer: ChargeResult = yield e.op
                except Exception as err:  # one entry never stalls the replay: it goes to the dead letters
                    outage = isinstance(err, BackendError) and err.outage
                    e.maybe_sent = was or (isinstance(err, BackendError) and err.maybe_sent)
                    if outage:
                        assert isinstance(err, BackendError)
                        st.fail(err)
                        stop = err
                        break
                    log.error(
                        "distbudget: a journaled charge of scope %r failed on replay (%s: %s); it is set aside "
                        "in the dead-letter list (summary()['backend']['rejected']) and NOT counted: %s %s",
                        e.scope,
                        type(err).__name__,
                        err,
                        type(e.op).__name__.lower(),
                        e.op.ledger_entry or e.op.amounts,
                    )
                    with st.lock:
                        st.rejected.append(e)
                        st.journal.popleft()
                        st._update()
                    continue
                if not verifiable:  # ambiguous, without request id or ledger: it may now count twice
                    with st.lock:
                        st.stats["unverified"] += 1
                if answer.original is not None:
                    already += 1
                else:
                    replayed += 1
            st.ok()
            with st.lock:
                st.journal.popleft()
                if isinstance(e.op, Commit):
                    st.settled.discard(e.op.hold_id)
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


def flush(st: EngineState) -> Steps[int]:
    """Replay the journal now, whatever the retry interval (``flush_journal()``): how many charges
    were settled. Raises ``BackendError`` if Redis is still unavailable (they stay journaled)."""
    total = 0
    while st.journal:
        done, err = yield from replay(st, force=True)
        total += done
        if err is not None:
            raise BackendError(f"Redis is still unavailable: {len(st.journal)} charge(s) stay journaled ({err})")
        if not done:
            break
    return total
