"""Live changes: ``BudgetManager.update(name, **fields)`` changes only the named fields of a
registered scope's config and keeps the rest. Pure: the merge of a registry entry with the changes,
validated as a whole before anything is written, and the compare-and-swap the engines apply.

The swap is optimistic: a worker merges the entry it read and writes the result only if the entry
is still the one it read (else it re-reads and merges again), so two updates of different fields
made at once both land, and no update is ever lost or half applied.

Fields: every :class:`BudgetScope` field but ``name`` and ``parent`` (a scope's counters live under
its tree's hash tag: re-parenting is remove + register), and ``rates`` (the scope's custom rates,
replaced as a whole; ``rates=None`` drops them). A field is replaced as a whole: ``limits=[...]`` is
the new list of limits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from distbudget._core import registry as R
from distbudget._core.errors import InvalidInputError
from distbudget._core.prices import ModelRates
from distbudget._core.scope import BudgetScope, Limit

T = TypeVar("T")
CHANGED = "changed"  # the swap's answer when the entry changed since it was read
UPDATABLE = frozenset({f.name for f in dataclasses.fields(BudgetScope)} - {"name", "parent"} | {"rates"})


def check_changes(changes: Mapping[str, Any]) -> None:
    if not changes:
        raise InvalidInputError(f"update needs at least one field to change: any of {sorted(UPDATABLE)}")
    if "parent" in changes:
        raise InvalidInputError(
            "a scope's parent cannot be updated (its counters live under its tree's hash tag): remove it and "
            "register it again"
        )
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise InvalidInputError(f"cannot update {sorted(unknown)}: fields are {sorted(UPDATABLE)}")


def merge(old_config: str | bytes, changes: Mapping[str, Any]) -> str:
    """The registry entry ``old_config`` with ``changes`` applied: validated as a whole (a bad value
    raises here, before anything is written), in the registry's canonical JSON."""
    check_changes(changes)
    scope, rates = R.from_chain([old_config])
    parent = json.loads(old_config)["parent"]
    fields = {k: v for k, v in changes.items() if k != "rates"}
    new_scope = dataclasses.replace(scope, parent=parent, **fields)
    new_rates: Mapping[str, ModelRates] | None = changes.get("rates", rates)
    return R.scope_config(new_scope, new_rates)


def swap(table: dict[str, str], name: str, old: str, new: str) -> list[str]:
    """The registry's compare-and-swap on a dict (the embedded engine; ``lua/registry.lua`` on
    Redis): when ``name``'s entry is still ``old``, write ``new`` and return the scope's chain (as
    the registry's ``chain`` does); ``["changed"]`` when another update came first; ``[]`` when the
    scope is not registered."""
    current = table.get(name)
    if current is None:
        return []
    if current != old:
        return [CHANGED]
    table[name] = new
    return R.chain(table, name)


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` arguments (the CLI's ``distbudget update``) as ``update()``'s fields. A value
    is JSON where it parses (``2.5``, ``false``, ``null``, ``[...]``), else the bare string;
    ``limits`` is a list of :class:`Limit` arguments as objects, ``rates`` maps a model to its
    rates in USD per 1M tokens (``{"input": 3, "output": 15}``, see ``ModelRates.per_million``)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidInputError(f"expected FIELD=VALUE, got {item!r}")
        if name in out:
            raise InvalidInputError(f"{name} is given twice")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[name] = _field_value(name, value)
    check_changes(out)
    return out


def _field_value(name: str, value: Any) -> Any:
    if name == "limits":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise InvalidInputError('limits must be a JSON list of objects like {"metric": "cost", "value": 5}')
        return [_call(Limit, v, "limit") for v in value]
    if name == "rates" and value is not None:
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise InvalidInputError('rates must be a JSON object like {"model": {"input": 3, "output": 15}}')
        return {model: _call(ModelRates.per_million, v, f"rates of {model!r}") for model, v in value.items()}
    return value


def _call(make: Callable[..., T], kwargs: dict[str, Any], what: str) -> T:
    try:
        return make(**kwargs)
    except TypeError as exc:
        raise InvalidInputError(f"bad {what}: {exc}") from None
