"""The engine seam: every operation an engine applies, as a small typed value, and its typed result.

An operation is a slotted dataclass deriving from ``Operation[R]``, ``R`` being what an engine
answers for it; ``engine.execute(op) -> R`` (see ``distbudget/engines/base.py``) is the whole
interface between the accounting (``_accounting.py``, the failure policy) and the engines (memory:
in-process; redis: one script call each, encoded by ``engines/codec.py``). Pure data: no I/O.

The operations and results are plain slotted dataclasses, not frozen ones: one is built per call,
and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field) costs several times as much.
Nothing mutates them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from distbudget._core.errors import BackendError, InvalidInputError
from distbudget._core.plan import Plan

R = TypeVar("R")
T = TypeVar("T")

Amounts = tuple[int, int, int]  # (tokens, nano-USD, requests) of one call
LedgerRow = tuple[str, dict[str, str]]  # one stream entry as XRANGE returns it: (entry id, fields)


class Operation(Generic[R]):
    """The base of every engine operation; ``R`` is its result's type."""

    __slots__ = ()


# ---- results ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ChargeResult:
    """Record / Commit. ``totals``: 3 values (tokens, cost, requests) per counter after the charge.
    ``alerts``: (limit index, level) crossings decided in the atomic step. ``original``: for a
    duplicate request id, the (timestamp µs, tokens, cost) first charged. ``hold_found``: commit only.
    """

    now_us: int
    totals: tuple[int, ...]
    alerts: tuple[tuple[int, int], ...]
    original: tuple[int, int, int] | None
    hold_found: bool
    alert_ids: tuple[str, ...] = ()  # the alert stream ids of ``alerts`` (Redis only)
    ledger_id: str = ""  # the charge's ledger entry ("" without a ledger)


@dataclass(slots=True)
class AdmitResult:
    """Check / Reserve. ``refused``: index of the first limit that refused (-1 none);
    ``retry_us``: when a rolling window will have freed enough (-1 if it never will by itself)."""

    now_us: int
    totals: tuple[int, ...]
    held: tuple[int, ...]
    refused: int
    retry_us: int
    alerted: bool = False  # the refusal fired its limit's REFUSED alert (the first in its window)
    alert_id: str = ""  # that alert's stream id (Redis only)


@dataclass(slots=True)
class SummaryResult:
    now_us: int
    totals: tuple[int, ...]
    held: tuple[int, ...]
    scope_totals: dict[str, int]  # the own totals hash: "t"/"c"/"r" and "m:<model>:<metric>"
    refusals: tuple[int, ...] = ()  # per limit of the plan: the refusals counted in its scope


@dataclass(slots=True)
class ResetResult:
    amounts: Amounts  # what the reported counter held before the reset
    ledger_id: str  # the reset's ledger entry ("" without a ledger)


class BatchError(BackendError):
    """A :class:`RecordMany` whose charges did not all meet the same fate: some were charged and
    others failed. ``results`` holds, per charge in order, its result or its (classified)
    :class:`BackendError` (or the InvalidInputError of a charge refused for a counter it would push
    past 2**53 - 1). The failure policy settles it charge by charge; callers never see it."""

    def __init__(self, message: str, results: list[ChargeResult | BackendError | InvalidInputError]) -> None:
        super().__init__(message)
        self.results = results


# ---- operations ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Record(Operation[ChargeResult]):
    """Charge actual usage to every counter of the plan, unconditionally; decide alert crossings;
    append the ledger entry. ``now_us``: the injected clock, or None for the engine's own time."""

    plan: Plan
    now_us: int | None
    amounts: Amounts
    request_key: str | None  # charged at most once while it lives (request_ttl_ms)
    request_ttl_ms: int
    ledger_maxlen: int  # 0: no ledger
    ledger_entry: str  # the entry's JSON ("" when the ledger is off)


@dataclass(slots=True)
class Commit(Operation[ChargeResult]):
    """Free a reservation's hold and charge the actual usage, in one step (as :class:`Record`)."""

    plan: Plan
    now_us: int | None
    amounts: Amounts
    hold_id: str
    request_key: str | None
    request_ttl_ms: int
    ledger_maxlen: int
    ledger_entry: str


Charge = Record | Commit


@dataclass(slots=True)
class RecordMany(Operation[list[ChargeResult | InvalidInputError]]):
    """Each record in order, each its own atomic step (Redis: one pipelined round trip). When only
    some fail, the engine raises :class:`BatchError`; a charge refused for a counter it would push
    past 2**53 - 1 has its InvalidInputError in its place (nothing of it written)."""

    records: tuple[Record, ...]


@dataclass(slots=True)
class Check(Operation[AdmitResult]):
    """Would ``amounts`` fit under every limit of the plan now? Changes no total. A refusal, when
    ``count``, is counted for the refusing limit, fires its REFUSED alert if it is the first in the
    limit's window, and is appended to the ledger (``ledger_entry``: the entry's head, see
    ``_core/ledger.py``; the engine adds the limit) in the same step."""

    plan: Plan
    now_us: int | None
    amounts: Amounts
    count: bool = True
    ledger_maxlen: int = 0
    ledger_entry: str = ""


