"""Calendar period arithmetic (distbudget/_core/calendar.py): boundaries in the window's time zone,
month ends, year ends, DST changes, leap days, ISO weeks."""

from __future__ import annotations

import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distbudget._core.calendar import GRACE_S, check_tz, period_at, periods
from distbudget._exceptions import InvalidInputError

US = 1_000_000
HOUR = 3600 * US


def at(*args: int, tz: str = "UTC") -> int:
    """µs since the epoch of a local wall time in ``tz``."""
    local = dt.datetime(*args, tzinfo=ZoneInfo(tz))  # type: ignore[misc]
    return round(local.timestamp() * US)


def utc(*args: int) -> int:
    return at(*args, tz="UTC")


def test_month_boundary_jan_31_to_feb_1_in_berlin() -> None:
    last = at(2026, 1, 31, 23, 59, 59, 999_999, tz="Europe/Berlin")
    jan = period_at("month", "Europe/Berlin", last)
    feb = period_at("month", "Europe/Berlin", last + 1)
    assert jan.label == "2026-01" and feb.label == "2026-02"
    assert jan.start_us == utc(2025, 12, 31, 23)  # Berlin is UTC+1 in winter
    assert jan.end_us == feb.start_us == utc(2026, 1, 31, 23) == last + 1
    assert feb.end_us == utc(2026, 2, 28, 23)
    assert jan.retry_after_us(last) == 1
    assert jan.expire_at_us == jan.end_us + GRACE_S * US


def test_year_end_dec_31_to_jan_1() -> None:
    for window, old, new in (("month", "2026-12", "2027-01"), ("calendar_day", "2026-12-31", "2027-01-01")):
        before = period_at(window, "UTC", utc(2026, 12, 31, 23, 59, 59))
        after = period_at(window, "UTC", utc(2027, 1, 1))
        assert (before.label, after.label) == (old, new)
        assert before.end_us == after.start_us == utc(2027, 1, 1)


def test_dst_days_are_23_and_25_hours_in_berlin() -> None:
    spring = period_at("calendar_day", "Europe/Berlin", at(2026, 3, 29, 12, tz="Europe/Berlin"))
    autumn = period_at("calendar_day", "Europe/Berlin", at(2026, 10, 25, 12, tz="Europe/Berlin"))
    assert spring.end_us - spring.start_us == 23 * HOUR
    assert autumn.end_us - autumn.start_us == 25 * HOUR
    assert spring.start_us == utc(2026, 3, 28, 23) and spring.end_us == utc(2026, 3, 29, 22)
    assert autumn.start_us == utc(2026, 10, 24, 22) and autumn.end_us == utc(2026, 10, 25, 23)
    march = period_at("month", "Europe/Berlin", at(2026, 3, 15, tz="Europe/Berlin"))
    assert march.end_us - march.start_us == (31 * 24 - 1) * HOUR
    # the repeated hour 02:00-03:00 of Oct 25 belongs to Oct 25, both times
    assert period_at("calendar_day", "Europe/Berlin", utc(2026, 10, 25, 0, 30)).label == "2026-10-25"
    assert period_at("calendar_day", "Europe/Berlin", utc(2026, 10, 25, 1, 30)).label == "2026-10-25"


def test_a_skipped_midnight_starts_the_day_at_the_transition() -> None:
    # Chile springs forward at 24:00: 2026-09-06 00:00 local never happens, the day starts at 01:00.
    tz = "America/Santiago"
    day = period_at("calendar_day", tz, at(2026, 9, 6, 12, tz=tz))
    assert day.label == "2026-09-06"
    assert day.end_us - day.start_us == 23 * HOUR
    start = dt.datetime.fromtimestamp(day.start_us / US, ZoneInfo(tz))
    assert (start.day, start.hour, start.minute) == (6, 1, 0)
    assert period_at("calendar_day", tz, day.start_us - 1).end_us == day.start_us


def test_leap_day() -> None:
    leap = period_at("calendar_day", "Europe/Berlin", at(2028, 2, 29, 23, 59, tz="Europe/Berlin"))
    assert leap.label == "2028-02-29"
    assert leap.next().label == "2028-03-01"
    feb = period_at("month", "UTC", utc(2028, 2, 29, 12))
    assert feb.end_us - feb.start_us == 29 * 24 * HOUR
    assert period_at("month", "UTC", utc(2100, 2, 10)).end_us == utc(2100, 3, 1)  # 2100 is no leap year


def test_iso_weeks_start_on_monday() -> None:
    thursday = utc(2026, 1, 1, 12)  # Jan 1 2026 is a Thursday: ISO week 1 began Monday Dec 29
    week = period_at("week", "UTC", thursday)
    assert week.label == "2026-W01"
    assert week.start_us == utc(2025, 12, 29) and week.end_us == utc(2026, 1, 5)
    assert period_at("week", "UTC", utc(2027, 1, 1)).label == "2026-W53"  # a 53-week year
    sunday_night = at(2026, 3, 29, 23, 59, tz="Europe/Berlin")  # the week that holds a DST change
    w = period_at("week", "Europe/Berlin", sunday_night)
    assert w.end_us - w.start_us == (7 * 24 - 1) * HOUR


def test_periods_are_consecutive() -> None:
    ps = periods("month", "Asia/Kolkata", utc(2026, 1, 1), before=2, after=3)
    assert [p.label for p in ps] == ["2025-11", "2025-12", "2026-01", "2026-02", "2026-03", "2026-04"]
    assert all(a.end_us == b.start_us for a, b in itertools.pairwise(ps))


def test_bad_time_zones_and_windows() -> None:
    assert check_tz(None) == "UTC"
    assert check_tz("Europe/Berlin") == "Europe/Berlin"
    with pytest.raises(InvalidInputError, match="unknown time zone"):
        check_tz("Mars/Olympus")
    with pytest.raises(InvalidInputError, match="unknown time zone"):
        check_tz("../../etc/passwd")
    with pytest.raises(TypeError):
        check_tz(1)
    with pytest.raises(InvalidInputError, match="calendar window"):
        period_at("hour", "UTC", 0)


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["month", "week", "calendar_day"]),
    st.sampled_from(ZONES),
    st.integers(min_value=utc(1990, 1, 1), max_value=utc(2090, 1, 1)),
)
def test_every_instant_lies_in_exactly_one_period(window: str, tz: str, now_us: int) -> None:
    p = period_at(window, tz, now_us)
    assert p.start_us <= now_us < p.end_us
    assert p.next().start_us == p.end_us
    assert period_at(window, tz, p.start_us) == p
    assert period_at(window, tz, p.end_us - 1) == p
    local = (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=now_us)).astimezone(
        ZoneInfo(tz)
    )
    assert (
        p.label
        == {
            "month": f"{local.year:04d}-{local.month:02d}",
            "week": "{:04d}-W{:02d}".format(*local.isocalendar()),
            "calendar_day": local.date().isoformat(),
        }[window]
    )
