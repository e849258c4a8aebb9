"""The accounting core: turn a scope, a session and a model into one engine operation, and read
what the engine answers. Pure: no I/O, no clocks.

A :class:`Plan` lists the *counters* a call touches (each a hash, a field prefix and, for a rolling
window, a sorted set of buckets) and the *limits* checked against them (counter, metric, value, alert
thresholds). Both engines apply exactly this plan: the Redis engine flattens it into ``KEYS``/``ARGV``
for the scripts in ``lua/``, the memory engine walks it in Python. Every counter tracks three metrics:
tokens, cost (nano-USD) and requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction

from distbudget._core import ledger
from distbudget._core.keys import KeySpace, alert_channels, model_prefix
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


@dataclass(frozen=True, slots=True)
class Plan:
    scope: str
    session_id: str
    model: str | None
    keys: tuple[str, ...]  # KEYS[1] holds, KEYS[2] leases, then the counters' keys
    counters: tuple[Counter, ...]
    limits: tuple[LimitSpec, ...]
    # The static tail of ARGV for the scripts (lua/include/scan.lua), encoded once (UTF-8, as the
    # client would): redis-py passes bytes through instead of encoding each argument per call.
    argv: tuple[bytes, ...]
    totals_key_index: int  # 1-based KEYS index of the own scope's totals hash
    session_counter: int
    day_counter: int
    totals_counter: int
    keyspace: KeySpace
    alert_meta: bytes = b""  # JSON the scripts decode only when an alert fires (see lua/include/alerts.lua)
    ledger_head: str = ""  # the constant start of this plan's ledger entries (see _core/ledger.py)
    # KEYS of the charge scripts, encoded once: commit's (the plan's keys, then the tree's alert and
    # ledger streams) and record's (the same without the holds hash and leases, which it never touches)
    charge_keys: tuple[bytes, ...] = ()
    record_keys: tuple[bytes, ...] = ()
    # For the Python side, per limit in plan order: (counter index, metric, value, first threshold:
    # warn_at, or crit_at without a WARNING), and the field the memory engine keeps its alert state in.
    checks: tuple[tuple[int, int, int, int], ...] = ()
    alert_fields: tuple[tuple[str, str, str], ...] = ()


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
) -> Plan:
    """The plan for a call on ``model`` (``None``: every limit, for summaries) in ``session_id``."""
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
        if lim.window == "session":
            return counter(keyspace.session(sc.name, session_id), model_prefix(lim.model), ttl_ms=session_ttl_ms)
        if lim.window == "total":
            return counter(keyspace.totals(sc.name), model_prefix(lim.model))
        assert isinstance(lim.window, int)
        return window(sc.name, lim.window, lim.model)

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
            if model is not None and lim.model is not None and lim.model != model:
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

    # The wire format (see lua/include/scan.lua): counters and limits grouped by hash, hashes in KEYS order;
    # every number packed in one binary shape, then only the strings Redis takes as arguments.
    by_hash: dict[str, tuple[list[int], list[int]]] = {}
    for ci, c in enumerate(counters):
        by_hash.setdefault(c.hash_key, ([], []))[0].append(ci)
    for li, lim_spec in enumerate(limits):
        by_hash[counters[lim_spec.counter].hash_key][1].append(li)

    def num(v: int, size: int) -> bytes:
        if not 0 <= v < 1 << 8 * size:
            raise AssertionError(f"{v} does not fit the scripts' wire format")
        return v.to_bytes(size, "big")

    hot = bytearray(num(len(by_hash), 2) + num(len(counters), 2))
    cold = bytearray()
    strings: list[str | int] = []
    wire_keys: list[str] = [keyspace.holds, keyspace.leases]
    for hash_key, (cis, lis) in by_hash.items():
        first = counters[cis[0]]
        kind = 2 if first.zset_key else 1 if first.prefix == "" else 0
        if kind == 2 and (len(cis) != 1 or first.prefix):
            raise AssertionError(f"window hash {hash_key!r} must hold one unprefixed counter")
        ttl = max(counters[ci].ttl_ms for ci in cis)
        hot += num(kind, 1) + num(1 if ttl else 0, 1) + num(len(cis), 2) + num(len(lis), 2)
        if ttl:
            strings.append(ttl)
        wire_keys.append(hash_key)
        if first.zset_key:
            wire_keys.append(first.zset_key)
            if first.bucket_us % US or first.window_us % US:
                raise AssertionError("rolling windows are whole seconds")
            hot += num(first.bucket_us // US, 3) + num(first.window_us // US, 4)
        on: dict[int, list[int]] = {ci: [] for ci in cis}  # the limits on each counter of the hash
        for li in lis:
            on[limits[li].counter].append(li)
        names = [counters[ci].prefix + m for ci in cis for m in "tcr"]
        alerts = [counters[ci].prefix + "a:" + limits[li].limit_type for ci in cis for li in on[ci]]
        if len({*names, *alerts, *(["o"] if kind == 2 else [])}) != len(names) + len(alerts) + (kind == 2):
            raise AssertionError(f"duplicate fields in {hash_key!r}")
        strings += names[3 if kind else 0 :] + alerts  # an unprefixed first counter: the scripts' literals
        for ci in cis:
            hot += num(3 * ci + 1, 2) + num(len(on[ci]), 2)
            for li in on[ci]:
                lim_spec = limits[li]
                if lim_spec.crit_at != max(lim_spec.value, 1) or lim_spec.warn_at > lim_spec.crit_at:
                    raise AssertionError(f"thresholds of {lim_spec.limit_type!r} out of line")
                first_at = lim_spec.warn_at if lim_spec.warn_at >= 0 else lim_spec.crit_at
                hot += num(li + 1, 2) + num(lim_spec.metric + 1, 1) + num(first_at, 7)
    for lim_spec in limits:
        cold += b"".join(
            num(v, 7) for v in (lim_spec.value, lim_spec.warn_at + 1, lim_spec.warn_rearm + 1, lim_spec.crit_rearm)
        )
    if wire_keys != keys:
        raise AssertionError("plan keys out of the wire order")
    shape = num(len(hot) + 2, 2) + hot + cold
    argv = (bytes(shape.ljust(3 * len(counters), b"\0")), *(str(v).encode() for v in strings))
    charge_keys = tuple(k.encode() for k in (*keys, keyspace.alerts, keyspace.ledger))
    return Plan(
        scope=scope.name,
        session_id=session_id,
        model=model,
        keys=tuple(keys),
        counters=tuple(counters),
        limits=tuple(limits),
        argv=argv,
        totals_key_index=key_index[keyspace.totals(scope.name)],
        session_counter=own["session"],
        day_counter=own["day"],
        totals_counter=own["totals"],
        keyspace=keyspace,
        alert_meta=alert_meta(keyspace, session_id, model, limits).encode(),
        ledger_head=ledger.head("charge", scope.name, [s.name for s in chain], session_id, model),
        charge_keys=charge_keys,
        record_keys=charge_keys[2:],
        checks=tuple(
            (lim.counter, lim.metric, lim.value, lim.warn_at if lim.warn_at >= 0 else lim.crit_at) for lim in limits
        ),
        alert_fields=tuple(("a", counters[lim.counter].prefix, lim.limit_type) for lim in limits),
    )


def alert_meta(keyspace: KeySpace, session_id: str, model: str | None, limits: list[LimitSpec]) -> str:
    """What the scripts need to publish an alert: per limit (scope, limit type, metric, value,
    position of its usage in the totals, the scope's channel, the level of its lower threshold),
    the session, the model, the all-scopes channel. Values are strings: Lua's JSON would print big
    integers in exponent form."""
    everyone = alert_channels(keyspace.prefix, "")[0]
    rows = [
        [
            lim.scope,
            lim.shown_type,
            ("tokens", "cost", "requests")[lim.metric],
            str(lim.shown_value),
            3 * lim.counter + lim.metric + 1,
            alert_channels(keyspace.prefix, lim.scope)[1],
            "info" if lim.alert_of else "warning",
        ]
        for lim in limits
    ]
    return json.dumps({"l": rows, "s": session_id, "m": model, "all": everyone}, separators=(",", ":"))


# ---- what the engines answer (both engines return exactly these shapes) -------------------------


# The results are plain slotted dataclasses, not frozen ones: one is built per operation, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs ~4x as much. Nothing mutates them.
@dataclass(slots=True)
class ChargeResult:
    """record / commit. ``totals``: 3 values (tokens, cost, requests) per counter after the charge.
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
    """check / reserve. ``refused``: index of the first limit that refused (-1 none);
    ``retry_us``: when a rolling window will have freed enough (-1 if it never will by itself)."""

    now_us: int
    totals: tuple[int, ...]
    held: tuple[int, ...]
    refused: int
    retry_us: int


@dataclass(slots=True)
class SummaryResult:
    now_us: int
    totals: tuple[int, ...]
    held: tuple[int, ...]
    scope_totals: dict[str, int]  # the own totals hash: "t"/"c"/"r" and "m:<model>:<metric>"


def used(plan: Plan, totals: tuple[int, ...], i: int) -> int:
    lim = plan.limits[i]
    return totals[3 * lim.counter + lim.metric]


def exceeded(plan: Plan, totals: tuple[int, ...]) -> list[int]:
    """Indices of limits whose usage is now over their value."""
    return [i for i, (c, m, value, _) in enumerate(plan.checks) if totals[3 * c + m] > value]


# ---- the Redis scripts' wire format (see lua/include/scan.lua) ---------------------------------


def script_args(
    plan: Plan,
    now_us: int | None,
    amounts: tuple[int, int, int],
    a5: str | int = "",
    a6: str = "",
    a7: str | int | bytes = "",
    *tail: str | int,
) -> list[str | int | bytes]:
    """ARGV of a script: ARGV[1..7], the plan, then ``tail`` (the charge scripts' ledger arguments)."""
    return ["" if now_us is None else now_us, *amounts, a5, a6, a7, *plan.argv, *tail]


def _ints(values: object) -> tuple[int, ...]:
    """A list of integers, or one string of space-separated decimal integers (the scripts' totals)."""
    if isinstance(values, (bytes, str)):
        values = values.split()
    return tuple(map(int, values))  # type: ignore[call-overload]


def _original(raw: object) -> tuple[int, int, int]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    ts, tok, cost = text.split()
    return int(ts), int(tok), int(cost)


def parse_charge(raw: object) -> ChargeResult:
    """record / commit answer one string:
    ``status|now|totals|alerts|original|hold found|alert ids|ledger id``."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    parts = text.split("|")
    parts += [""] * (8 - len(parts))
    status, now, totals, fired, original, found, ids, ledger_id = parts[:8]
    if status == "1":
        return ChargeResult(int(now), (), (), _original(original), found == "1")
    if not fired:  # the common answer: no alert crossed
        return ChargeResult(int(now), tuple(map(int, totals.split())), (), None, found == "1", (), ledger_id)
    flat = _ints(fired)
    stream_ids = ids.split() or [""] * (len(flat) // 2)
    rows = sorted(((flat[k] - 1, flat[k + 1]), stream_ids[k // 2]) for k in range(0, len(flat), 2))  # by limit, level
    return ChargeResult(
        int(now),
        _ints(totals),
        tuple(r[0] for r in rows),
        None,
        found == "1",
        tuple(r[1] for r in rows if r[1]),
        ledger_id,
    )


def parse_admit(raw: list[object]) -> AdmitResult:
    _status, now, totals, held, refused, retry = raw
    return AdmitResult(int(now), _ints(totals), _ints(held), int(refused) - 1, int(retry))  # type: ignore[call-overload]


def parse_summary(raw: list[object]) -> SummaryResult:
    now, totals, held, flat = raw
    pairs: dict[str, int] = {}
    items = list(flat)  # type: ignore[call-overload]
    for k in range(0, len(items), 2):
        f = items[k].decode() if isinstance(items[k], bytes) else str(items[k])
        pairs[f] = int(items[k + 1])
    return SummaryResult(int(now), _ints(totals), _ints(held), pairs)  # type: ignore[call-overload]
