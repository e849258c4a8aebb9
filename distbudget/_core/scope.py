"""Scopes and limits: what a budget allows. Pure data and validation, no I/O.

Every rule about *which* limits a scope has lives here: the seed's shorthand fields
(``max_tokens_per_session`` ...) become :class:`Limit` objects in :meth:`BudgetScope.all_limits`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from distbudget._core.bounds import check_text
from distbudget._core.errors import InvalidInputError
from distbudget._core.money import MAX_AMOUNT, usd_to_nano

Metric = Literal["tokens", "cost", "requests"]
METRICS: tuple[Metric, ...] = ("tokens", "cost", "requests")
MAX_NAME_LENGTH = 256

# A rolling window is split into at most this many buckets (and at least one-second buckets):
# a 24 h window gets 15-minute buckets, a minute one-second buckets. 96 buckets x 3 metrics keep
# each window's Redis hash small; the sorted set of bucket ids stays in the compact encoding.
BUCKETS_PER_WINDOW = 96

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAMED_WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


def check_name(value: object, what: str) -> str:
    """Names (scope, session, model, request id) are any non-empty str up to 256 chars of valid
    Unicode (no lone surrogates: see _core/bounds.py)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{what} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    return check_text(value, what)


def parse_window(window: object) -> str | int:
    """``"session"``, ``"total"``, or a rolling duration as whole seconds."""
    if isinstance(window, str):
        w = window.strip().lower()
        if w in ("session", "total"):
            return w
        if w in _NAMED_WINDOWS:
            return _NAMED_WINDOWS[w]
        m = _DURATION.match(w)
        if m:
            seconds = int(m.group(1)) * _UNITS[m.group(2)]
        elif w.isdigit():
            seconds = int(w)
        else:
            raise InvalidInputError(
                f"window must be 'session', 'total', or a duration like '30s', '1m', '24h': {window!r}"
            )
    elif isinstance(window, int) and not isinstance(window, bool):
        seconds = window
    elif isinstance(window, float) and math.isfinite(window) and window == int(window):
        seconds = int(window)
    else:
        raise InvalidInputError(f"window must be a str or whole seconds, got {window!r}")
    if seconds < 1 or seconds > 366 * 86400:
        raise InvalidInputError(f"window must be between 1 second and 366 days, got {window!r}")
    return seconds


