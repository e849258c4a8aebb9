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
from collections.abc import Mapping
from typing import Any

from distbudget._core import registry as R
from distbudget._core.prices import ModelRates
from distbudget._core.scope import BudgetScope
from distbudget._exceptions import InvalidInputError

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
    return R.apply(table, "chain", name)
