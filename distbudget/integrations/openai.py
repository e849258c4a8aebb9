"""Budget every call of an ``openai`` client in one line (``pip install 'distbudget[openai]'``)::

    from openai import OpenAI
    from distbudget import Budget, BudgetScope
    from distbudget.integrations.openai import budgeted

    client = budgeted(OpenAI(), Budget(BudgetScope("team", max_cost_per_day_usd=50.0)), session_id="run-1")
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])

``chat.completions.create`` and ``responses.create`` hold the worst case before the HTTP request (a
refusal raises :class:`~distbudget.BudgetExceededError` and sends nothing) and commit what the response
reports: prompt tokens with their cached part, completion tokens with their reasoning part. With
``stream=True`` the request is sent with ``stream_options={"include_usage": True}`` (chat) and the
final usage is committed when the stream ends; a stream closed or broken off before that is charged
the input estimate plus the output received so far, flagged ``"estimated": true`` in the ledger.
Everything else on the client (other endpoints, ``with_raw_response``, the ``.stream()`` helpers) is
the client's own, unbudgeted.

Per call: ``budget_session_id=``, ``budget_scope=`` (with a :class:`~distbudget.BudgetManager`),
``budget_request_id=`` and ``budget_metadata=`` are taken off before the SDK sees the call; or
the budgeted client's ``with_session("s-42", scope="alice")``, a view charging elsewhere.
"""

from __future__ import annotations

from typing import Any

import openai

from distbudget._core.usage import Usage
from distbudget.integrations._common import (
    AnyBudget,
    Api,
    BudgetedClient,
    Charge,
    ChatTally,
    Endpoint,
    Meter,
    Proxy,
    Tally,
    attr,
    endpoint,
    first_given,
    force_stream_usage,
    wrap_client,
)

__all__ = ["BudgetedOpenAI", "budgeted"]


class ResponsesTally(Tally):
    """Responses API events: ``*.delta`` text, then ``response.completed`` (or ``incomplete`` /
    ``failed``) carrying the response and its usage."""

    def feed(self, event: Any) -> None:
        kind = attr(event, "type") or ""
        response = attr(event, "response")
        if response is not None:
            self.response_id = attr(response, "id") or self.response_id
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            usage = attr(response, "usage")
            if usage is not None:
                self.usage = Usage.from_openai(usage)
                self.complete = True
        elif kind.endswith(".delta"):
            delta = attr(event, "delta")
            if isinstance(delta, str):
                self.text.append(delta)


def _chat_charge(meter: Meter, kwargs: dict[str, Any]) -> Charge:
    cap = first_given(kwargs, "max_completion_tokens", "max_tokens")
    parts = [kwargs.get(k) for k in ("messages", "tools", "functions", "response_format", "prediction")]
    charge = meter.plan("openai.chat.completions", kwargs.get("model"), kwargs, parts, cap, kwargs.get("n"))
    if kwargs.get("stream"):
        force_stream_usage(kwargs)
    return charge


def _responses_charge(meter: Meter, kwargs: dict[str, Any]) -> Charge:
    parts = [kwargs.get(k) for k in ("input", "instructions", "tools", "text")]
    return meter.plan("openai.responses", kwargs.get("model"), kwargs, parts, kwargs.get("max_output_tokens"))


_TIMEOUTS = (openai.APITimeoutError,)
CHAT = Api(_chat_charge, ChatTally, Usage.from_openai, _TIMEOUTS)
RESPONSES = Api(_responses_charge, ResponsesTally, Usage.from_openai, _TIMEOUTS)


class _Chat(Proxy):
    @property
    def completions(self) -> Endpoint:
        return endpoint(self._inner.completions, self._meter, CHAT)


class BudgetedOpenAI(BudgetedClient):
    """An ``OpenAI`` or ``AsyncOpenAI`` client whose chat completions and responses are budgeted."""

    @property
    def chat(self) -> _Chat:
        return _Chat(self._inner.chat, self._meter)

    @property
    def responses(self) -> Endpoint:
        return endpoint(self._inner.responses, self._meter, RESPONSES)


def budgeted(client: Any, budget: AnyBudget, **options: Any) -> BudgetedOpenAI:
    """Wrap an ``OpenAI`` (with a :class:`~distbudget.Budget` or :class:`~distbudget.BudgetManager`) or
    an ``AsyncOpenAI`` (with an ``AsyncBudget`` / ``AsyncBudgetManager``). Options: ``session_id``;
    ``scope`` (the manager's scope); ``default_max_output_tokens`` (held when a request sets no output
    cap and the price snapshot knows no maximum for the model; 4,096); ``metadata`` (into every
    ledger entry)."""
    return wrap_client(client, budget, (openai.OpenAI, openai.AsyncOpenAI), BudgetedOpenAI, **options)
