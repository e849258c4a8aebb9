"""distbudget: token, cost and rate budgets for LLM calls, enforced across a whole agent fleet."""

from distbudget._core.errors import (
    BackendError,
    BudgetExceededError,
    BudgetWarning,
    DistBudgetError,
    InvalidInputError,
    UnknownModelError,
    UnknownScopeError,
)
from distbudget._core.ledger import LedgerEntry
from distbudget._core.scope import BudgetScope, Limit
from distbudget._core.types import AlertLevel, BudgetAlert, UsageRecord
from distbudget._core.usage import Usage
from distbudget.alerts import AlertListener, AsyncAlertListener, WebhookSink
from distbudget.budget import AsyncBudget, AsyncReservation, Budget, PendingReservation, Reservation
from distbudget.manager import AsyncBudgetManager, BudgetManager
from distbudget.pricing import ModelRates

__version__ = "0.1.0"

__all__ = [
    "AlertLevel",
    "AlertListener",
    "AsyncAlertListener",
    "AsyncBudget",
    "AsyncBudgetManager",
    "AsyncReservation",
    "BackendError",
    "Budget",
    "BudgetAlert",
    "BudgetExceededError",
    "BudgetManager",
    "BudgetScope",
    "BudgetWarning",
    "DistBudgetError",
    "InvalidInputError",
    "LedgerEntry",
    "Limit",
    "ModelRates",
    "PendingReservation",
    "Reservation",
    "UnknownModelError",
    "UnknownScopeError",
    "Usage",
    "UsageRecord",
    "WebhookSink",
]
