"""Model prices (re-exported from :mod:`distbudget._core.prices`, where they live)."""

from __future__ import annotations

from distbudget._core.models import canonical_model
from distbudget._core.prices import DEFAULT_MAX_AGE_DAYS, ModelRates, PriceBook, PriceTable, price_table

__all__ = ["DEFAULT_MAX_AGE_DAYS", "ModelRates", "PriceBook", "PriceTable", "canonical_model", "price_table"]
