"""OpenTelemetry: off unless instrumented; then each charge (record, commit, record_many, sync and
async) puts the GenAI usage attributes on the current span and each refusal becomes a span event.
Spans are caught by the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from distbudget import AsyncBudget, Budget, BudgetExceededError, BudgetScope, ModelRates, otel

RATES = {"m": ModelRates(0.001, 0.002, cached_input_per_1k=0.0005, cache_write_per_1k=0.00125)}


class Spans:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()


@pytest.fixture
def spans() -> Iterator[Spans]:
    otel.instrument()
    yield Spans()
    otel.uninstrument()


def usage(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_record_puts_genai_usage_on_the_current_span(spans: Spans) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=10_000), RATES)
    with spans.tracer.start_as_current_span("llm call"):
        record = budget.record("s1", "m", 1200, 300, cached_input_tokens=1000, cache_write_tokens=100)
    (span,) = spans.finished()
    assert usage(span) == {
        "gen_ai.request.model": "m",
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.cache_creation.input_tokens": 100,
        "distbudget.cost_usd": record.cost_usd,
        "distbudget.scope": "team",
        "distbudget.session_id": "s1",
    }
    assert not span.events


def test_a_usage_value_is_annotated_alike(spans: Spans) -> None:
    """``record(session, model, Usage(...))`` (what the SDK integrations pass) shows the same attributes."""
    from distbudget import Usage

    budget = Budget(BudgetScope("team"), RATES)
    with spans.tracer.start_as_current_span("llm call"):
        budget.record(
            "s1", "m", Usage(input_tokens=800, output_tokens=90, cached_input_tokens=500, cache_write_tokens=40)
        )
    (span,) = spans.finished()
    got = usage(span)
    assert (got["gen_ai.usage.input_tokens"], got["gen_ai.usage.output_tokens"]) == (800, 90)
    assert (got["gen_ai.usage.cache_read.input_tokens"], got["gen_ai.usage.cache_creation.input_tokens"]) == (500, 40)


def test_commit_and_record_many_annotate_their_spans(spans: Spans) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=10_000), RATES)
    with spans.tracer.start_as_current_span("reserved call"):
        with budget.reserve("m", 500, 200, session_id="s2") as hold:
            record = hold.commit(400, 150, cached_input_tokens=100)
    with spans.tracer.start_as_current_span("batch"):
        records = budget.record_many([("s3", "m", 10, 5), ("s4", "m", 20, 7)])
    reserved, batch = spans.finished()
    assert usage(reserved)["gen_ai.usage.input_tokens"] == 400
    assert usage(reserved)["gen_ai.usage.cache_read.input_tokens"] == 100
    assert usage(reserved)["distbudget.cost_usd"] == record.cost_usd
    # a span covers one model call in the conventions: the batch's last charge is the one shown
    assert usage(batch)["gen_ai.usage.output_tokens"] == 7 and usage(batch)["distbudget.session_id"] == "s4"
    assert records[-1].cost_usd == usage(batch)["distbudget.cost_usd"]


def test_a_refusal_is_a_span_event(spans: Spans) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=1000), RATES)
    with spans.tracer.start_as_current_span("agent step"):
        with pytest.raises(BudgetExceededError):
            budget.reserve("m", 900, 200, session_id="s1")
    (span,) = spans.finished()
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
    assert not usage(span)  # nothing was charged


def test_a_record_over_the_limit_is_charged_and_an_event(spans: Spans) -> None:
    budget = Budget(BudgetScope("team", max_tokens_per_day=1000), RATES)
    with spans.tracer.start_as_current_span("llm call"):
        with pytest.raises(BudgetExceededError):
            budget.record("s1", "m", 900, 200)
    (span,) = spans.finished()
    assert usage(span)["gen_ai.usage.input_tokens"] == 900  # the money was spent: it is on the span
    (event,) = span.events
    assert event.attributes is not None and event.attributes["distbudget.charged"] is True


def test_async_budgets_annotate_the_span_of_their_task(spans: Spans) -> None:
    async def main() -> None:
        budget = AsyncBudget(BudgetScope("team", max_tokens_per_day=10_000), RATES)

        async def call(i: int) -> None:
            with spans.tracer.start_as_current_span(f"call {i}"):
                await budget.record(f"s{i}", "m", 100 + i, 10)

        await asyncio.gather(*(call(i) for i in range(5)))

    asyncio.run(main())
    by_name = {span.name: usage(span) for span in spans.finished()}
    assert {name: u["gen_ai.usage.input_tokens"] for name, u in by_name.items()} == {
        f"call {i}": 100 + i for i in range(5)
    }


def test_off_unless_instrumented_and_nothing_without_a_recording_span(spans: Spans) -> None:
    budget = Budget(BudgetScope("team"), RATES)
    budget.record("s1", "m", 10, 5)  # no current span: nothing to annotate, no error
    otel.uninstrument()
    assert not otel.is_instrumented()
    with spans.tracer.start_as_current_span("llm call"):
        budget.record("s1", "m", 10, 5)
    (span,) = spans.finished()
    assert not span.attributes
    otel.instrument()


def test_distbudget_runs_without_opentelemetry_installed() -> None:
    """The extra is optional: with ``opentelemetry`` unimportable, charges work and ``instrument()``
    says what is missing."""
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import distbudget\n"
        "distbudget.Budget(distbudget.BudgetScope('t')).record('s', 'gpt-4o-mini', 1, 1)\n"
        "from distbudget import otel\n"
        "try:\n    otel.instrument()\nexcept ImportError as exc:\n    print('ImportError', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith("ImportError") and "distbudget[otel]" in done.stdout
