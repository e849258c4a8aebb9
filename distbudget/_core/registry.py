"""The shared scope registry: a scope's whole config (limits, parent, alert thresholds, custom
rates) as JSON, stored under its name in one hash (``<prefix>:registry``), so any process finds a
scope by name. Pure: (de)serialisation and the rules ``lua/registry.lua`` applies on Redis, here
for the embedded engine.

Rules: a parent must be registered before its children; a registered scope's parent cannot change
(its counters live under its tree's hash tag) and a scope with children cannot be removed; trees
are at most ``MAX_DEPTH`` deep. So trees never change under running workers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from distbudget._core.errors import InvalidInputError, UnknownScopeError
from distbudget._core.prices import ModelRates
from distbudget._core.scope import BudgetScope, Limit

VERSION = 1
MAX_DEPTH = 16
_REFUSALS = {
    "missing": "parent scope {0!r} is not registered",
    "reparent": "scope is registered with parent {0!r}; remove it first to change its parent "
    "(its counters live under its tree's hash tag)",
    "reroot": "scope is registered as a root (no parent); remove it first to give it a parent "
    "(its counters live under its tree's hash tag)",
    "cycle": "scope {0!r} would be its own ancestor",
    "depth": "scope tree under {0!r} is deeper than 16 levels",
    "children": "scope has registered children (e.g. {0!r}); remove them first",
}


def parent_name(scope: BudgetScope) -> str | None:
    p = scope.parent
    return p.name if isinstance(p, BudgetScope) else p


def scope_config(scope: BudgetScope, rates: Mapping[str, ModelRates] | None) -> str:
    """The registry entry of a scope (canonical JSON: equal configs give equal strings)."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(scope):
        if f.name in ("name", "parent"):
            continue
        value = getattr(scope, f.name)
        if f.name == "limits":
            value = [dataclasses.asdict(lim) for lim in value]
        fields[f.name] = value
    table = None
    if rates is not None:
        if not isinstance(rates, Mapping):
            raise TypeError("rates must be a mapping of model name to ModelRates")
        table = {}
        for model, r in rates.items():
            if not isinstance(r, ModelRates):
                raise TypeError(f"rates[{model!r}] must be a ModelRates")
            table[model] = r.to_dict()
    entry = {"version": VERSION, "name": scope.name, "parent": parent_name(scope), "scope": fields, "rates": table}
    # Decimal amounts (accepted at the API edge) are stored as their exact decimal strings, which
    # BudgetScope and ModelRates accept back.
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), default=_exact)


def _exact(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in the registry")


def _decode(text: str | bytes) -> dict[str, Any]:
    entry = json.loads(text)
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        raise InvalidInputError(f"registry entry of an unknown version: {str(text)[:80]!r}")
    return entry


def from_chain(chain: Sequence[str | bytes]) -> tuple[BudgetScope, dict[str, ModelRates] | None]:
    """The scope (its ancestors as objects) and its rates from the configs of a scope, its parent,
    ... up to the root, as ``registry.lua`` returns them."""
    scope: BudgetScope | None = None
    rates: dict[str, ModelRates] | None = None
    for text in reversed(chain):
        entry = _decode(text)
        fields = dict(entry["scope"])
        fields["limits"] = [Limit(**lim) for lim in fields.get("limits", [])]
        scope = BudgetScope(name=entry["name"], parent=scope, **fields)
        table = entry["rates"]
        rates = None if table is None else {m: ModelRates.from_dict(r) for m, r in table.items()}
    if scope is None:
        raise UnknownScopeError("empty registry chain")
    return scope, rates


def refusal(reply: list[Any]) -> InvalidInputError | None:
    """The error of a refused registry operation (``{'err', reason, name}``), else None."""
    if len(reply) == 3 and reply[0] in ("err", b"err"):
        reason, name = (v.decode() if isinstance(v, bytes) else str(v) for v in reply[1:])
        if reason == "reparent" and not name:
            reason = "reroot"
        return InvalidInputError(_REFUSALS.get(reason, reason + " {0!r}").format(name))
    return None


def _chain(get: Callable[[str], str | None], start: str) -> tuple[list[str], str | None, bool]:
    """(configs from ``start`` up, the first missing name, too deep)."""
    out: list[str] = []
    n: str | None = start
    while n is not None:
        cfg = get(n)
        if cfg is None:
            return out, n, False
        out.append(cfg)
        if len(out) > MAX_DEPTH:
            return out, None, True
        n = json.loads(cfg)["parent"]
    return out, None, False


def _refusal(get: Callable[[str], str | None], name: str, config: str, old: str | None) -> list[str] | None:
    parent = json.loads(config)["parent"]
    if old is not None and json.loads(old)["parent"] != parent:
        return ["err", "reparent", json.loads(old)["parent"] or ""]
    if parent is not None:
        up, missing, deep = _chain(get, parent)
        if parent == name or any(json.loads(c)["name"] == name for c in up):
            return ["err", "cycle", name]
        if missing is not None:
            return ["err", "missing", missing]
        if deep or len(up) >= MAX_DEPTH:
            return ["err", "depth", parent]
    return None


def put(table: dict[str, str], triples: Sequence[str]) -> list[str]:
    pending: dict[str, str] = {}

    def get(n: str) -> str | None:
        return pending.get(n) or table.get(n)

    last = ""
    for i in range(0, len(triples), 3):
        name, config, mode = triples[i : i + 3]
        old = get(name)
        if not (mode == "a" and old is not None):
            err = _refusal(get, name, config, old)
            if err is not None:
                return err
            pending[name] = config
        last = name
    table.update(pending)
    return _chain(table.get, last)[0]


def remove(table: dict[str, str], name: str) -> list[str]:
    if name not in table:
        return []
    for child, cfg in table.items():
        if json.loads(cfg)["parent"] == name:
            return ["err", "children", child]
    del table[name]
    return ["ok"]


def put_args(scopes: Sequence[tuple[str, str, bool]]) -> tuple[str, ...]:
    """A 'put''s arguments: (name, config, only if absent) from the root down."""
    return tuple(v for name, config, absent in scopes for v in (name, config, "a" if absent else "w"))


def chain(table: dict[str, str], name: str) -> list[str]:
    """``lua/registry.lua``'s 'chain' for the embedded engine (as ``put`` and ``remove``; the caller
    holds the table's lock)."""
    found, missing, _ = _chain(table.get, name)
    return ["err", "missing", missing] if missing is not None and found else found
