"""The Lua scripts are composed per script from includes by concern (``distbudget/engines/scripts.py``):
each script carries only what it calls. The scripts' behaviour is tested by the whole suite, which runs
them on real Redis, Redis Cluster and fakeredis."""

from __future__ import annotations

import re

import pytest

from distbudget.engines import scripts

# A top-level definition of an include: `local function name(` or `local a, b = ...`.
DEFINITION = re.compile(r"^local (?:function (\w+)\(|([\w, ]+?) =)", re.MULTILINE)


def defined(text: str) -> list[str]:
    names: list[str] = []
    for function, variables in DEFINITION.findall(text):
        names += [function] if function else [v.strip() for v in variables.split(",")]
    return names


@pytest.mark.parametrize("operation", scripts.OPERATIONS)
def test_each_script_carries_only_helpers_it_calls(operation: str) -> None:
    source = scripts.source(operation)
    for include in scripts.includes(operation):
        for name in defined((scripts.lua_dir() / "include" / f"{include}.lua").read_text()):
            uses = len(re.findall(rf"(?<![\w.]){name}\b", source)) - 1  # minus its definition
            assert uses > 0, f"{operation}.lua carries {name} (include {include}) but never uses it"


def test_includes_compose_in_dependency_order() -> None:
    assert scripts.includes("registry") == ()  # it calls none of the shared helpers
    assert scripts.includes("release") == ("clock", "num", "holds")
    record = scripts.includes("record")
    assert "holds" not in record and "admit" not in record
    assert record.index("num") < record.index("scan") and record.index("tail") < record.index("ledger")
    for operation in scripts.OPERATIONS:
        assert len(set(scripts.includes(operation))) == len(scripts.includes(operation))


def test_every_include_is_used_by_some_script() -> None:
    used = {name for op in scripts.OPERATIONS for name in scripts.includes(op)}
    files = {p.stem for p in (scripts.lua_dir() / "include").glob("*.lua")}
    assert files == used


def test_unknown_script() -> None:
    with pytest.raises(ValueError, match="unknown script"):
        scripts.source("nope")
