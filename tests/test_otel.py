"""OpenTelemetry: off unless instrumented; then each charge puts the GenAI usage attributes on the
current span and each refusal becomes a span event. Spans are caught by the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from distbudget import Budget, BudgetExceededError, BudgetScope, ModelRates, otel

RATES = {"m": ModelRates(0.001, 0.002)}


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.instrument()
    yield exporter, provider
    otel.uninstrument()


def test_a_charge_puts_genai_usage_on_the_current_span(spans: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    exporter, provider = spans
    budget = Budget(BudgetScope("team", max_tokens_per_day=10_000), RATES)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("llm call"):
        record = budget.record("s1", "m", 1200, 300, cached_input_tokens=1000, cache_write_tokens=100)
        otel.charged(record, cached_input_tokens=1000, cache_write_tokens=100)
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "gen_ai.request.model": "m",
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.cache_creation.input_tokens": 100,
        "distbudget.cost_usd": record.cost_usd,
        "distbudget.scope": "team",
        "distbudget.session_id": "s1",
    }


def test_a_refusal_is_a_span_event(spans: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    exporter, provider = spans
    budget = Budget(BudgetScope("team", max_tokens_per_day=1000), RATES)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("agent step"):
        with pytest.raises(BudgetExceededError) as caught:
            budget.reserve("m", 900, 200, session_id="s1")
        otel.refused(caught.value, model="m", session_id="s1")
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == otel.REFUSED_EVENT
    assert dict(event.attributes or {}) == {
        "distbudget.scope": "team",
        "distbudget.limit_type": "day_tokens",
        "distbudget.used": 1100.0,
        "distbudget.limit": 1000.0,
        "distbudget.charged": False,
        "gen_ai.request.model": "m",
        "distbudget.session_id": "s1",
    }


def test_off_unless_instrumented_and_nothing_without_a_recording_span(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    budget = Budget(BudgetScope("team"), RATES)
    record = budget.record("s1", "m", 10, 5)
    otel.charged(record)  # no current span: nothing to annotate, no error
    otel.uninstrument()
    assert not otel.is_instrumented()
    with provider.get_tracer("test").start_as_current_span("llm call"):
        otel.charged(record)
    (span,) = exporter.get_finished_spans()
    assert not span.attributes
    otel.instrument()
