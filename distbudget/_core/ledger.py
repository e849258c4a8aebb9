"""The usage ledger: every charge and every reset of a scope tree, appended to the tree's capped
stream (``<prefix>:{<root>}:ledger``) in the same atomic step as the counters change. Pure: builds
the entries the engines append and reads back what they stored.

An entry has four stream fields: ``d`` (this JSON: what happened), ``ts`` (the engine's clock, µs)
and the amounts ``t`` / ``c`` / ``r`` (tokens, nano-USD, requests: charged, or for a reset the
amounts it zeroed). While nothing was trimmed, the charges of a scope and its descendants minus the
scope's resets equal its counters.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from distbudget._core.money import nano_to_usd
from distbudget._core.types import UsageRecord

DEFAULT_MAXLEN = 100_000
US = 1_000_000

# Metadata is the caller's: anything JSON cannot encode (datetime, Decimal, sets ...) is stored as its
# str(), so what record() accepts never depends on the ledger.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


class _OpIds:
    """Unique ids for ledger entries, cheap to make: a random per-process prefix and a counter
    (fresh after ``fork``, so two workers never share one)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.prefix = uuid.uuid4().hex[:16]
        self.count = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.count)}"


op_ids = _OpIds()


def head(
    kind: str,
    scope: str,
    path: list[str],
    session_id: str | None,
    model: str | None,
    canonical_model: str | None = None,
) -> str:
    """The constant start of an entry's JSON (no closing brace), computed once per plan. ``model`` is
    the name as the caller gave it, ``canonical_model`` the id counters are keyed by (when it differs)."""
    fields: dict[str, Any] = {"kind": kind, "scope": scope, "path": path, "session_id": session_id, "model": model}
    if canonical_model is not None and canonical_model != model:
        fields["canonical_model"] = canonical_model
    return _dumps(fields)[:-1]


def charge_entry(
    entry_head: str,
    input_tokens: int,
    output_tokens: int,
    extra_tokens: tuple[int, int, int],
    request_id: str | None,
    hold_id: str | None,
    metadata: dict[str, Any] | None,
    uncommitted: str | None = None,
) -> str:
    """The ``d`` field of a charge. ``uncommitted``: why a hold was charged without a commit
    (``"exit"``: its block was left uncommitted under ``on_uncommitted="charge_hold"``;
    ``"commit_refused"``: its block was left by the exception of a refused commit)."""
    parts = [plain_charge(entry_head, op_ids.next(), input_tokens, output_tokens)[:-1]]
    if any(extra_tokens):
        cached, written, reasoning = extra_tokens
        parts.append(f',"cached_input_tokens":{cached},"cache_write_tokens":{written},"reasoning_tokens":{reasoning}')
    if request_id is not None:
        parts.append(',"request_id":' + _dumps(request_id))
    if hold_id is not None:
        parts.append(f',"hold_id":"{hold_id}"')
    if metadata:
        parts.append(',"metadata":' + _dumps(metadata))
    if uncommitted is not None:
        parts.append(f',"uncommitted":"{uncommitted}"')
    parts.append("}")
    return "".join(parts)


def plain_charge(entry_head: str, op: str, input_tokens: int, output_tokens: int) -> str:
    """The ``d`` field of a plain charge (no cache or reasoning tokens, request id, hold, metadata):
    what ``charge_entry`` makes of it. The embedded engine's fast path keeps such a charge's parts
    and makes its JSON here only when the ledger is read."""
    return f'{entry_head},"op":"{op}","input_tokens":{input_tokens},"output_tokens":{output_tokens}}}'


def released_entry(entry_head: str, hold_id: str, request_id: str | None) -> str:
    """The ``d`` field of a hold released without a commit (``kind="released_uncommitted"``; its
    amounts are what the hold held; it counts against nothing). ``entry_head``: a charge's head."""
    head_ = entry_head.replace('"kind":"charge"', '"kind":"released_uncommitted"', 1)
    rid = "" if request_id is None else ',"request_id":' + _dumps(request_id)
    return f'{head_},"op":"{op_ids.next()}","hold_id":"{hold_id}"{rid}}}'


def refusal_head(entry_head: str, operation: str, input_tokens: int, output_tokens: int) -> str:
    """The start of a refusal's ``d`` field (``kind="refusal"``: the tokens the call asked for; its
    amounts are 0, it charged nothing). The engine that refuses the call ends it with the refusing
    limit (:func:`refusal_end`). ``entry_head``: a charge's head; ``operation``: ``check`` or ``reserve``."""
    head_ = entry_head.replace('"kind":"charge"', '"kind":"refusal"', 1)
    tokens = f'"input_tokens":{input_tokens},"output_tokens":{output_tokens}'
    return f'{head_},"op":"{op_ids.next()}","operation":"{operation}",{tokens}'


