"""A scripted engine for tests, in the spirit of httpx's ``MockTransport``: every operation goes to
a handler you write, which answers it, raises (a classified ``BackendError`` stands for any Redis
failure), or hands it on to a real engine. The failure policy can then be tested without killing
servers::

    def handler(op: Operation[Any]) -> Any:
        if isinstance(op, Record):
            raise outage("connection refused", maybe_sent=False)
        return memory.execute(op)

    budget = Budget(scope, _engine=ScriptedEngine(handler), on_backend_error="allow")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from distbudget._core.errors import BackendError
from distbudget._core.ops import Operation

R = TypeVar("R")
Handler = Callable[[Operation[Any]], Any]


def outage(message: str = "Redis is unavailable", *, maybe_sent: bool = False) -> BackendError:
    """A ``BackendError`` as an engine raises it when Redis does not answer (``maybe_sent``: the
    command may have run, its reply was lost)."""
    err = BackendError(message)
    err.outage, err.maybe_sent = True, maybe_sent
    return err


class ScriptedEngine:
    """A sync engine answering with ``handler(op)``; ``ops`` lists what it was asked, in order."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.ops: list[Operation[Any]] = []

    def execute(self, op: Operation[R]) -> R:
        self.ops.append(op)
        return cast("R", self.handler(op))


class AsyncScriptedEngine:
    """The same for asyncio budgets (the handler stays a plain function)."""

    def __init__(self, handler: Handler) -> None:
        self.scripted = ScriptedEngine(handler)
        self.ops = self.scripted.ops

    async def execute(self, op: Operation[R]) -> R:
        return self.scripted.execute(op)
