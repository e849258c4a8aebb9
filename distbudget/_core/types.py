"""Values handed to users: usage records and alerts."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple


class AlertLevel(str, Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"
    REFUSED = "refused"  # the first refusal of a limit in its window (a session, a period, ...)


class RequestedBy(NamedTuple):
    """The call that drove an alert: the requesting scope (the limit may be an ancestor's), its
    session and its model (None for an alert no call drove, such as a lowered cap's)."""

    scope: str
    session_id: str | None
    model: str | None


@dataclass(frozen=True)
class UsageRecord:
    """One charged call. ``cost_usd`` is a float view of the exact ``cost_nano_usd``.

    ``over_hold`` is True when a reservation's actual usage exceeded what it held (it is charged
    anyway); ``duplicate`` when the ``request_id`` had already been charged (nothing was charged
    again; the fields repeat the original charge); ``journaled`` when Redis was unavailable and the
    charge waits in the local journal (replayed when Redis answers; see ``on_backend_error``);
    ``hold_expired`` when a reservation's hold had lapsed before its commit (charged all the same).
    """

    session_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    timestamp: float
    metadata: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    cost_nano_usd: int = 0
    request_id: str | None = None
    over_hold: bool = False
    duplicate: bool = False
    ledger_id: str | None = None
    journaled: bool = False  # Redis was unavailable: the charge waits in the local journal for replay
    cached_input_tokens: int = 0  # of input_tokens: read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens: written to the prompt cache
    reasoning_tokens: int = 0  # of output_tokens
    canonical_model: str = ""  # the model id limits and per-model totals are keyed by
    hold_expired: bool = False  # a commit whose hold had lapsed (its lease ended) before it

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def alert_message(level: AlertLevel, scope: str, limit_type: str, used: float, limit: float) -> str:
    pct = used / limit if limit else float("inf")
    if level is AlertLevel.REFUSED:
        return f"Budget refused a call for scope {scope!r}: {limit_type} would reach {pct:.0%} ({used} of {limit})"
    return f"Budget {level.value} for scope {scope!r}: {limit_type} at {pct:.0%} ({used} of {limit})"


@dataclass(frozen=True)
class BudgetAlert:
    """A threshold crossing, or a limit's first refusal in its window (``REFUSED``: ``used`` is then
    what the call would have brought it to). ``used`` and ``limit`` are tokens, requests, or USD for
    cost limits. ``scope`` is the scope whose limit it is; ``requested_by`` the call that drove it."""

    scope: str
    level: AlertLevel
    message: str
    used: float
    limit: float
    timestamp: float
    limit_type: str
    session_id: str | None = None
    model: str | None = None
    alert_id: str | None = None  # the alert stream entry id (fleet-wide identity)
    requested_by: RequestedBy | None = None

    @property
    def pct(self) -> float:
        return self.used / self.limit if self.limit else float("inf")
