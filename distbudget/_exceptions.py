"""The exceptions, under the name older modules import them by: they live in ``_core/errors.py``
(part of the pure core: its validation raises them), where the tree is drawn."""

from distbudget._core.errors import (
    BackendError,
    BudgetExceededError,
    BudgetWarning,
    DistBudgetError,
    InvalidInputError,
    UnknownModelError,
    UnknownScopeError,
)

__all__ = [
    "BackendError",
    "BudgetExceededError",
    "BudgetWarning",
    "DistBudgetError",
    "InvalidInputError",
    "UnknownModelError",
    "UnknownScopeError",
]
