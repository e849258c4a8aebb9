"""The one loader of the Lua in ``lua/``: each script composed with only the includes it calls.

A script (``lua/<operation>.lua``, one operation) names the includes it calls in its header
(``-- include: clock, scan``); an include (``lua/include/<name>.lua``, one concern: the window
scan, holds, admission, the ledger, alerts, request ids, ...) names those it calls in its own
(``-- needs: num``). Redis runs each script as one chunk (scripts cannot include each other), so
:func:`source` puts the includes a script needs before its body, each once, its needs first.
``tests/test_scripts.py`` checks that every helper a composed script carries is called.

``lua/`` ships inside the wheel as ``distbudget/lua`` (``pyproject.toml`` force-includes it) and is
read with :mod:`importlib.resources`; in a source tree it is the top-level folder.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

# Every script of lua/, one per engine operation.
OPERATIONS = ("record", "commit", "check", "reserve", "release", "extend", "summary", "reset", "registry")

_HEADER = re.compile(r"^-- (include|needs): *(.*)$", re.MULTILINE)


def lua_dir() -> Path:
    """``lua/``: the package's copy (a wheel), else the source tree's top-level folder."""
    packaged = resources.files("distbudget") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "lua"


@cache
def _read(relative: str) -> str:
    return (lua_dir() / relative).read_text("utf-8")


def _declared(text: str) -> list[str]:
    """The names a file's header lists after ``-- include:`` or ``-- needs:``."""
    return [name.strip() for _, names in _HEADER.findall(text) for name in names.split(",") if name.strip()]


@cache
def includes(operation: str) -> tuple[str, ...]:
    """The includes ``operation``'s script carries, in the order they are composed (needs first)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"lua/include: circular needs {' -> '.join((*path, name))}")
        if name in order:
            return
        for need in _declared(_read(f"include/{name}.lua")):
            visit(need, (*path, name))
        order.append(name)

    for name in _declared(_read(f"{_check(operation)}.lua")):
        visit(name, ())
    return tuple(order)


@cache
def source(operation: str) -> str:
    """The script Redis runs for ``operation``: its includes, then its own body."""
    parts = [_read(f"include/{name}.lua") for name in includes(operation)]
    return "\n".join([*parts, _read(f"{operation}.lua")])


def _check(operation: str) -> str:
    if operation not in OPERATIONS:
        raise ValueError(f"unknown script {operation!r} (one of {', '.join(OPERATIONS)})")
    return operation


__all__ = ["OPERATIONS", "includes", "lua_dir", "source"]
