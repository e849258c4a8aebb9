"""Calendar windows on every backend (embedded, fakeredis, Redis, Cluster; sync and async), with an
injected clock: usage resets exactly at the period boundary in the limit's time zone, a refusal's
retry_after is the time to that boundary, alerts re-arm per period, and each period's counter
expires after it."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from distbudget import BudgetExceededError, BudgetScope, Limit, ModelRates
from distbudget._exceptions import InvalidInputError
from tests.conftest import Backend, Clock

BERLIN = "Europe/Berlin"
RATES = {"m": ModelRates.per_million(1_000, 1_000)}  # 1,000 tokens = $1


def local(*args: int, tz: str = BERLIN) -> float:
    return dt.datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()  # type: ignore[misc]


def budget(backend: Backend, clock: Clock, *limits: Limit, **kw: Any) -> Any:
    return backend.budget(BudgetScope("finance", limits=list(limits), **kw), RATES, clock=clock)


def refused(b: Any, tokens: int) -> BudgetExceededError:
    with pytest.raises(BudgetExceededError) as info:
        b.check("m", tokens)
    return info.value


def test_month_resets_at_midnight_berlin_jan_31_to_feb_1(backend: Backend, clock: Clock) -> None:
    clock.t = local(2026, 1, 31, 23, 59)
    b = budget(backend, clock, Limit("tokens", 1_000, "month", tz=BERLIN))
    b.record("s", "m", 900, 0)
    err = refused(b, 200)
    assert err.limit_type == "month_tokens" and err.used == 1_100 and err.limit == 1_000  # used: with the call
    assert err.retry_after == pytest.approx(60)  # to 00:00 Berlin, not to 00:00 UTC
    clock.t = local(2026, 2, 1) - 0.001
    refused(b, 200)
    clock.t = local(2026, 2, 1)
    assert b.check("m", 1_000) is True
    b.record("s", "m", 600, 0)
    assert refused(b, 500).used == 1_100


def test_year_end_dec_31_to_jan_1(backend: Backend, clock: Clock) -> None:
    clock.t = local(2026, 12, 31, 12, tz="UTC")
    b = budget(backend, clock, Limit("cost", 1, "calendar_day"), Limit("cost", 5, "month"))
    b.record("s", "m", 1_000, 0)  # $1: the day is full
    assert refused(b, 1).limit_type == "calendar_day_cost_usd"
    assert refused(b, 1).retry_after == pytest.approx(12 * 3600)
    clock.t = local(2027, 1, 1, tz="UTC")
    b.record("s", "m", 1_000, 0)  # a new day and a new month
    assert refused(b, 1).used == pytest.approx(1.001)


def test_a_dst_day_is_23_hours_long(backend: Backend, clock: Clock) -> None:
    clock.t = local(2026, 3, 29, 0, 30)  # Berlin springs forward at 02:00 this day
    b = budget(backend, clock, Limit("tokens", 100, "calendar_day", tz=BERLIN))
    b.record("s", "m", 100, 0)
    assert refused(b, 1).retry_after == pytest.approx(22.5 * 3600)  # 23 h day, 30 min gone
    clock.t = local(2026, 3, 29, 23, 59, 59)
    refused(b, 1)
    clock.t = local(2026, 3, 30)
    b.record("s", "m", 100, 0)
    clock.t = local(2026, 10, 25, 0, 30)  # and falls back: a 25 h day
    b.record("s", "m", 100, 0)
    assert refused(b, 1).retry_after == pytest.approx(24.5 * 3600)


def test_leap_day_and_iso_week(backend: Backend, clock: Clock) -> None:
    clock.t = local(2028, 2, 29, 12, tz="UTC")  # a Tuesday
    b = budget(backend, clock, Limit("tokens", 150, "calendar_day"), Limit("tokens", 250, "week"))
    b.record("s", "m", 150, 0)
    assert refused(b, 1).limit_type == "calendar_day_tokens"
    clock.t = local(2028, 3, 1, tz="UTC")
    b.record("s", "m", 100, 0)  # the week holds 250 now, the new day 100
    err = refused(b, 1)
    assert err.limit_type == "week_tokens"
    assert err.retry_after == pytest.approx(local(2028, 3, 6, tz="UTC") - clock.t)  # to Monday 00:00
    clock.t = local(2028, 3, 6, tz="UTC")
    assert b.check("m", 150) is True  # a new week, a new day


def test_alerts_re_arm_per_period(backend: Backend, clock: Clock) -> None:
    clock.t = local(2026, 1, 15)
    b = budget(backend, clock, Limit("tokens", 100, "month", tz=BERLIN), alert_at_pct=0.8, hard_stop=False)
    b.record("s", "m", 85, 0)
    b.record("s", "m", 5, 0)  # no second WARNING within January
    clock.t = local(2026, 2, 15)
    b.record("s", "m", 85, 0)  # a new period: the WARNING fires again
    assert [(a.level.value, a.limit_type) for a in b.alerts] == [("warning", "month_tokens")] * 2


def test_one_counter_per_period_expiring_after_it(backend: Backend, clock: Clock) -> None:
    if backend.store is None:
        pytest.skip("key expiry is a Redis matter")
    clock.t = local(2026, 1, 31, 12)
    b = budget(backend, clock, Limit("tokens", 10_000, "month", tz=BERLIN))
    for day in range(40):
        clock.t = local(2026, 1, 31, 12) + day * 86400
        b.record("s", "m", 10, 0)
    keys = list(backend.store.scan_iter(match="*:c:*", count=1000))
    assert 1 <= len(keys) <= 3  # January, February, March: one counter per period
    for key in keys:
        ttl = backend.store.pttl(key)
        assert ttl > 0  # every period's counter expires (an hour after its period ends)


def test_calendar_limits_are_validated_and_registered(backend: Backend, clock: Clock) -> None:
    with pytest.raises(InvalidInputError, match="time zone"):
        Limit("cost", 5, "month", tz="Mars/Olympus_Mons")
    with pytest.raises(InvalidInputError, match="tz"):
        Limit("cost", 5, "1h", tz=BERLIN)  # a rolling window has no time zone
    assert Limit("cost", 5, "month").tz == "UTC"
    assert Limit("cost", 5, "week", tz=BERLIN).limit_type == "week_cost_usd"
    m = backend.manager(clock=clock)
    m.register(BudgetScope("finance", limits=[Limit("cost", 500, "month", tz=BERLIN)]))
    other = backend.manager(clock=clock)
    assert other.get("finance").scope.limits == [Limit("cost", 500, "month", tz=BERLIN)]


def test_without_an_injected_clock_the_servers_time_picks_the_period(backend: Backend) -> None:
    b = backend.budget(BudgetScope("finance", limits=[Limit("tokens", 100, "month", tz=BERLIN)]), RATES)
    b.record("s", "m", 10, 0)
    b.record("s", "m", 15, 0)
    assert b.summary()["limits"]["month_tokens"]["used"] == 25
    assert refused(b, 80).retry_after > 0
