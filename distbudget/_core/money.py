"""Money and token amounts: integers inside, floats and Decimals only at the edge.

Money is integer nano-USD (1 USD = 10**9). Rates are held as integer nano-USD per *million*
tokens, so a rate with up to twelve decimals per 1K tokens is exact and a charge is one integer
multiply and one rounding (half up, to the nearest nano-USD).
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from numbers import Real

from distbudget._core.errors import InvalidInputError

NANO = 10**9
# Redis runs Lua 5.1, whose numbers are doubles: integers are exact below 2**53.
# One counter therefore holds at most ~9 million USD (in nano-USD) or 9e15 tokens.
MAX_AMOUNT = 2**53 - 1


def _decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    try:
        d = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise InvalidInputError(f"{what} is not a number: {value!r}") from None
    if not d.is_finite():
        raise InvalidInputError(f"{what} must be finite, got {value!r}")
    if d < 0:
        raise InvalidInputError(f"{what} must not be negative, got {value!r}")
    return d


def usd_to_nano(value: object, what: str = "amount") -> int:
    """USD (int, float, Decimal or numeric str) to integer nano-USD, rounded half up."""
    d = _decimal(value, what)
    nano = int((d * NANO).to_integral_value(rounding="ROUND_HALF_UP"))
    if nano > MAX_AMOUNT:
        raise InvalidInputError(f"{what} is too large: {value!r}")
    return nano


def nano_to_usd(nano: int) -> float:
    return nano / NANO


def rate_to_nano_per_million(per_1k: object, what: str) -> int:
    """A USD-per-1K-tokens rate to integer nano-USD per million tokens (exact to 1e-12 USD/1K)."""
    d = _decimal(per_1k, what)
    return int((d * 1000 * NANO).to_integral_value(rounding="ROUND_HALF_UP"))


def cost_nano(tokens: int, nano_per_million: int) -> int:
    """Price ``tokens`` at a rate; rounded half up to the nearest nano-USD."""
    return (tokens * nano_per_million + 500_000) // 1_000_000


def check_tokens(value: object, what: str) -> int:
    """Validate a token count: a non-negative int (bools and floats are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Real) and not isinstance(value, bool):
            f = float(value)
            if math.isfinite(f) and f == int(f) and f >= 0:
                raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
            raise InvalidInputError(f"{what} must be a non-negative integer, got {value!r}")
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise InvalidInputError(f"{what} must not be negative, got {value}")
    if value > MAX_AMOUNT:
        raise InvalidInputError(f"{what} is too large: {value}")
    return value