def refusal_end(limit_scope: str, limit_type: str) -> str:
    """The end of a refusal's ``d`` field: the limit that refused it (``lua/include/refusal.lua``
    writes the same)."""
    return f',"limit_scope":{_dumps(limit_scope)},"limit_type":{_dumps(limit_type)}}}'


def reset_entry(what: str, scope: str, path: list[str], session_id: str | None, model: str | None) -> str:
    return _dumps(
        {"kind": "reset", "what": what, "scope": scope, "path": path, "session_id": session_id, "model": model}
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger entry: a charge (``kind="charge"``), a reset (``kind="reset"``, ``what`` is
    ``"session"``, ``"model"`` or ``"scope"``, the amounts are what it zeroed) or a refusal
    (``kind="refusal"``: ``operation`` (``check`` / ``reserve``) refused by ``limit_type`` of
    ``limit_scope``; ``input_tokens`` / ``output_tokens`` are what the call asked for, its amounts 0:
    the ledger's amounts always sum to what was charged)."""

    id: str
    kind: str
    scope: str
    path: tuple[str, ...]
    session_id: str | None
    model: str | None
    tokens: int
    cost_nano_usd: int
    requests: int
    timestamp: float
    input_tokens: int = 0
    output_tokens: int = 0
    request_id: str | None = None
    hold_id: str | None = None
    what: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    op: str | None = None
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    canonical_model: str | None = None  # the id counters are keyed by (``model`` is as given)
    uncommitted: str | None = None  # a hold charged without a commit: "exit" or "commit_refused"
    limit_scope: str | None = None  # a refusal's: the scope whose limit refused the call
    limit_type: str | None = None
    operation: str | None = None

    @property
    def cost_usd(self) -> float:
        return nano_to_usd(self.cost_nano_usd)

    def counts_for(self, scope: str) -> bool:
        """Does this charge count against ``scope`` (the scope itself or an ancestor)?"""
        return scope in self.path

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["path"] = list(self.path)
        out["cost_usd"] = self.cost_usd
        return out

    def as_record(self) -> UsageRecord:
        return UsageRecord(
            self.session_id or "",
            self.model or "",
            self.input_tokens,
            self.output_tokens,
            self.cost_usd,
            self.timestamp,
            dict(self.metadata),
            self.scope,
            self.cost_nano_usd,
            self.request_id,
            cached_input_tokens=self.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
            canonical_model=self.canonical_model or self.model or "",
        )


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def parse_entry(entry_id: object, fields: dict[Any, Any]) -> LedgerEntry:
    f = {_text(k): _text(v) for k, v in fields.items()}
    d = json.loads(f["d"])
    return LedgerEntry(
        id=_text(entry_id),
        kind=d["kind"],
        scope=d["scope"],
        path=tuple(d["path"]),
        session_id=d.get("session_id"),
        model=d.get("model"),
        tokens=int(f["t"]),
        cost_nano_usd=int(f["c"]),
        requests=int(f["r"]),
        timestamp=int(f["ts"]) / US,
        input_tokens=d.get("input_tokens", 0),
        output_tokens=d.get("output_tokens", 0),
        request_id=d.get("request_id"),
        hold_id=d.get("hold_id"),
        what=d.get("what"),
        metadata=d.get("metadata") or {},
        op=d.get("op"),
        cached_input_tokens=d.get("cached_input_tokens", 0),
        cache_write_tokens=d.get("cache_write_tokens", 0),
        reasoning_tokens=d.get("reasoning_tokens", 0),
        canonical_model=d.get("canonical_model", d.get("model")),
        uncommitted=d.get("uncommitted"),
        limit_scope=d.get("limit_scope"),
        limit_type=d.get("limit_type"),
        operation=d.get("operation"),
    )


def since_id(since: object) -> str:
    """The exclusive start of a ledger read: ``None`` (everything), an entry id (after it), or a
    time in seconds since the epoch (entries appended at or after it, by the server's clock)."""
    if since is None:
        return "-"
    if isinstance(since, datetime.datetime):
        since = since.timestamp()
    if isinstance(since, str):
        ms, _, seq = since.partition("-")
        if not ms.isdigit() or (seq and not seq.isdigit()):
            raise ValueError(f"since must be a ledger entry id like '1700000000000-0', got {since!r}")
        return "(" + since
    if isinstance(since, bool) or not isinstance(since, (int, float)) or not since >= 0:
        raise TypeError(f"since must be None, a ledger entry id or seconds since the epoch, got {since!r}")
    return str(int(since * 1000))
