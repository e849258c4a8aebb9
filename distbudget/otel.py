"""OpenTelemetry (``pip install 'distbudget[otel]'``), off unless :func:`instrument` is called.

Once instrumented, each charge adds the GenAI semantic-convention attributes to the current span::

    gen_ai.request.model                      the charged model
    gen_ai.usage.input_tokens                 input tokens (cached ones included, as providers count)
    gen_ai.usage.output_tokens
    gen_ai.usage.cache_read.input_tokens      cached input tokens read
    gen_ai.usage.cache_creation.input_tokens  input tokens written to the cache
    distbudget.cost_usd                       what distbudget charged (no GenAI attribute exists for cost)
    distbudget.scope, distbudget.session_id

A span covers one model call in the conventions, so a second charge in the same span overwrites
them. Each refusal (``BudgetExceededError`` from ``check``/``reserve``/``record``) becomes a span
event ``distbudget.refused`` with the scope, limit, used and limit. Nothing is recorded when no
span is recording. The accounting core (``_accounting.py``, shared by the sync and async budgets)
calls :func:`charged` and :func:`refused`; both return at once when tracing is off, and never import
OpenTelemetry then.
"""

from __future__ import annotations

import threading
from typing import Any

from distbudget._core.types import UsageRecord
from distbudget._exceptions import BudgetExceededError

REFUSED_EVENT = "distbudget.refused"


class _Switch:
    """Whether tracing is on, and the ``opentelemetry.trace`` module once it is."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.trace: Any = None


_switch = _Switch()


def instrument() -> None:
    """Turn tracing on for this process (needs the ``otel`` extra: ``opentelemetry-api``)."""
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ImportError(f"tracing needs the OpenTelemetry API: pip install 'distbudget[otel]' ({exc})") from exc

    with _switch.lock:
        _switch.trace = trace


def uninstrument() -> None:
    with _switch.lock:
        _switch.trace = None


def is_instrumented() -> bool:
    return _switch.trace is not None


def _span() -> Any:
    trace = _switch.trace
    if trace is None:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


def charged(record: UsageRecord, cached_input_tokens: int = 0, cache_write_tokens: int = 0) -> None:
    """A charge: its usage and cost on the current span."""
    span = _span()
    if span is None:
        return
    span.set_attributes(
        {
            "gen_ai.request.model": record.model,
            "gen_ai.usage.input_tokens": record.input_tokens,
            "gen_ai.usage.output_tokens": record.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": cached_input_tokens,
            "gen_ai.usage.cache_creation.input_tokens": cache_write_tokens,
            "distbudget.cost_usd": record.cost_usd,
            "distbudget.scope": record.scope,
            "distbudget.session_id": record.session_id,
        }
    )


def refused(error: BudgetExceededError, model: str | None = None, session_id: str | None = None) -> None:
    """A refusal: a ``distbudget.refused`` event on the current span."""
    span = _span()
    if span is None:
        return
    attributes: dict[str, Any] = {
        "distbudget.scope": error.scope,
        "distbudget.limit_type": error.limit_type,
        "distbudget.used": float(error.used),
        "distbudget.limit": float(error.limit),
        "distbudget.charged": error.record is not None,  # record(): charged, then over the limit
    }
    if model is not None:
        attributes["gen_ai.request.model"] = model
    if session_id is not None:
        attributes["distbudget.session_id"] = session_id
    if error.retry_after is not None:
        attributes["distbudget.retry_after_s"] = error.retry_after
    span.add_event(REFUSED_EVENT, attributes)
