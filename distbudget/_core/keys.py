"""Every Redis key distbudget uses is built here, and only here.

Layout (``<p>`` the prefix, ``<tag>`` the percent-encoded name of the scope tree's root, names
percent-encoded so no user string can contain ``:``, ``{`` or ``}``):

    <p>:{<tag>}:t:<scope>                  hash   cumulative totals (all models + per model); owned
    <p>:{<tag>}:s:<scope>:<session>        hash   one session's counters; idle TTL
    <p>:{<tag>}:w:<scope>:<secs>:<model|*> hash   a rolling window: bucket amounts + running totals; TTL
    <p>:{<tag>}:z:<scope>:<secs>:<model|*> zset   that window's bucket ids; TTL = window + 1 h
    <p>:{<tag>}:holds                      hash   live reservations and held amounts per counter
    <p>:{<tag>}:leases                     zset   reservation id -> expiry (µs)
    <p>:{<tag>}:rq:<scope>:<request id>    string an idempotency marker (per scope); TTL
    <p>:{<tag>}:alerts                     stream the tree's alerts, capped (MAXLEN ~ alert_stream_maxlen); owned
    <p>:{<tag>}:ledger                     stream the tree's charges and resets, capped (MAXLEN ~); owned
    <p>:{<tag>}:alerts:done:<group>        zset   alert ids a listener group handled, capped; TTL 7 days
    <p>:{<tag>}:alerts:dead:<group>        stream alerts a listener group gave up on, capped; owned
    <p>:{<tag>}:alerts:gaps:<group>        string alerts the group is known to have missed (reported); owned
    <p>:alert-streams                      hash   scope -> its tree's alert stream (for listeners); owned
    <p>:registry                           hash   scope -> its config JSON (the shared registry); owned

Pub/sub channels (not keys): ``<p>:alerts`` (every scope) and ``<p>:alerts:<scope>``.

All keys of one tree share the ``{<tag>}`` hash tag, so a tree lives on one Cluster shard and every
script's keys are in one slot.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from distbudget._core.errors import InvalidInputError


def encode(name: str) -> str:
    """Percent-encode a user name: the result has no ``:``, ``{``, ``}``, ``*``, ``|`` or spaces."""
    return quote(name, safe="-_.~")


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError("prefix must be a str")
    if not prefix or len(prefix) > 64 or any(c in prefix for c in "{}\n\r\t |") or prefix.isspace():
        raise InvalidInputError(f"prefix must be 1-64 characters without braces, spaces or '|': {prefix!r}")
    return prefix


class KeySpace:
    """Key builder for one scope tree (``root`` is the topmost scope's name)."""

    __slots__ = ("alerts", "base", "holds", "leases", "ledger", "prefix")

    def __init__(self, prefix: str, root: str) -> None:
        self.prefix = check_prefix(prefix)
        self.base = base = f"{prefix}:{{{encode(root)}}}:"
        self.holds = f"{base}holds"  # reservations: hold id -> amounts and counters
        self.leases = f"{base}leases"  # sorted set: hold id by expiry
        self.alerts = f"{base}alerts"  # the tree's alert stream
        self.ledger = f"{base}ledger"  # the tree's usage ledger (a capped stream)

    def totals(self, scope: str) -> str:
        return f"{self.base}t:{encode(scope)}"

    def session(self, scope: str, session_id: str) -> str:
        return f"{self.base}s:{encode(scope)}:{encode(session_id)}"

    def window(self, scope: str, seconds: int, model: str | None) -> tuple[str, str]:
        """(hash key, sorted-set key) of a rolling window."""
        tail = f"{encode(scope)}:{seconds}:{'*' if model is None else encode(model)}"
        return f"{self.base}w:{tail}", f"{self.base}z:{tail}"

    def request(self, scope: str, request_id: str) -> str:
        return f"{self.base}rq:{encode(scope)}:{encode(request_id)}"


def alert_index_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}:alert-streams"


def alert_group_key(stream: str, group: str, kind: str) -> str:
    """A listener group's key beside a tree's alert stream (same hash tag): ``done``, ``dead`` or ``gaps``."""
    if kind not in ("done", "dead", "gaps"):
        raise ValueError(f"unknown listener group key {kind!r}")
    return f"{stream}:{kind}:{encode(group)}"


def registry_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}:registry"


def alert_channels(prefix: str, scope: str) -> tuple[str, str]:
    """(the channel for every scope, the channel for this scope)."""
    return f"{prefix}:alerts", f"{prefix}:alerts:{encode(scope)}"


def model_prefix(model: str | None) -> str:
    """Hash-field prefix of a per-model counter inside a totals or session hash."""
    return "" if model is None else f"m:{encode(model)}:"


def decode_model_field(field: str) -> tuple[str, str] | None:
    """``m:<model>:<metric>`` -> (model, metric); anything else -> None."""
    if not field.startswith("m:"):
        return None
    body, _, metric = field[2:].rpartition(":")
    if not body or ":" in body or metric not in ("t", "c", "r"):  # encoded names hold no ':'
        return None
    return unquote(body), metric
