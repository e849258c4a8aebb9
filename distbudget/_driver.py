"""The drivers: one for sync engines, one for asyncio engines; each runs every job (``_core/ops.py``).

A job is prepared (validated, planned) before anything is sent. The driver then executes it:

* a :class:`~distbudget._core.ops.Step` — one engine operation, then ``finish(result)``: almost
  every operation;
* :class:`~distbudget._core.ops.Done` — nothing to execute;
* a generator of steps (:data:`~distbudget._core.ops.Steps`), for the operations that really take
  several engine steps (``acquire``'s wait loop, a ledger read page by page, the journal's replay).
  The contract, the same in both drivers: each yielded operation's result is sent back; its
  error (a ``BackendError``, or any other) is thrown in at the ``yield`` (the generator may catch it); a yielded
  :class:`~distbudget._core.ops.Sleep` is slept (``None`` is sent back); the generator's return
  value is the job's result, and it is closed in ``finally`` whatever happens.

Each engine call goes through the budget's failure policy (``_policy/guard.py``) when the driver
has one: :meth:`Driver.execute` is the one place where an engine is called for a budget.

The twins are kept thin on purpose (the I/O differs: a call or an ``await``); all the logic they
run lives in the jobs and the guard, once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

from distbudget._core.errors import BackendError
from distbudget._core.ops import Done, Job, Operation, Sleep, Step
from distbudget._policy.guard import Guard, Try
from distbudget.engines.base import AsyncEngine, Engine

R = TypeVar("R")
T = TypeVar("T")


class Driver:
    """Runs jobs on a sync engine, under ``guard`` (a budget's failure policy) if given."""

    def __init__(self, engine: Engine, guard: Guard | None = None, sleep: Callable[[float], Any] | None = None) -> None:
        self.engine = engine
        self.guard = guard
        self.sleep = sleep or time.sleep

    def execute(self, op: Operation[R]) -> R:
        """One engine call, under the failure policy when Redis is (or was just) unavailable."""
        guard = self.guard
        if guard is None:
            return self.engine.execute(op)
        if guard.state.busy:
            local = guard.before(op)
            if not isinstance(local, Try):
                return local
        try:
            answer = self.engine.execute(op)
        except BackendError as err:
            return guard.failed(op, err)
        if guard.state.busy:
            guard.after(op)
        return answer

    def run(self, job: Job[T]) -> T:
        if isinstance(job, Step):
            return job.finish(self.execute(job.op))
        if isinstance(job, Done):
            return job.value
        try:
            step = next(job)
            while True:
                answer, error = self._attempt(step)
                step = job.send(answer) if error is None else job.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            job.close()

    def _attempt(self, step: Operation[Any] | Sleep) -> tuple[Any, Exception | None]:
        """One step of a multi-step job: (its answer, None), or (None, the error to throw in)."""
        if isinstance(step, Sleep):
            self.sleep(step.seconds)
            return None, None
        try:
            return self.execute(step), None
        except Exception as err:  # thrown in: the journal's replay sets an entry aside
            return None, err


class AsyncDriver:
    """The same on an asyncio engine (``sleep`` may be a coroutine function)."""

    def __init__(
        self, engine: AsyncEngine, guard: Guard | None = None, sleep: Callable[[float], Any] | None = None
    ) -> None:
        self.engine = engine
        self.guard = guard
        self.sleep = sleep or asyncio.sleep

    async def execute(self, op: Operation[R]) -> R:
        guard = self.guard
        if guard is None:
            return await self.engine.execute(op)
        if guard.state.busy:
            local = guard.before(op)
            if not isinstance(local, Try):
                return local
        try:
            answer = await self.engine.execute(op)
        except BackendError as err:
            return guard.failed(op, err)
        if guard.state.busy:
            guard.after(op)
        return answer

    async def run(self, job: Job[T]) -> T:
        if isinstance(job, Step):
            return job.finish(await self.execute(job.op))
        if isinstance(job, Done):
            return job.value
        try:
            step = next(job)
            while True:
                answer, error = await self._attempt(step)
                step = job.send(answer) if error is None else job.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            job.close()

    async def _attempt(self, step: Operation[Any] | Sleep) -> tuple[Any, Exception | None]:
        if isinstance(step, Sleep):
            slept = self.sleep(step.seconds)
            if inspect.isawaitable(slept):
                await slept
            return None, None
        try:
            return await self.execute(step), None
        except Exception as err:  # thrown in: the journal's replay sets an entry aside
            return None, err
