"""Calendar windows: a limit that resets at the start of each month, ISO week (Monday) or day in a
time zone (``Limit("cost", 500, "month", tz="Europe/Berlin")``). Pure period arithmetic, no I/O,
no clock: the engines pass the time (the server's, as for rolling windows).

A period is the half-open interval ``[start_us, end_us)`` of UTC microseconds between two local
midnights, so a DST change is simply a 23- or 25-hour day (and a month or week that holds one is an
hour shorter or longer). A local midnight that does not exist (a zone that springs forward at
00:00) starts the day at the first instant of that date; one that exists twice starts it at the
first. Each period has a label (``2026-02``, ``2026-W05``, ``2026-02-01``), its counter's identity:
one counter per period, which expires ``GRACE_S`` after the period ends.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from distbudget._core.errors import InvalidInputError

CalendarWindow = Literal["month", "week", "calendar_day"]
CALENDAR_WINDOWS: tuple[CalendarWindow, ...] = ("month", "week", "calendar_day")
DEFAULT_TZ = "UTC"
# A period's counter outlives the period by this much (a summary or report read just after the
# boundary still finds the period that ended); then the key expires: memory stays one counter.
GRACE_S = 3600
US = 1_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def is_calendar(window: object) -> bool:
    return isinstance(window, str) and window in CALENDAR_WINDOWS


def check_tz(tz: object) -> str:
    """A time zone name of the IANA database (``"Europe/Berlin"``); ``None`` means UTC."""
    if tz is None:
        return DEFAULT_TZ
    if not isinstance(tz, str):
        raise TypeError(f"tz must be an IANA time zone name (str), got {type(tz).__name__}")
    try:
        zone(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInputError(f"unknown time zone {tz!r} (an IANA name such as 'Europe/Berlin')") from None
    return tz


def zone(tz: str) -> ZoneInfo:
    return ZoneInfo(tz)  # ZoneInfo caches instances itself


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar period: ``[start_us, end_us)`` in UTC µs, and its label in the window's zone."""

    window: CalendarWindow
    tz: str
    label: str
    start_us: int
    end_us: int

    @property
    def expire_at_us(self) -> int:
        """When the period's counter may go: ``GRACE_S`` after the period ends."""
        return self.end_us + GRACE_S * US

    def retry_after_us(self, now_us: int) -> int:
        """Time from ``now_us`` to the boundary, when the next period's counter starts empty."""
        return max(self.end_us - now_us, 0)

    def next(self) -> Period:
        return period_at(self.window, self.tz, self.end_us)


def _local_midnight_us(day: dt.date, z: ZoneInfo) -> int:
    # fold=0: a midnight skipped by a DST change maps to the transition itself (the first instant
    # of that date); a midnight that happens twice maps to its first occurrence.
    local = dt.datetime(day.year, day.month, day.day, tzinfo=z)
    delta = local.astimezone(dt.timezone.utc) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * US + delta.microseconds


def _bounds(window: CalendarWindow, day: dt.date) -> tuple[dt.date, dt.date, str]:
    """(first day, first day of the next period, label) of the period holding local date ``day``."""
    if window == "month":
        first = day.replace(day=1)
        after = dt.date(first.year + first.month // 12, first.month % 12 + 1, 1)
        return first, after, f"{first.year:04d}-{first.month:02d}"
    if window == "week":
        first = day - dt.timedelta(days=day.weekday())  # ISO weeks start on Monday
        year, week, _ = first.isocalendar()
        return first, first + dt.timedelta(days=7), f"{year:04d}-W{week:02d}"
    return day, day + dt.timedelta(days=1), day.isoformat()


def period_at(window: str, tz: str, now_us: int) -> Period:
    """The period of ``window`` in zone ``tz`` that holds the instant ``now_us`` (UTC µs)."""
    if not is_calendar(window):
        raise InvalidInputError(f"not a calendar window: {window!r} (one of {CALENDAR_WINDOWS})")
    z = zone(tz)
    local = (_EPOCH + dt.timedelta(microseconds=now_us)).astimezone(z)
    kind: CalendarWindow = window  # type: ignore[assignment]  # is_calendar() checked it
    first, after, label = _bounds(kind, local.date())
    return Period(kind, tz, label, _local_midnight_us(first, z), _local_midnight_us(after, z))


def periods(window: str, tz: str, now_us: int, before: int = 1, after: int = 1) -> list[Period]:
    """The period holding ``now_us`` with ``before`` periods before it and ``after`` after it, in
    order: the candidates an engine picks from by its own clock when a caller's clock may differ."""
    current = period_at(window, tz, now_us)
    out = [current]
    for _ in range(before):
        out.insert(0, period_at(window, tz, out[0].start_us - 1))
    for _ in range(after):
        out.append(out[-1].next())
    return out