def bucket_seconds(window_seconds: int) -> int:
    return max(1, -(-window_seconds // BUCKETS_PER_WINDOW))


def window_label(window: str | int) -> str:
    if isinstance(window, str):
        return window
    names = {60: "minute", 3600: "hour", 86400: "day"}
    if window in names:
        return names[window]
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if window % size == 0:
            return f"{window // size}{unit}"
    return f"{window}s"


@dataclass(frozen=True)
class Limit:
    """One limit: ``metric`` over ``window`` (optionally for one ``model`` only) may reach ``value``.

    ``value`` is tokens, requests, or USD for ``metric="cost"``. ``window`` is ``"session"``
    (per session id), ``"total"`` (cumulative until reset) or a rolling duration such as ``"1m"``,
    ``"24h"`` or seconds. ``name`` defaults to the seed's ``limit_type`` style.
    """

    metric: Metric
    value: float | int
    window: str | int = "session"
    model: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InvalidInputError(f"metric must be one of {METRICS}, got {self.metric!r}")
        object.__setattr__(self, "window", parse_window(self.window))
        if self.model is not None:
            check_name(self.model, "Limit.model")
        self.amount  # validates value  # noqa: B018
        if self.name is not None:
            check_name(self.name, "Limit.name")

    @property
    def amount(self) -> int:
        """The limit as an integer in engine units (nano-USD for cost)."""
        if self.metric == "cost":
            return usd_to_nano(self.value, f"limit value for {self.limit_type}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
            raise InvalidInputError(f"{self.metric} limit must be a whole number, got {v!r}")
        if v < 0 or v > MAX_AMOUNT:
            raise InvalidInputError(f"{self.metric} limit out of range: {v!r}")
        return int(v)

    @property
    def limit_type(self) -> str:
        if self.name is not None:
            return self.name
        unit = {"tokens": "tokens", "cost": "cost_usd", "requests": "requests"}[self.metric]
        where = window_label(self.window)
        if self.model is None:
            return f"{where}_{unit}"
        if self.window == "total":
            return f"model_{self.model}_{unit}"
        return f"model_{self.model}_{where}_{unit}"


def _limit_list(value: object) -> list[Limit]:
    if not isinstance(value, (list, tuple)):
        raise TypeError("limits must be a list of Limit")
    for item in value:
        if not isinstance(item, Limit):
            raise TypeError(f"limits must hold Limit objects, got {type(item).__name__}")
    return list(value)


@dataclass(eq=False)
class BudgetScope:
    """A named budget: the seed's fields plus ``limits`` and ``parent``.

    ``parent`` is another :class:`BudgetScope` (or, in a :class:`BudgetManager`, its name); every
    charge on this scope also counts against each ancestor in the same atomic step.
    """

    name: str
    max_tokens_per_session: int | None = None
    max_cost_per_session_usd: float | None = None
    max_tokens_per_day: int | None = None
    max_cost_per_day_usd: float | None = None
    max_tokens_per_model: dict[str, int] = field(default_factory=dict)
    max_cost_per_model_usd: dict[str, float] = field(default_factory=dict)
    alert_at_pct: float | None = 0.8
    hard_stop: bool = True
    limits: list[Limit] = field(default_factory=list)
    parent: BudgetScope | str | None = None
    alert_thresholds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_name(self.name, "scope name")
        if self.alert_at_pct is not None:
            p = self.alert_at_pct
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p <= 1):
                raise InvalidInputError(f"alert_at_pct must be in [0, 1] or None, got {p!r}")
        if not isinstance(self.hard_stop, bool):
            raise TypeError("hard_stop must be a bool")
        self.limits = _limit_list(self.limits)
        if not isinstance(self.alert_thresholds, (list, tuple)):
            raise TypeError("alert_thresholds must be a list of fractions")
        for t in self.alert_thresholds:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < 1):
                raise InvalidInputError(f"alert_thresholds must be fractions in (0, 1), got {t!r}")
        if self.parent is not None and not isinstance(self.parent, (BudgetScope, str)):
            raise TypeError("parent must be a BudgetScope, a scope name, or None")
        if isinstance(self.parent, str):
            check_name(self.parent, "parent")
        self.all_limits()  # validate every limit now, not at the first call
        self.ancestors()

    def all_limits(self) -> list[Limit]:
        """The seed shorthand fields as Limits, then ``limits``; limit types are unique."""
        out: list[Limit] = []
        if self.max_tokens_per_session is not None:
            out.append(Limit("tokens", self.max_tokens_per_session, "session"))
        if self.max_cost_per_session_usd is not None:
            out.append(Limit("cost", self.max_cost_per_session_usd, "session"))
        if self.max_tokens_per_day is not None:
            out.append(Limit("tokens", self.max_tokens_per_day, "day"))
        if self.max_cost_per_day_usd is not None:
            out.append(Limit("cost", self.max_cost_per_day_usd, "day"))
        for kind, table in (("tokens", self.max_tokens_per_model), ("cost", self.max_cost_per_model_usd)):
            if not isinstance(table, dict):
                raise TypeError(f"max_{kind}_per_model must be a dict")
            for model, value in table.items():
                out.append(Limit(kind, value, "total", model=model))  # type: ignore[arg-type]
        out.extend(self.limits)
        seen: set[str] = set()
        for lim in out:
            if lim.limit_type in seen:
                raise InvalidInputError(f"scope {self.name!r} has two limits named {lim.limit_type!r}")
            seen.add(lim.limit_type)
        return out

    def ancestors(self) -> list[BudgetScope]:
        """Parent, grandparent, ... (only those given as objects); cycles are rejected."""
        out: list[BudgetScope] = []
        names = {self.name}
        p = self.parent
        while isinstance(p, BudgetScope):
            if p.name in names:
                raise InvalidInputError(f"scope {self.name!r} has a parent cycle through {p.name!r}")
            names.add(p.name)
            out.append(p)
            p = p.parent
        return out

    def extra_thresholds(self) -> list[Fraction]:
        """``alert_thresholds`` other than ``alert_at_pct``, ascending: each fires an INFO alert."""
        warn = self.warn_threshold()
        return sorted({Fraction(str(t)) for t in self.alert_thresholds} - {warn})

    def warn_threshold(self) -> Fraction | None:
        return None if self.alert_at_pct is None else Fraction(str(self.alert_at_pct))