@dataclass(slots=True)
class Reserve(Operation[AdmitResult]):
    """Hold ``amounts`` against every counter of the plan if it fits, for ``ttl_us``; a refusal is
    counted as :class:`Check`'s."""

    plan: Plan
    now_us: int | None
    amounts: Amounts
    hold_id: str
    ttl_us: int
    count: bool = True
    ledger_maxlen: int = 0
    ledger_entry: str = ""


@dataclass(slots=True)
class Release(Operation[bool]):
    """Free a hold; True if it was still live. With a ledger entry (a hold whose block was left
    without a commit, ``kind="released_uncommitted"``), append it in the same step, with the amounts
    held (it counts against nothing)."""

    plan: Plan
    hold_id: str
    now_us: int | None = None
    amounts: Amounts = (0, 0, 0)
    ledger_maxlen: int = 0
    ledger_entry: str = ""


@dataclass(slots=True)
class Extend(Operation[bool]):
    """A live hold's lease now ends ``ttl_us`` from now; False (nothing changed) if it had lapsed."""

    plan: Plan
    hold_id: str
    now_us: int | None
    ttl_us: int


@dataclass(slots=True)
class Summary(Operation[SummaryResult]):
    plan: Plan
    now_us: int | None


@dataclass(slots=True)
class Reset(Operation[ResetResult]):
    """Zero counters: ``keys[0]`` is the tree's ledger, ``keys[1]`` the hash whose amounts are
    reported, the rest are deleted with it (``"model"``: only ``field_prefix``'s fields of
    ``keys[1]`` are deleted)."""

    what: Literal["session", "model", "scope"]
    keys: tuple[str, ...]
    now_us: int | None
    field_prefix: str
    ledger_maxlen: int
    ledger_entry: str


@dataclass(slots=True)
class RegistryPut(Operation[list[str]]):
    """Store scope configs (see ``_core/registry.py``); answers the last scope's chain or a refusal."""

    key: str
    triples: tuple[str, ...]  # (name, config JSON, "w" | "a") from the root down, flattened


@dataclass(slots=True)
class RegistryChain(Operation[list[str]]):
    """The configs of a scope, its parent ... up to the root ([] when unknown)."""

    key: str
    name: str


@dataclass(slots=True)
class RegistryRemove(Operation[list[str]]):
    """``["ok"]``, ``[]`` when unknown, or a refusal."""

    key: str
    name: str


@dataclass(slots=True)
class RegistrySwap(Operation[list[str]]):
    """Replace a scope's config if it is still ``old`` (an update, see ``_core/update.py``): the
    scope's chain when written, ``["changed"]`` when it is no longer ``old``, ``[]`` when unknown."""

    key: str
    name: str
    old: str
    new: str


@dataclass(slots=True)
class RegistryNames(Operation[list[str]]):
    key: str


@dataclass(slots=True)
class PricesRead(Operation[tuple[int, str | None]]):
    """The fleet price book (see ``_core/fleet_prices.py``): its revision, and its JSON when the
    revision is not ``known`` (else None): a worker polls one small field, reads the book on change."""

    key: str
    known: int


@dataclass(slots=True)
class PricesPush(Operation[int]):
    """Store a new fleet price book (JSON), then bump its revision (one round trip); answers the
    revision. Readers see a revision only once its book is stored."""

    key: str
    book: str


@dataclass(slots=True)
class LedgerRead(Operation[list[LedgerRow]]):
    """Up to ``count`` ledger entries from ``start`` (an XRANGE start: "-", an id, "(" + id)."""

    key: str
    start: str
    count: int


@dataclass(slots=True)
class Announce(Operation[None]):
    """Register a tree's alert stream under each scope's name (how listeners find it)."""

    index_key: str
    streams: dict[str, str]


# ---- operations of several steps ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sleep:
    """A step of a multi-step operation: wait this long (the drivers sleep, sync or async)."""

    seconds: float


# An operation that really takes several engine steps (acquire's wait loop, a ledger read page by
# page, the journal's replay) is a generator: it yields engine operations and sleeps, is sent each
# operation's result, and has each operation's BackendError thrown in; it returns its result. The
# drivers (``_driver.py``) run it and close it in ``finally``.
Steps = Generator[Operation[Any] | Sleep, Any, T]


@dataclass(slots=True)
class Step(Generic[R, T]):
    """An API call of one engine step: the operation, and what makes the caller's result of the
    engine's answer (it may raise: a refusal, a limit exceeded)."""

    op: Operation[R]
    finish: Callable[[R], T]


@dataclass(slots=True)
class Done(Generic[T]):
    """An API call that needs no engine step at all (an empty batch, a hold already settled)."""

    value: T


# What an API call is, for the drivers: prepared (validated, planned) before anything is sent.
Job = Step[Any, T] | Done[T] | Steps[T]
