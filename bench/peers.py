"""The contenders ``bench/run.py`` measures distbudget against (not distbudget's own code).

* :class:`SeedTracker`: the architecture of agent-budget, the in-process library distbudget grew
  from, modelled on what its README says ``record()`` does: price the call with the model's rates
  object, build a record dataclass, then under one ``threading.Lock`` add to the session's counters
  (a dict keyed by session id), to a rolling 24 h window (a deque of the day's charges with running
  sums, expired from the left) and to per-model counters, keep the record in an unbounded list,
  and walk every configured limit computing its percentage (alerts to callbacks, a hard stop
  raises). Written here from that description, not copied. Until 2026-11-28 this stand-in kept one
  session's counters and a fixed 24 h day that reset at once: cheaper than what the seed offers.
* :class:`NaiveZsetBudget`: the event-log design distbudget avoids: one sorted-set member per call in
  a rolling 24 h window (ZADD, ZREMRANGEBYSCORE, ZCARD, PEXPIRE in one script). Cheapest variant:
  it counts calls with ZCARD instead of summing the members' amounts (a true token/cost budget would
  have to read every member on each call). Memory and trimming work grow with traffic.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DAY_SECONDS = 86400


class SeedBudgetExceeded(Exception):
    """The seed raised from inside ``record()`` once a hard limit was reached."""


@dataclass(frozen=True)
class SeedRates:
    """The seed's ``ModelRates``: USD per 1K tokens, priced with a method call."""

    input_per_1k: float
    output_per_1k: float

    def estimate_cost(self, input_tokens: int, output_tokens: int = 0) -> float:
        return (input_tokens / 1000) * self.input_per_1k + (output_tokens / 1000) * self.output_per_1k


@dataclass
class SeedRecord:
    session_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    timestamp: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class SeedAlert:
    scope: str
    level: str
    message: str
    used: float
    limit: float
    timestamp: float = field(default_factory=time.time)


