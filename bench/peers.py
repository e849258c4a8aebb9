"""The contenders ``bench/run.py`` measures distbudget against (not distbudget's own code).

* :class:`SeedTracker`: the architecture of agent-budget, the in-process library distbudget grew
  from, reduced to what its ``record()`` does per call: price the call, build a record dataclass,
  then under one ``threading.Lock`` roll the day over, add to float counters (session, day, per
  model), append the record to an unbounded list, and walk every configured limit computing its
  percentage (alert / raise when crossed). Written here from that description, not copied.
* :class:`NaiveZsetBudget`: the event-log design distbudget avoids: one sorted-set member per call in
  a rolling 24 h window (ZADD, ZREMRANGEBYSCORE, ZCARD, PEXPIRE in one script). Cheapest variant:
  it counts calls with ZCARD instead of summing the members' amounts (a true token/cost budget would
  have to read every member on each call). Memory and trimming work grow with traffic.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DAY_SECONDS = 86400


class SeedBudgetExceeded(Exception):
    """The seed raised from inside ``record()`` once a hard limit was reached."""


@dataclass
class SeedRecord:
    session_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    timestamp: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeedAlert:
    scope: str
    level: str
    message: str
    used: float
    limit: float
    timestamp: float = field(default_factory=time.time)


class SeedTracker:
    """A dict-and-lock in-process tracker with session, day and per-model limits."""

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
        self.rates = rates  # model -> (USD per 1k input tokens, USD per 1k output tokens)
        self.max_tokens_per_session = max_tokens_per_session
        self.max_cost_per_session_usd = max_cost_per_session_usd
        self.max_tokens_per_day = max_tokens_per_day
        self.max_cost_per_day_usd = max_cost_per_day_usd
        self.max_tokens_per_model = max_tokens_per_model or {}
        self.max_cost_per_model_usd = max_cost_per_model_usd or {}
        self.alert_at_pct = alert_at_pct
        self.hard_stop = hard_stop
        self._lock = threading.Lock()
        self._session_tokens = 0
        self._session_cost = 0.0
        self._day_tokens = 0
        self._day_cost = 0.0
        self._day_start = time.time()
        self._model_tokens: dict[str, int] = {}
        self._model_cost: dict[str, float] = {}
        self._records: list[SeedRecord] = []
        self._alerts: list[SeedAlert] = []

    def record(
        self, session_id: str, model: str, input_tokens: int, output_tokens: int, metadata: dict[str, Any] | None = None
    ) -> SeedRecord:
        per_in, per_out = self.rates[model]
        cost = (input_tokens * per_in + output_tokens * per_out) / 1000.0
        tokens = input_tokens + output_tokens
        rec = SeedRecord(session_id, model, input_tokens, output_tokens, cost, metadata=metadata or {})
        with self._lock:
            if time.time() - self._day_start >= DAY_SECONDS:  # the seed's "day": a fixed 24 h from start
                self._day_tokens, self._day_cost, self._day_start = 0, 0.0, time.time()
            self._session_tokens += tokens
            self._session_cost += cost
            self._day_tokens += tokens
            self._day_cost += cost
            self._model_tokens[model] = self._model_tokens.get(model, 0) + tokens
            self._model_cost[model] = self._model_cost.get(model, 0.0) + cost
            self._records.append(rec)
            self._check(model)
        return rec

    def _check(self, model: str) -> None:
        checks: list[tuple[float, float, str]] = []
        if self.max_tokens_per_session is not None:
            checks.append((self.max_tokens_per_session, self._session_tokens, "session_tokens"))
        if self.max_cost_per_session_usd is not None:
            checks.append((self.max_cost_per_session_usd, self._session_cost, "session_cost_usd"))
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
        for limit, used, limit_type in checks:
            pct = used / limit if limit else 0.0
            if pct >= 1.0:
                alert = SeedAlert(self.name, "critical", f"Budget EXCEEDED: {limit_type}", used, limit)
                self._alerts.append(alert)
                if self.hard_stop:
                    raise SeedBudgetExceeded(alert.message)
            elif pct >= self.alert_at_pct:
                self._alerts.append(SeedAlert(self.name, "warning", f"Budget WARNING: {limit_type}", used, limit))


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
