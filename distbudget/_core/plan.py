"""The accounting core: turn a scope, a session and a model into one engine operation, and read
what the engine answers. Pure: no I/O, no clocks.

A :class:`Plan` lists the *counters* a call touches (each a hash, a field prefix and, for a rolling
window, a sorted set of buckets) and the *limits* checked against them (counter, metric, value, alert
thresholds). Both engines apply exactly this plan: the Redis engine's codec (``engines/codec.py``)
flattens it into ``KEYS``/``ARGV`` for the scripts in ``lua/``, the memory engine walks it in Python.
Every counter tracks three metrics: tokens, cost (nano-USD) and requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from distbudget._core import ledger
from distbudget._core.keys import KeySpace, model_prefix
from distbudget._core.money import MAX_AMOUNT
from distbudget._core.scope import BudgetScope, Limit, bucket_seconds

TOKENS, COST, REQUESTS = 0, 1, 2
METRIC_INDEX = {"tokens": TOKENS, "cost": COST, "requests": REQUESTS}
DAY = 86400
WARNING, CRITICAL = 1, 2  # alert levels as the engines report them (bits of the alert state)
# A fired alert re-arms only once usage is back below 90 % of its threshold (or on reset),
# so usage hovering around a threshold in a rolling window does not fire it again and again.
REARM = Fraction(9, 10)
US = 1_000_000


@dataclass(frozen=True, slots=True)
class Counter:
    hash_key: str
    prefix: str
    zset_key: str | None  # set for a rolling window
    bucket_us: int
    window_us: int
    ttl_ms: int  # 0: the key is owned (never expires)

    @property
    def id(self) -> str:
        """Identity of the counter inside the holds hash (the Lua scripts derive the same)."""
        return f"{self.hash_key}|{self.prefix}"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    scope: str
    limit_type: str
    counter: int
    metric: int
    value: int
    warn_at: int  # -1: no WARNING for this limit
    warn_rearm: int
    crit_at: int
    crit_rearm: int
    window: str | int
    model: str | None
    # An extra alert threshold of a scope rides on the engines as a limit that never refuses
    # (value and crit_at = MAX_AMOUNT) and warns at the threshold; it reports as ``alert_of``
    # (the real limit's type) at level INFO, against ``alert_limit`` (the real limit's value).
    alert_of: str | None = None
    alert_limit: int = 0

    @property
    def shown_type(self) -> str:
        return self.alert_of or self.limit_type

    @property
    def shown_value(self) -> int:
        return self.alert_limit if self.alert_of else self.value


# A tree's alert stream keeps about this many alerts (XADD MAXLEN ~; Budget(alert_stream_maxlen=)):
# a listener down for longer misses the oldest, and says how many (distbudget.alerts).
ALERT_STREAM_MAXLEN = 10_000


@dataclass(frozen=True, slots=True)
class Plan:
    scope: str
    session_id: str
    model: str | None
    # The holds hash, the leases, then each counter's hash (and, for a window, its sorted set right
    # after it) in the order counters were first met: the order of the scripts' KEYS.
    keys: tuple[str, ...]
    counters: tuple[Counter, ...]
    limits: tuple[LimitSpec, ...]
    totals_key_index: int  # 1-based KEYS index of the own scope's totals hash
    session_counter: int
    day_counter: int
    totals_counter: int
    keyspace: KeySpace
    ledger_head: str = ""  # the constant start of this plan's ledger entries (see _core/ledger.py)
    # For the Python side, per limit in plan order: (counter index, metric, value, first threshold:
    # warn_at, or crit_at without a WARNING), and the field the memory engine keeps its alert state in.
    checks: tuple[tuple[int, int, int, int], ...] = ()
    used_at: tuple[tuple[int, int], ...] = ()  # per limit: (its usage's index in the totals, its value)
    alert_fields: tuple[tuple[str, str, str], ...] = ()
    alert_maxlen: int = ALERT_STREAM_MAXLEN


def thresholds(value: int, warn_pct: Fraction | None) -> tuple[int, int, int, int]:
    """(warn_at, warn_rearm, crit_at, crit_rearm) in engine units; thresholds are at least 1."""
    crit_at = max(value, 1)
    crit_rearm = int(crit_at * REARM)
    if warn_pct is None:
        return -1, -1, crit_at, crit_rearm
    raw = value * warn_pct
    warn_at = max(-(-raw.numerator // raw.denominator), 1)
    return warn_at, int(warn_at * REARM), crit_at, crit_rearm


def build_plan(
    scope: BudgetScope,
    session_id: str,
    model: str | None,
    keyspace: KeySpace,
    session_ttl_ms: int,
    raw_model: str | None = None,
    canonical: Callable[[str], str] | None = None,
    alert_maxlen: int = ALERT_STREAM_MAXLEN,
) -> Plan:
    """The plan for a call on ``model`` (``None``: every limit, for summaries) in ``session_id``.
    ``model`` is the canonical id; ``raw_model`` the name as the caller gave it (for the ledger);
    ``canonical`` maps a limit's model to its canonical id (see _core/model_policy.py)."""

    def limit_model(lim: Limit) -> str | None:
        return lim.model if lim.model is None or canonical is None else canonical(lim.model)

    keys: list[str] = [keyspace.holds, keyspace.leases]
    key_index: dict[str, int] = {k: i + 1 for i, k in enumerate(keys)}
    counters: list[Counter] = []
    counter_index: dict[tuple[str, str], int] = {}

    def key(k: str) -> int:
        if k not in key_index:
            keys.append(k)
            key_index[k] = len(keys)
        return key_index[k]

    def counter(hash_key: str, prefix: str, zset_key: str | None = None, window_s: int = 0, ttl_ms: int = 0) -> int:
        ident = (hash_key, prefix)
        if ident not in counter_index:
            bucket_s = bucket_seconds(window_s) if zset_key else 0
            if zset_key:
                ttl_ms = (window_s + bucket_s + 3600) * 1000
            counters.append(Counter(hash_key, prefix, zset_key, bucket_s * US, window_s * US, ttl_ms))
            counter_index[ident] = len(counters) - 1
            key(hash_key)
            if zset_key:
                key(zset_key)
        return counter_index[ident]

    def window(scope_name: str, seconds: int, model_filter: str | None) -> int:
        hash_key, zset_key = keyspace.window(scope_name, seconds, model_filter)
        return counter(hash_key, "", zset_key, seconds)

    def limit_counter(sc: BudgetScope, lim: Limit) -> int:
        lim_model = limit_model(lim)
        if lim.window == "session":
            return counter(keyspace.session(sc.name, session_id), model_prefix(lim_model), ttl_ms=session_ttl_ms)
        if lim.window == "total":
            return counter(keyspace.totals(sc.name), model_prefix(lim_model))
        assert isinstance(lim.window, int)
        return window(sc.name, lim.window, lim_model)

    limits: list[LimitSpec] = []
    chain = [scope, *scope.ancestors()]
    own = {"session": 0, "day": 0, "totals": 0}
    for depth, sc in enumerate(chain):
        totals = counter(keyspace.totals(sc.name), "")
        day = window(sc.name, DAY, None)
        if model is not None:
            counter(keyspace.totals(sc.name), model_prefix(model))
        if depth == 0:
            own = {
                "session": counter(keyspace.session(sc.name, session_id), "", ttl_ms=session_ttl_ms),
                "day": day,
                "totals": totals,
            }
        warn = sc.warn_threshold()
        for lim in sc.all_limits():
            if model is not None and lim.model is not None and limit_model(lim) != model:
                continue
            value = lim.amount
            limits.append(
                LimitSpec(
                    sc.name,
                    lim.limit_type,
                    limit_counter(sc, lim),
                    METRIC_INDEX[lim.metric],
                    value,
                    *thresholds(value, warn),
                    lim.window,
                    lim.model,
                )
            )
            for pct in sc.extra_thresholds():
                at = max(-(-(value * pct.numerator) // pct.denominator), 1)
                limits.append(
                    LimitSpec(
                        sc.name,
                        f"{lim.limit_type}@{float(pct):g}",
                        limits[-1].counter,
                        METRIC_INDEX[lim.metric],
                        MAX_AMOUNT,
                        at,
                        int(at * REARM),
                        MAX_AMOUNT,
                        int(MAX_AMOUNT * REARM),
                        lim.window,
                        lim.model,
                        alert_of=lim.limit_type,
                        alert_limit=value,
                    )
                )

    return Plan(
        scope=scope.name,
        session_id=session_id,
        model=model,
        keys=tuple(keys),
        counters=tuple(counters),
        limits=tuple(limits),
        totals_key_index=key_index[keyspace.totals(scope.name)],
        session_counter=own["session"],
        day_counter=own["day"],
        totals_counter=own["totals"],
        keyspace=keyspace,
        ledger_head=ledger.head("charge", scope.name, [s.name for s in chain], session_id, raw_model or model, model),
        checks=tuple(
            (lim.counter, lim.metric, lim.value, lim.warn_at if lim.warn_at >= 0 else lim.crit_at) for lim in limits
        ),
        alert_fields=tuple(("a", counters[lim.counter].prefix, lim.limit_type) for lim in limits),
        used_at=tuple((3 * lim.counter + lim.metric, lim.value) for lim in limits),
        alert_maxlen=alert_maxlen,
    )


def used(plan: Plan, totals: tuple[int, ...], i: int) -> int:
    lim = plan.limits[i]
    return totals[3 * lim.counter + lim.metric]


def exceeded(plan: Plan, totals: tuple[int, ...]) -> list[int]:
    """Indices of limits whose usage is now over their value."""
    return [i for i, (k, value) in enumerate(plan.used_at) if totals[k] > value]
