"""Values handed to users: usage records and alerts."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class AlertLevel(str, Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


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
    return f"Budget {level.value} for scope {scope!r}: {limit_type} at {pct:.0%} ({used} of {limit})"


@dataclass(frozen=True)
class BudgetAlert:
    """A threshold crossing. ``used`` and ``limit`` are tokens, requests, or USD for cost limits."""

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

    @property
    def pct(self) -> float:
        return self.used / self.limit if self.limit else float("inf")
