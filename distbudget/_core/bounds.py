"""The documented range of every number and string distbudget accepts. Pure: no I/O.

One place for the bounds that keep the engines exact: Redis runs Lua 5.1, whose numbers are
doubles (integers exact below 2**53), and both engines must refuse the same inputs, before anything
is written, with :class:`~distbudget.InvalidInputError`.

- Durations (``ttl``, ``hold_ttl``, ``session_ttl``, ``request_ttl``, ``registry_ttl``, timeouts):
  from 1 ms to 10 years. Above it a lease or marker written as "now + ttl" in µs would leave the
  doubles' exact range (or, in milliseconds, round to 0 and make ``SET PX`` fail after a charge).
- Amounts: a call's tokens, its cost in nano-USD and every counter *after* a charge stay at most
  ``MAX_AMOUNT`` (2**53 - 1: ~9.007e15 tokens, ~$9,007,199 in one counter).
- Text (names, metadata): valid Unicode, no lone surrogates (UTF-8 cannot encode them; Redis and
  the ledger store UTF-8).
- Metadata: a dict whose JSON (as the ledger stores it, UTF-8) is at most ``MAX_METADATA_BYTES``
  (4 KB), so one ledger entry stays small: the ledger is capped by entry count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from distbudget._core.errors import InvalidInputError
from distbudget._core.money import MAX_AMOUNT

__all__ = [
    "MAX_AMOUNT",
    "MAX_DURATION_S",
    "MAX_METADATA_BYTES",
    "MIN_DURATION_S",
    "check_after",
    "check_amounts",
    "check_duration",
    "check_metadata",
    "check_text",
    "metadata_json",
]

MIN_DURATION_S = 0.001  # 1 ms: the finest unit Redis expires a key in
MAX_DURATION_S = 10 * 365 * 86400  # 10 years
MAX_METADATA_BYTES = 4096

# The ledger's encoding of metadata (see _core/ledger.py): what JSON cannot encode is stored as its str().
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def check_duration(value: object, what: str) -> float:
    """A duration in seconds, within [1 ms, 10 years]; ``TypeError`` for a non-number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or not MIN_DURATION_S <= seconds <= MAX_DURATION_S:
        raise InvalidInputError(f"{what} must be between 1 ms and 10 years ({MAX_DURATION_S} s), got {value!r} seconds")
    return seconds


def check_text(value: str, what: str) -> str:
    """``value`` unchanged, or ``InvalidInputError`` if UTF-8 cannot encode it (a lone surrogate)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidInputError(
                f"{what} is not valid Unicode: lone surrogate {value[err.start : err.end]!r} at position {err.start}"
            ) from None
    return value


def metadata_json(metadata: Mapping[str, Any]) -> str:
    """The JSON the ledger stores for ``metadata``, checked: UTF-8 encodable and at most 4 KB."""
    text = _dumps(dict(metadata))
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise InvalidInputError(
            f"metadata is not valid Unicode: lone surrogate {text[err.start : err.end]!r} (a key, a value, or a "
            "value's str())"
        ) from None
    if size > MAX_METADATA_BYTES:
        raise InvalidInputError(f"metadata is {size} bytes of JSON; at most {MAX_METADATA_BYTES} are kept per call")
    return text


def check_metadata(metadata: object) -> dict[str, Any] | None:
    """``None`` or a dict within the bounds above (``TypeError`` for anything else)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    if metadata:
        metadata_json(metadata)
    return metadata


def check_amounts(tokens: int, nano_usd: int, what: str = "call") -> None:
    """A call's derived amounts (token sum, cost) within what one counter holds exactly."""
    if tokens > MAX_AMOUNT:
        raise InvalidInputError(f"the {what}'s tokens ({tokens}) exceed {MAX_AMOUNT}")
    if nano_usd > MAX_AMOUNT:
        raise InvalidInputError(
            f"the {what}'s cost (${nano_usd / 10**9:,.2f}) exceeds what a counter holds exactly "
            f"(${MAX_AMOUNT / 10**9:,.2f})"
        )


def check_after(total: int, amount: int, what: str) -> None:
    """A counter after a charge stays exact: ``total + amount <= MAX_AMOUNT``."""
    if total + amount > MAX_AMOUNT:
        raise InvalidInputError(
            f"{what} would reach {total + amount}, beyond {MAX_AMOUNT} (the largest amount a counter holds "
            "exactly): nothing was charged; reset the counter"
        )
