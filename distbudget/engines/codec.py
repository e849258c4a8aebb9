"""The Redis engine's codec: operations to script calls (``KEYS`` / ``ARGV``), replies to results,
redis-py errors to classified :class:`BackendError`\\ s. No I/O: the engines in ``redis.py`` send
what this builds.

The wire format (the scripts in ``lua/`` decode it)
===================================================

Every script takes ``ARGV[1]`` the injected clock in µs (``''``: the server's ``TIME``),
``ARGV[2..4]`` the amounts (tokens, nano-USD, requests), ``ARGV[5..7]`` operation-specific, then the
plan from ``ARGV[8]``. ``KEYS[1]`` is the tree's holds hash, ``KEYS[2]`` its leases sorted set,
``KEYS[3..]`` the plan's hashes, each window's sorted set right after its hash (``record`` sends
the same without the first two, which it never touches). The charge scripts' ``KEYS`` end with the
tree's alert stream, its ledger stream and, when ``ARGV[5]`` (a request-id TTL in ms) is set, the
request key; their ``ARGV`` end with the ledger's ``MAXLEN`` and the entry's JSON (``''``: none).

===========  ===========================  ==========================================================
script       ARGV[5], [6], [7]            returns
===========  ===========================  ==========================================================
record       request TTL ms, -, alerts    ``0|now|totals|alerts|||alert ids|ledger id`` or
                                          ``1|now|||<µs> <tokens> <cost>`` (a duplicate request id)
commit       request TTL ms, hold, alerts the same with the hold's fate (``1``/``0``) in field 6
check        -, -, -                      ``{status, now, totals, held, refused + 1, retry µs,
                                          refusal alert id}``
reserve      -, hold id, TTL µs           the same
release      -, hold id, -                1 if the hold was live, else 0 (ARGV[2..4] the amounts held
                                          and ARGV[8], [9] a ledger entry when it was left uncommitted)
extend       -, hold id, TTL µs           1 if the hold was live (its lease now ends TTL from now)
summary      totals KEYS index, -, alerts ``{now, totals, held, HGETALL of the own totals hash,
                                          refusals per limit}``
reset        (its own ARGV, see below)    ``<tokens> <cost> <requests>|<ledger id>``
registry     (its own ARGV, see below)    a list of strings
===========  ===========================  ==========================================================

``alerts`` (``ARGV[7]``) is the plan's alert metadata (:func:`alert_meta`), decoded by the scripts
only when an alert fires. ``check`` and ``reserve`` take the charge scripts' ``KEYS`` (without a
request key) and end their ``ARGV`` with a refusal's four (``lua/include/refusal.lua``): ``1`` to
count a refusal (``''``: not), the alert metadata, the ledger's ``MAXLEN`` and the entry's head.
``reset``: ``KEYS`` = ledger stream, reported hash, deleted keys;
``ARGV`` = clock, ``session|model|scope``, the model's field prefix, ledger MAXLEN, entry JSON.
``registry``: ``KEYS[1]`` the registry hash; ``ARGV`` = ``put`` + (name, config, ``w|a``) triples,
``chain`` + name, ``remove`` + name, or ``swap`` + name, config read, config to write.

The plan (ARGV[8..]). The plan's counters and limits arrive grouped by hash, so that each hash is
read with one HMGET and written with at most one HSET. Every ARGV element costs the server more
than a ``tonumber()``, so the plan's numbers travel packed in ONE binary string, ``ARGV[8]`` (the
*shape*); ``ARGV[9..]`` carry only the strings Redis takes as arguments. The shape, big-endian
("small": 2 bytes; "big": 7 bytes, an integer below 2^53):

- hot part, read on every call: small H (length of the hot part), small ng (hashes), small N
  (counters), then per hash: byte kind (0 plain, 1 plain whose first counter has no field prefix,
  2 rolling window), byte ttl (1: the hash has an idle TTL), small nc (its counters), small nl
  (their limits), [window only: 3 bytes bucket seconds, 4 bytes window seconds] (a window hash
  holds one unprefixed counter); per counter: small result position (3 * plan counter index + 1),
  small nlc (its limits), then nlc times: small limit index, byte metric (1 tokens, 2 cost,
  3 requests), big first threshold (warn_at, or crit_at = max(value, 1) without a WARNING);
- cold part, from byte H + 1, read only when needed, 28 bytes per limit in plan order: big value,
  big warn_at + 1 (0: no WARNING), big warn_rearm + 1, big crit_rearm;
- padding: the shape is at least 3 * N bytes long (the scripts size their totals table from it).

``ARGV[9..]``, per hash: [its TTL in ms if ttl], the field names of its counters (prefix ..
``t``, ``c``, ``r``; none for an unprefixed first counter, which uses the literals), then its
limits' alert state fields (prefix .. ``a:`` .. limit name) in the order of the hot part.
Numbers are Lua doubles in the scripts: exact for integers below 2^53 (``MAX_AMOUNT``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import redis
import redis.exceptions as rx
from redis._parsers import BaseParser  # its parse_error: redis-py's error classes per code

from distbudget._core import ops
from distbudget._core.errors import BackendError, InvalidInputError
from distbudget._core.keys import alert_channels
from distbudget._core.money import MAX_AMOUNT
from distbudget._core.plan import US, Plan

R = TypeVar("R")

# What a redis-py call raises when Redis fails. The Cluster clients raise RedisClusterException (not a
# RedisError) when no node answers, and SlotNotCoveredError (one) when a slot has no node.
ERRORS = (redis.RedisError, rx.RedisClusterException)
# Redis answered, but with a refusal that means the command did not run and may run later.
_TRANSIENT_CODES = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "OOM", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
_TRANSIENT_TYPES = (rx.BusyLoadingError, rx.ReadOnlyError, rx.ClusterDownError, rx.TryAgainError, rx.OutOfMemoryError)
_PLAN_CACHE_SIZE = 4096


# ---- plans --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanWire:
    """A plan as the scripts take it, encoded once (UTF-8, as the client would: redis-py passes
    bytes through instead of encoding each argument per call)."""

    argv: tuple[bytes, ...]  # ARGV[8..]: the shape, then the strings
    charge_keys: tuple[bytes, ...]  # commit's KEYS: the plan's, then the alert and ledger streams
    record_keys: tuple[bytes, ...]  # record's: the same without the holds hash and leases
    alert_meta: bytes  # ARGV[7] of the charge scripts
    # The same as RESP bulk strings, for a charge packed by hand (see Codec.packed_charge)
    record_keys_resp: bytes = b""
    charge_keys_resp: bytes = b""
    tail_resp: bytes = b""  # ARGV[7..] up to the ledger's two: the alert metadata, the plan


def _bulk(value: str | int | bytes) -> bytes:
    """One RESP bulk string (a command argument as redis-py's packer writes it)."""
    b = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


_EMPTY = _bulk("")


def _num(v: int, size: int) -> bytes:
    if not 0 <= v < 1 << 8 * size:
        raise AssertionError(f"{v} does not fit the scripts' wire format")
    return v.to_bytes(size, "big")


def encode_plan(plan: Plan) -> PlanWire:
    """The plan's ``ARGV[8..]`` and KEYS (see the module docstring)."""
    counters, limits = plan.counters, plan.limits
    by_hash: dict[str, tuple[list[int], list[int]]] = {}
    for ci, c in enumerate(counters):
        by_hash.setdefault(c.hash_key, ([], []))[0].append(ci)
    for li, lim in enumerate(limits):
        by_hash[counters[lim.counter].hash_key][1].append(li)

    hot = bytearray(_num(len(by_hash), 2) + _num(len(counters), 2))
    strings: list[str | int] = []
    wire_keys: list[str] = [plan.keyspace.holds, plan.keyspace.leases]
    for hash_key, (cis, lis) in by_hash.items():
        first = counters[cis[0]]
        kind = 2 if first.zset_key else 1 if first.prefix == "" else 0
        if kind == 2 and (len(cis) != 1 or first.prefix):
            raise AssertionError(f"window hash {hash_key!r} must hold one unprefixed counter")
        ttl = max(counters[ci].ttl_ms for ci in cis)
        hot += _num(kind, 1) + _num(1 if ttl else 0, 1) + _num(len(cis), 2) + _num(len(lis), 2)
        if ttl:
            strings.append(ttl)
        wire_keys.append(hash_key)
        if first.zset_key:
            wire_keys.append(first.zset_key)
            if first.bucket_us % US or first.window_us % US:
                raise AssertionError("rolling windows are whole seconds")
            hot += _num(first.bucket_us // US, 3) + _num(first.window_us // US, 4)
        on: dict[int, list[int]] = {ci: [] for ci in cis}  # the limits on each counter of the hash
        for li in lis:
            on[limits[li].counter].append(li)
        names = [counters[ci].prefix + m for ci in cis for m in "tcr"]
        alerts = [counters[ci].prefix + "a:" + limits[li].limit_type for ci in cis for li in on[ci]]
        if len({*names, *alerts, *(["o"] if kind == 2 else [])}) != len(names) + len(alerts) + (kind == 2):
            raise AssertionError(f"duplicate fields in {hash_key!r}")
        strings += names[3 if kind else 0 :] + alerts  # an unprefixed first counter: the scripts' literals
        for ci in cis:
            hot += _num(3 * ci + 1, 2) + _num(len(on[ci]), 2)
            for li in on[ci]:
                lim = limits[li]
                if lim.crit_at != max(lim.value, 1) or lim.warn_at > lim.crit_at:
                    raise AssertionError(f"thresholds of {lim.limit_type!r} out of line")
                first_at = lim.warn_at if lim.warn_at >= 0 else lim.crit_at
                hot += _num(li + 1, 2) + _num(lim.metric + 1, 1) + _num(first_at, 7)
    cold = b"".join(
        _num(v, 7) for lim in limits for v in (lim.value, lim.warn_at + 1, lim.warn_rearm + 1, lim.crit_rearm)
    )
    if tuple(wire_keys) != plan.keys:
        raise AssertionError("plan keys out of the wire order")
    shape = _num(len(hot) + 2, 2) + hot + cold
    argv = (bytes(shape.ljust(3 * len(counters), b"\0")), *(str(v).encode() for v in strings))
    charge_keys = tuple(k.encode() for k in (*plan.keys, plan.keyspace.alerts, plan.keyspace.ledger))
    meta = alert_meta(plan).encode()
    return PlanWire(
        argv,
        charge_keys,
        charge_keys[2:],
        meta,
        b"".join(map(_bulk, charge_keys[2:])),
        b"".join(map(_bulk, charge_keys)),
        b"".join(map(_bulk, (meta, *argv))),
    )


def alert_meta(plan: Plan) -> str:
    """What the scripts need to publish an alert: per limit (scope, limit type, metric, value,
    position of its usage in the totals, the scope's channel, the level of its lower threshold),
    the field of its REFUSED alert's state in its counter's hash, the KEYS index of its scope's
    totals hash, where its refusals are counted), the requesting scope, the session, the model, the
    all-scopes channel, the alert stream's cap. Values are strings: Lua's JSON would print big
    integers in exponent form."""
    prefix = plan.keyspace.prefix
    key_index = {k: i + 1 for i, k in enumerate(plan.keys)}
    rows = [
        [
            lim.scope,
            lim.shown_type,
            ("tokens", "cost", "requests")[lim.metric],
            str(lim.shown_value),
            3 * lim.counter + lim.metric + 1,
            alert_channels(prefix, lim.scope)[1],
            "info" if lim.alert_of else "warning",
            plan.counters[lim.counter].prefix + "f:" + lim.limit_type,
            key_index[plan.keyspace.totals(lim.scope)],
        ]
        for lim in plan.limits
    ]
    everyone = alert_channels(prefix, "")[0]
    meta = {"l": rows, "r": plan.scope, "s": plan.session_id, "m": plan.model, "all": everyone}
    meta["n"] = str(plan.alert_maxlen)
    return json.dumps(meta, separators=(",", ":"))


# ---- operations ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ScriptCall(Generic[R]):
    """One script call: which script, its KEYS and ARGV, how to read its reply, and whether it
    charges or holds (followed by ``WAIT`` when the engine waits for replicas)."""

    script: str
    keys: tuple[str | bytes, ...]
    argv: list[str | int | bytes]
    parse: Callable[[Any], R]
    writes: bool = False


class Codec:
    """Encodes operations for one engine; keeps each plan's encoding (plans are built once per
    (session, model) by the budgets and reused)."""

    def __init__(self) -> None:
        self._plans: dict[int, tuple[Plan, PlanWire]] = {}
        # a charge's packed head (count, verb, script, KEYS) per (plan, verb, script, commit, request key)
        self._heads: dict[tuple[int, bytes, str, bool, bool], bytes] = {}

    def plan(self, plan: Plan) -> PlanWire:
        hit = self._plans.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1]
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.clear()
            self._heads.clear()
        wire = encode_plan(plan)
        self._plans[id(plan)] = (plan, wire)  # the plan is kept alive with its id
        return wire

    def encode(self, op: ops.Operation[R]) -> ScriptCall[R]:
        """The script call of an operation (``TypeError`` for one sent as plain commands): the
        table in the module docstring, as code."""
        call: ScriptCall[Any]
        if isinstance(op, ops.Record):
            wire = self.plan(op.plan)
            call = self._charge(op, wire, wire.record_keys, "")
        elif isinstance(op, ops.Commit):
            wire = self.plan(op.plan)
            call = self._charge(op, wire, wire.charge_keys, op.hold_id)
        elif isinstance(op, ops.Check):
            call = ScriptCall("check", *self._admission(op, "", ""), parse_admit)
        elif isinstance(op, ops.Reserve):
            call = ScriptCall("reserve", *self._admission(op, op.hold_id, op.ttl_us), parse_admit, True)
        elif isinstance(op, ops.Release):
            keys = (*op.plan.keys[:2], op.plan.keyspace.ledger) if op.ledger_entry else op.plan.keys[:2]
            held: list[str | int | bytes] = ["" if op.now_us is None else op.now_us, *op.amounts, "", op.hold_id]
            call = ScriptCall("release", keys, [*held, "", op.ledger_maxlen, op.ledger_entry], bool)
        elif isinstance(op, ops.Extend):
            lease: list[str | int | bytes] = ["" if op.now_us is None else op.now_us, 0, 0, 0, "", op.hold_id]
            call = ScriptCall("extend", op.plan.keys[:2], [*lease, op.ttl_us], bool)
        elif isinstance(op, ops.Summary):
            read_args = self._args(op, op.plan.totals_key_index, "", self.plan(op.plan).alert_meta)
            call = ScriptCall("summary", op.plan.keys, read_args, parse_summary)
        elif isinstance(op, ops.Reset):
            now = "" if op.now_us is None else op.now_us
            argv: list[str | int | bytes] = [now, op.what, op.field_prefix, op.ledger_maxlen, op.ledger_entry]
            call = ScriptCall("reset", op.keys, argv, parse_reset)
        elif isinstance(op, ops.RegistryPut):
            call = ScriptCall("registry", (op.key,), ["put", *op.triples], texts)
        elif isinstance(op, ops.RegistrySwap):
            call = ScriptCall("registry", (op.key,), ["swap", op.name, op.old, op.new], texts)
        elif isinstance(op, (ops.RegistryChain, ops.RegistryRemove)):
            what = "chain" if isinstance(op, ops.RegistryChain) else "remove"
            call = ScriptCall("registry", (op.key,), [what, op.name], texts)
        else:
            raise TypeError(f"{type(op).__name__} is not sent as a script")
        return cast("ScriptCall[R]", call)  # each branch encodes its own operation's result

    @staticmethod
    def packed_call(call: ScriptCall[Any], verb: bytes, target: str) -> bytes:
        """A script call as the bytes sent on the connection: ``EVALSHA`` (``target`` its script's
        sha) or ``FCALL`` (``target`` the library's function)."""
        head = b"*%d\r\n%b" % (len(call.keys) + len(call.argv) + 3, _bulk(verb))
        return b"".join((head, _bulk(target), _bulk(len(call.keys)), *map(_bulk, call.keys), *map(_bulk, call.argv)))

    def packed_charge(self, op: ops.Record | ops.Commit, verb: bytes, target: str) -> bytes:
        """The charge call of :meth:`encode` (``verb`` and ``target`` as for :meth:`packed_call`), as
        the bytes sent on the connection: its head (the argument count, the verb, the script, the
        plan's keys) is packed once per plan and script, the plan's arguments once per plan
        (``PlanWire``); the call's own values are packed here. redis-py's packer would take several
        times as long for the ~30 arguments (it encodes, measures and joins each one on every call)."""
        wire = self.plan(op.plan)
        commit = isinstance(op, ops.Commit)
        asked = op.request_key is not None
        a0, a1, a2 = op.amounts
        return b"".join(
            (
                self._charge_head(wire, verb, target, commit, asked),
                _bulk(op.request_key) if asked else b"",  # type: ignore[arg-type]  # asked: not None
                _EMPTY if op.now_us is None else _bulk(op.now_us),
                _bulk(a0),
                _bulk(a1),
                _bulk(a2),
                _bulk(op.request_ttl_ms) if asked else _EMPTY,
                _bulk(op.hold_id) if commit else _EMPTY,  # type: ignore[union-attr]  # a Commit's
                wire.tail_resp,
                _bulk(op.ledger_maxlen),
                _bulk(op.ledger_entry),
            )
        )

    def _charge_head(self, wire: PlanWire, verb: bytes, target: str, commit: bool, asked: bool) -> bytes:
        """A charge's packed head: the argument count, the verb, the script, the plan's keys (and
        the request key's place), once per plan, script, commit or record, with a request id or not."""
        cached = self._heads.get((id(wire), verb, target, commit, asked))
        if cached is None:
            keys, nkeys = (
                (wire.charge_keys_resp, len(wire.charge_keys))
                if commit
                else (wire.record_keys_resp, len(wire.record_keys))
            )
            nkeys += asked
            cached = b"".join(
                (b"*%d\r\n" % (nkeys + len(wire.argv) + 12), _bulk(verb), _bulk(target), _bulk(nkeys), keys)
            )
            self._heads[(id(wire), verb, target, commit, asked)] = cached
        return cached

    def record_wire(self, plan: Plan, verb: bytes, target: str, ledger_maxlen: int) -> RecordWire:
        """``record()``'s fast path: the plan's record call compiled once (see :class:`RecordWire`)."""
        wire = self.plan(plan)
        head = self._charge_head(wire, verb, target, False, False)
        # after the amounts: one request, no request TTL, no hold, the plan's arguments, the MAXLEN
        middle = b"".join((_bulk(1), _EMPTY, _EMPTY, wire.tail_resp, _bulk(ledger_maxlen)))
        return RecordWire(target, head, middle)

    def _args(
        self, op: ops.Check | ops.Reserve | ops.Summary, a5: str | int, a6: str, a7: str | int | bytes
    ) -> list[str | int | bytes]:
        amounts = (0, 0, 0) if isinstance(op, ops.Summary) else op.amounts
        return ["" if op.now_us is None else op.now_us, *amounts, a5, a6, a7, *self.plan(op.plan).argv]

    def _admission(
        self, op: ops.Check | ops.Reserve, a6: str, a7: str | int
    ) -> tuple[tuple[bytes, ...], list[str | int | bytes]]:
        """check / reserve: the charge scripts' KEYS; the plan's arguments, then a refusal's four
        (lua/include/refusal.lua)."""
        wire = self.plan(op.plan)
        now = "" if op.now_us is None else op.now_us
        refusal = ("1" if op.count else "", wire.alert_meta, op.ledger_maxlen, op.ledger_entry)
        return wire.charge_keys, [now, *op.amounts, "", a6, a7, *wire.argv, *refusal]

    @staticmethod
    def _charge(
        op: ops.Record | ops.Commit, wire: PlanWire, keys: tuple[bytes, ...], hold_id: str
    ) -> ScriptCall[ops.ChargeResult]:
        ttl: str | int = ""
        all_keys: tuple[str | bytes, ...] = keys
        if op.request_key is not None:
            all_keys, ttl = (*keys, op.request_key), op.request_ttl_ms
        now = "" if op.now_us is None else op.now_us
        argv = [now, *op.amounts, ttl, hold_id, wire.alert_meta, *wire.argv, op.ledger_maxlen, op.ledger_entry]
        return ScriptCall("commit" if hold_id else "record", all_keys, argv, parse_charge, True)


class RecordWire:
    """A plan's record call (:meth:`Codec.packed_charge` of a ``Record`` without a request id) with
    everything but the call's own values packed once: :meth:`pack` writes those (the injected
    clock, the tokens, the cost, the ledger entry). ``target`` is the script it calls (its sha, or
    the library's function): compiled again when that changes."""

    __slots__ = ("head", "middle", "target")

    def __init__(self, target: str, head: bytes, middle: bytes) -> None:
        self.target = target
        self.head = head  # up to the clock
        self.middle = middle  # from the requests (1) to the ledger's MAXLEN

    def pack(self, now_us: int | None, tokens: int, cost: int, entry: str) -> bytes:
        t, c, e = b"%d" % tokens, b"%d" % cost, entry.encode()
        now = _EMPTY if now_us is None else _bulk(now_us)
        return b"%b%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (
            self.head,
            now,
            len(t),
            t,
            len(c),
            c,
            self.middle,
            len(e),
            e,
        )


