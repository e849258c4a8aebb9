"""The exception tree of distbudget.

DistBudgetError                      root: catch this to catch everything below
├── BudgetExceededError              a call was refused or usage went over a limit
├── UnknownModelError (+ KeyError)   no price for a model and no fallback rates given
├── UnknownScopeError (+ KeyError)   no scope of that name in the registry (a manager's get, remove ...)
├── InvalidInputError (+ ValueError) bad tokens, names, limits; raised before anything is written
└── BackendError                     Redis failed (connection, timeout, script error); wraps the cause

BudgetWarning (UserWarning)          emitted with ``warnings.warn`` when ``hard_stop=False``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distbudget._core.types import UsageRecord


class DistBudgetError(Exception):
    """Root of every error distbudget raises."""


class BudgetExceededError(DistBudgetError):
    """A limit refused a call (``check``/``reserve``) or was exceeded by recorded usage.

    ``record`` is set when actual usage was persisted before raising (money spent is never
    dropped). ``retry_after`` (seconds) is set when a rolling window will free enough capacity
    by itself; it is ``None`` when only a reset or a new session can.
    """

    def __init__(
        self,
        message: str,
        scope: str,
        limit_type: str,
        used: float,
        limit: float,
        *,
        retry_after: float | None = None,
        record: UsageRecord | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.scope = scope
        self.limit_type = limit_type
        self.used = used
        self.limit = limit
        self.retry_after = retry_after
        self.record = record

    def __reduce__(self) -> tuple[object, ...]:  # picklable across processes
        return (
            _rebuild_exceeded,
            (self.message, self.scope, self.limit_type, self.used, self.limit, self.retry_after, self.record),
        )


def _rebuild_exceeded(
    message: str,
    scope: str,
    limit_type: str,
    used: float,
    limit: float,
    retry_after: float | None,
    record: UsageRecord | None,
) -> BudgetExceededError:
    return BudgetExceededError(message, scope, limit_type, used, limit, retry_after=retry_after, record=record)


class UnknownModelError(DistBudgetError, KeyError):
    """No price is known for a model and the budget has no ``default_rates``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidInputError(DistBudgetError, ValueError):
    """Input rejected before anything was written."""


class UnknownScopeError(DistBudgetError, KeyError):
    """No scope of that name is registered (or it was removed). A ``KeyError`` too, so code written
    for agent-budget's ``manager.get`` that catches ``KeyError`` keeps working."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackendError(DistBudgetError):
    """The backend (Redis) failed; ``__cause__`` holds the original exception. ``journaled`` is True
    when the call was a charge kept in the local journal, to be replayed when Redis answers.

    The engine that raises it says what kind of failure it was (the failure policy reads only
    these, never the client library's exception types): ``outage`` when Redis was unavailable
    rather than answering an error (a connection refused or lost, a timeout, ``LOADING`` ...), and
    ``maybe_sent`` when the command may have reached Redis and run (its reply was lost)."""

    journaled: bool = False
    outage: bool = False
    maybe_sent: bool = False


class BudgetWarning(UserWarning):
    """Issued instead of raising when a scope has ``hard_stop=False``."""