class SeedTracker:
    """A dict-and-lock in-process tracker with what the seed's README lists: per-session limits
    (counters per session id), rolling 24 h day limits (a deque of the day's charges with running
    sums, expired from the left), per-model limits, rates objects with ``estimate_cost``, soft
    alerts at ``alert_at_pct`` and hard stops, alert callbacks, every record kept."""

    def __init__(
        self,
        name: str,
        rates: dict[str, tuple[float, float]],
        *,
        max_tokens_per_session: int | None = None,
        max_cost_per_session_usd: float | None = None,
        max_tokens_per_day: int | None = None,
        max_cost_per_day_usd: float | None = None,
        max_tokens_per_model: dict[str, int] | None = None,
        max_cost_per_model_usd: dict[str, float] | None = None,
        alert_at_pct: float = 0.8,
        hard_stop: bool = True,
    ) -> None:
        self.name = name
        self.rates = {model: SeedRates(*per_1k) for model, per_1k in rates.items()}
        self.max_tokens_per_session = max_tokens_per_session
        self.max_cost_per_session_usd = max_cost_per_session_usd
        self.max_tokens_per_day = max_tokens_per_day
        self.max_cost_per_day_usd = max_cost_per_day_usd
        self.max_tokens_per_model = max_tokens_per_model or {}
        self.max_cost_per_model_usd = max_cost_per_model_usd or {}
        self.alert_at_pct = alert_at_pct
        self.hard_stop = hard_stop
        self._lock = threading.Lock()
        self._sessions: dict[str, list[float]] = {}  # session id -> [tokens, cost]
        self._day: deque[tuple[float, int, float]] = deque()  # (timestamp, tokens, cost) of the last 24 h
        self._day_tokens = 0
        self._day_cost = 0.0
        self._model_tokens: dict[str, int] = {}
        self._model_cost: dict[str, float] = {}
        self._records: list[SeedRecord] = []
        self._alerts: list[SeedAlert] = []
        self._callbacks: list[Callable[[SeedAlert], Any]] = []

    def on_alert(self, callback: Callable[[SeedAlert], Any]) -> None:
        self._callbacks.append(callback)

    def record(
        self, session_id: str, model: str, input_tokens: int, output_tokens: int, metadata: dict[str, Any] | None = None
    ) -> SeedRecord:
        cost = self.rates[model].estimate_cost(input_tokens, output_tokens)
        rec = SeedRecord(session_id, model, input_tokens, output_tokens, cost, metadata=metadata or {})
        tokens = rec.total_tokens
        with self._lock:
            now = rec.timestamp
            session = self._sessions.get(session_id)
            if session is None:
                session = self._sessions[session_id] = [0, 0.0]
            session[0] += tokens
            session[1] += cost
            day = self._day
            day.append((now, tokens, cost))
            self._day_tokens += tokens
            self._day_cost += cost
            while day[0][0] <= now - DAY_SECONDS:  # rolling 24 h: charges older than a day leave
                _, old_tokens, old_cost = day.popleft()
                self._day_tokens -= old_tokens
                self._day_cost -= old_cost
            self._model_tokens[model] = self._model_tokens.get(model, 0) + tokens
            self._model_cost[model] = self._model_cost.get(model, 0.0) + cost
            self._records.append(rec)
            alerts = self._check(session, model)
        for alert in alerts:
            for cb in self._callbacks:
                cb(alert)
            if alert.level == "critical" and self.hard_stop:
                raise SeedBudgetExceeded(alert.message)
        return rec

    def _check(self, session: list[float], model: str) -> list[SeedAlert]:
        checks: list[tuple[float, float, str]] = []
        if self.max_tokens_per_session is not None:
            checks.append((self.max_tokens_per_session, session[0], "session_tokens"))
        if self.max_cost_per_session_usd is not None:
            checks.append((self.max_cost_per_session_usd, session[1], "session_cost_usd"))
        if self.max_tokens_per_day is not None:
            checks.append((self.max_tokens_per_day, self._day_tokens, "day_tokens"))
        if self.max_cost_per_day_usd is not None:
            checks.append((self.max_cost_per_day_usd, self._day_cost, "day_cost_usd"))
        if model in self.max_tokens_per_model:
            checks.append((self.max_tokens_per_model[model], self._model_tokens.get(model, 0), f"model_{model}_tokens"))
        if model in self.max_cost_per_model_usd:
            checks.append(
                (self.max_cost_per_model_usd[model], self._model_cost.get(model, 0.0), f"model_{model}_cost_usd")
            )
        alerts: list[SeedAlert] = []
        for limit, used, limit_type in checks:
            pct = used / limit if limit else 0.0
            if pct >= 1.0:
                alert = SeedAlert(self.name, "critical", f"Budget EXCEEDED: {limit_type}", used, limit)
                self._alerts.append(alert)
                alerts.append(alert)
            elif pct >= self.alert_at_pct:
                alert = SeedAlert(self.name, "warning", f"Budget WARNING: {limit_type}", used, limit)
                self._alerts.append(alert)
                alerts.append(alert)
        return alerts


# KEYS[1] the event log; ARGV: now (ms), a unique member carrying the call's amounts, window (ms).
NAIVE_ZSET_LUA = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(ARGV[1]) - tonumber(ARGV[3])))
local n = redis.call('ZCARD', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return n
"""


class NaiveZsetBudget:
    """One sorted-set member per call in a rolling 24 h window (client clock, as such code does)."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key
        self.script = client.register_script(NAIVE_ZSET_LUA)
        self._seq = itertools.count()
        self.window_ms = DAY_SECONDS * 1000

    def args(self, now_ms: int, tokens: int, nano_usd: int) -> list[Any]:
        return [now_ms, f"{now_ms}:{next(self._seq)}:{tokens}:{nano_usd}", self.window_ms]

    def hit(self, tokens: int, nano_usd: int) -> int:
        now_ms = time.time_ns() // 1_000_000
        return int(self.script(keys=[self.key], args=self.args(now_ms, tokens, nano_usd)))