# ---- replies ------------------------------------------------------------------------------------


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def texts(raw: Any) -> list[str]:
    return [_text(v) for v in raw]


def _ints(values: object) -> tuple[int, ...]:
    """A list of integers, or one string of space-separated decimal integers (the scripts' totals)."""
    if isinstance(values, (bytes, str)):
        values = values.split()
    return tuple(map(int, values))  # type: ignore[call-overload]


def parse_charge(raw: object) -> ops.ChargeResult:
    """record / commit answer one string:
    ``status|now|totals|alerts|original|hold found|alert ids|ledger id``."""
    parts = _text(raw).split("|")
    parts += [""] * (8 - len(parts))
    status, now, totals, fired, original, found, ids, ledger_id = parts[:8]
    if status == "2":  # refused before anything was written: a counter would pass 2**53 - 1
        position = int(totals) - 1
        raise InvalidInputError(
            f"counter #{position // 3} ({('tokens', 'nano-USD', 'requests')[position % 3]}) would pass "
            f"{MAX_AMOUNT} (the largest amount a counter holds exactly): nothing was charged; reset the counter"
        )
    if status == "1":
        ts, tok, cost = original.split()
        return ops.ChargeResult(int(now), (), (), (int(ts), int(tok), int(cost)), found == "1")
    if not fired:  # the common answer: no alert crossed
        return ops.ChargeResult(int(now), tuple(map(int, totals.split())), (), None, found == "1", (), ledger_id)
    flat = _ints(fired)
    stream_ids = ids.split() or [""] * (len(flat) // 2)
    rows = sorted(((flat[k] - 1, flat[k + 1]), stream_ids[k // 2]) for k in range(0, len(flat), 2))  # by limit, level
    return ops.ChargeResult(
        int(now),
        _ints(totals),
        tuple(r[0] for r in rows),
        None,
        found == "1",
        tuple(r[1] for r in rows if r[1]),
        ledger_id,
    )


def plain_charge(raw: bytes, checks: tuple[tuple[int, int], ...]) -> tuple[int, str] | None:
    """``record()``'s fast path: a record answer that is a plain charge — charged, no alert fired,
    no usage at ``checks`` ((index in the totals, limit) pairs) above its limit — as (now µs, ledger
    id); None for any other answer (:func:`parse_charge` reads it, ``_finish_charge`` finishes it)."""
    parts = raw.split(b"|")
    if parts[0] != b"0" or parts[3] or len(parts) != 8:
        return None
    if checks:
        totals = parts[2].split()
        for k, value in checks:
            if int(totals[k]) > value:
                return None
    return int(parts[1]), parts[7].decode()


def parse_admit(raw: list[Any]) -> ops.AdmitResult:
    _status, now, totals, held, refused, retry, alert_id = raw
    alert = _text(alert_id)
    return ops.AdmitResult(int(now), _ints(totals), _ints(held), int(refused) - 1, int(retry), bool(alert), alert)


def parse_summary(raw: list[Any]) -> ops.SummaryResult:
    now, totals, held, flat, refusals = raw
    items = list(flat)
    pairs = {_text(items[k]): int(items[k + 1]) for k in range(0, len(items), 2)}
    return ops.SummaryResult(int(now), _ints(totals), _ints(held), pairs, _ints(refusals))


def parse_reset(raw: object) -> ops.ResetResult:
    amounts, _, ledger_id = _text(raw).partition("|")
    t, c, r = (int(v) for v in amounts.split())
    return ops.ResetResult((t, c, r), ledger_id)


def ledger_rows(raw: Any) -> list[tuple[str, dict[str, str]]]:
    """XRANGE's reply with every id, field and value as text."""
    return [(_text(entry_id), {_text(k): _text(v) for k, v in fields.items()}) for entry_id, fields in raw]


def _charged(raw: object) -> ops.ChargeResult | InvalidInputError:
    """One charge of a batch: its result, or the InvalidInputError of a charge the script refused (a
    counter would pass 2**53 - 1; nothing of it written) in its place: the others stand."""
    try:
        return parse_charge(raw)
    except InvalidInputError as err:
        return err


def charges(results: list[Any]) -> list[ops.ChargeResult | InvalidInputError]:
    """A pipelined batch of charges: their results. When the round trip itself failed (every call
    has the same error) that error is raised; when only some calls failed, a :class:`ops.BatchError`
    carrying each call's result or its classified error."""
    failed = [r for r in results if isinstance(r, Exception)]
    if not failed:
        return [_charged(r) for r in results]
    first = failed[0]
    if all(r is first for r in results):
        raise first
    per_call = [backend_error("record", r) if isinstance(r, Exception) else _charged(r) for r in results]
    msg = f"Redis record_many: {len(failed)} of {len(results)} charges failed (first: {first})"
    raise ops.BatchError(msg, per_call) from first


# ---- replies read by hand (RESP2 and RESP3) --------------------------------------------------------


class Short(Exception):
    """The bytes read so far end inside a reply."""


class Push(list[Any]):
    """A RESP3 push frame (a server's notification, not a reply), for the connection's parser."""


def error_reply(text: str) -> rx.RedisError:
    """An error reply as redis-py's parsers make it (the same class per error code); one meaning the
    connection is unusable (``max number of clients``, ...) is raised, as theirs do."""
    err: rx.RedisError = BaseParser.parse_error(text)  # type: ignore[no-untyped-call]
    if isinstance(err, rx.ConnectionError):
        raise err
    return err


def _sized(buf: bytes, after: int, size: int) -> tuple[bytes, int]:
    if len(buf) < after + size + 2:
        raise Short
    return buf[after : after + size], after + size + 2


def _items(buf: bytes, after: int, count: int) -> tuple[list[Any], int]:
    items = []
    for _ in range(count):
        item, after = _reply(buf, after)
        items.append(item)
    return items, after


def _reply(buf: bytes, pos: int) -> tuple[Any, int]:
    """The RESP2 or RESP3 reply starting at ``buf[pos]`` and the position after it, as redis-py's
    parsers read it with ``decode_responses`` off (an error reply: its exception, in place; a push
    frame: ``Push``); ``Short`` when it is not all there yet."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Short
    kind, line, after = buf[pos : pos + 1], buf[pos + 1 : end], end + 2
    value: Any = line  # +: a simple string
    if kind in b"$=!" and line == b"-1":
        value = None
    elif kind in b"$=!":  # a bulk string, a verbatim string (its format dropped), a bulk error
        value, after = _sized(buf, after, int(line))
        if kind == b"=":
            value = value[4:]
        elif kind == b"!":
            value = error_reply(value.decode("utf-8", errors="replace"))
    elif kind in b"*~>%":  # an array, a set, a push, a map
        count = int(line)
        value, after = (None, after) if count < 0 else _items(buf, after, 2 * count if kind == b"%" else count)
        if kind == b"%":
            value = dict(zip(value[::2], value[1::2], strict=True))
        elif kind == b">":
            value = Push(value)
    elif kind in b":(":
        value = int(line)
    elif kind == b",":
        value = float(line)
    elif kind == b"#":
        value = line == b"t"
    elif kind == b"_":
        value = None
    elif kind == b"-":
        value = error_reply(line.decode("utf-8", errors="replace"))
    elif kind != b"+":
        raise rx.InvalidResponse(f"Protocol Error: {buf[pos:end]!r}")
    return value, after


def whole_bulk(data: bytes) -> bytes | None:
    """The value of ``data`` when it is exactly one bulk string reply (a script's usual answer, read
    without the general parser), else None (``Replies`` reads it: another reply, or not all there)."""
    if data[:1] != b"$":
        return None
    end = data.find(b"\r\n")
    size = data[1:end]
    if end < 0 or not size.isdigit() or len(data) != end + int(size) + 4 or data[-2:] != b"\r\n":
        return None
    return data[end + 2 : -2]


class Replies:
    """The replies of ``want`` pipelined commands, from the bytes read for them (``feed``); the
    push frames met on the way in ``pushes`` (they are not replies)."""

    __slots__ = ("_buf", "got", "pushes", "want")

    def __init__(self, want: int) -> None:
        self.want = want
        self.got: list[Any] = []
        self.pushes: list[Push] = []
        self._buf = b""

    def feed(self, data: bytes) -> bool:
        """Take bytes read from the connection; True once every reply is complete. Bytes past the
        last reply are a protocol error (nothing else was asked)."""
        buf = self._buf + data if self._buf else data
        pos, got, size = 0, self.got, len(buf)
        try:
            while len(got) < self.want:
                if pos < size and buf[pos] == 36:  # a bulk string ($), the scripts' usual answer, read here
                    end = buf.find(b"\r\n", pos)
                    value_end = end + 2 + int(buf[pos + 1 : end]) if end > 0 else -1
                    if end + 2 <= value_end <= size - 2:  # (not a null: $-1)
                        got.append(buf[end + 2 : value_end])
                        pos = value_end + 2
                        continue
                reply, pos = _reply(buf, pos)
                (self.pushes if type(reply) is Push else got).append(reply)
        except Short:
            self._buf = buf[pos:]
            return False
        if pos != len(buf):
            raise rx.InvalidResponse("Protocol Error: bytes past the last reply")
        return True


# ---- errors -------------------------------------------------------------------------------------

_DOING: dict[type[Any], str] = {
    ops.Record: "record",
    ops.Commit: "commit",
    ops.RecordMany: "record_many",
    ops.Check: "check",
    ops.Reserve: "reserve",
    ops.Release: "release",
    ops.Extend: "extend",
    ops.Summary: "summary",
    ops.Reset: "reset",
    ops.RegistryPut: "registry",
    ops.RegistryChain: "registry",
    ops.RegistryRemove: "registry",
    ops.RegistrySwap: "registry",
    ops.RegistryNames: "listing the registry",
    ops.LedgerRead: "reading the ledger",
    ops.Announce: "registering the alert stream",
    ops.PricesRead: "reading the fleet price book",
    ops.PricesPush: "storing the fleet price book",
}


def doing(op: ops.Operation[Any]) -> str:
    """What an operation does, for error messages."""
    return _DOING[type(op)]


def backend_error(doing: str, cause: BaseException) -> BackendError:
    """``cause`` (a redis-py error) wrapped, with what the failure policy needs to know of it."""
    err = BackendError(f"Redis {doing} failed: {cause}")
    err.__cause__ = cause
    err.outage, err.maybe_sent = classify(cause)
    return err


def classify(cause: BaseException | None) -> tuple[bool, bool]:
    """(is Redis unavailable rather than answering an error, may the command have run)."""
    if isinstance(cause, rx.RedisClusterException):
        return _classify_cluster(cause)
    return _classify(cause)


def _classify_cluster(cause: rx.RedisClusterException) -> tuple[bool, bool]:
    """A Cluster client's own errors (not RedisErrors)."""
    context = cause.__context__
    if isinstance(context, (rx.ConnectionError, rx.TimeoutError)):
        # redis-py refreshes the slot map when a command's connection fails, and raises this in
        # place of that failure if no node answers: the command's failure says whether it was sent
        return _classify(context)
    text = str(cause)
    if isinstance(cause, rx.SlotNotCoveredError) or "cannot be connected" in text or "could not agree" in text:
        # no node answered (or none knows the slot): nothing was sent. Unless what the nodes
        # answered is a configuration error (a bad password, a TLS failure).
        inner = cause.__cause__
        return (False, False) if isinstance(inner, rx.RedisError) and not _classify(inner)[0] else (True, False)
    return False, False


def _classify(cause: BaseException | None) -> tuple[bool, bool]:
    if isinstance(cause, _TRANSIENT_TYPES):
        return True, False
    if isinstance(cause, (rx.AuthenticationError, rx.AuthorizationError)):
        return False, False
    if isinstance(cause, (rx.ConnectionError, rx.TimeoutError)):
        text = str(cause)
        if "certificate" in text.lower():  # TLS verification failed: a configuration error, not an outage
            return False, False
        # "Error 111 connecting to host:port", "Timeout connecting to server", pool exhausted: never sent
        never_sent = "connecting to" in text or isinstance(cause, rx.MaxConnectionsError)
        return True, not never_sent
    if isinstance(cause, rx.ResponseError):
        return str(cause).split(" ", 1)[0].upper() in _TRANSIENT_CODES, False
    return False, False
