"""What an engine is: one method, ``execute(op) -> result``, for every operation of
``distbudget/_core/ops.py`` (the shape of httpx's ``BaseTransport.handle_request``).

An engine applies each operation atomically and answers its typed result, or raises
:class:`~distbudget.BackendError` when its store failed, having classified the failure
(``outage``, ``maybe_sent``): the failure policy above it reads only those. Budgets, managers and
the failure policy's replay talk to engines through this seam alone. The engines: ``memory.py``
(in-process), ``redis.py`` (a Lua script per operation), ``scripted.py`` (a test double).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from distbudget._core.ops import Operation

R = TypeVar("R")


class Engine(Protocol):
    """A synchronous engine."""

    def execute(self, op: Operation[R]) -> R:
        """Apply ``op`` atomically; its result, or ``BackendError``."""
        ...


class AsyncEngine(Protocol):
    """An asyncio engine: the same, awaited."""

    async def execute(self, op: Operation[R]) -> R:
        """Apply ``op`` atomically; its result, or ``BackendError``."""
        ...
