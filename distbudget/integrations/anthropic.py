"""Budget every message of an ``anthropic`` client in one line (``pip install 'distbudget[anthropic]'``)::

    from anthropic import Anthropic
    from distbudget import Budget, BudgetScope
    from distbudget.integrations.anthropic import budgeted

    client = budgeted(Anthropic(), Budget(BudgetScope("team", max_cost_per_day_usd=50.0)), session_id="run-1")
    client.messages.create(model="claude-sonnet-4-5", max_tokens=1024, messages=[{"role": "user", "content": "hi"}])

``messages.create`` (also ``stream=True``) and ``messages.stream(...)`` hold ``max_tokens`` and the
input estimate before the request (refused: nothing is sent) and commit the reported usage. Anthropic
reports cache reads and cache writes *beside* ``input_tokens``; they are added in
(:meth:`distbudget.Usage.from_anthropic`) and priced at the cached / cache-write rates. A stream's
``message_delta`` usage is cumulative: the latest one counts, never a sum. A stream closed before its
final ``message_delta`` is charged the input it reported plus the output received so far, flagged
``"estimated": true``. Everything else on the client is the client's own, unbudgeted.

Per call: ``budget_session_id=``, ``budget_scope=``, ``budget_request_id=``, ``budget_metadata=``; or
the budgeted client's ``with_session(...)``.
"""

from __future__ import annotations

from typing import Any

import anthropic

from distbudget._core.usage import Usage
from distbudget.budget import AsyncReservation, Reservation
from distbudget.integrations._common import (
    AnyBudget,
    Api,
    AsyncEndpoint,
    BudgetedClient,
    Charge,
    Endpoint,
    Meter,
    Tally,
    attr,
    wrap_client,
)

__all__ = ["BudgetedAnthropic", "budgeted"]

_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cache_creation",
)


def _content_text(blocks: Any) -> str:
    """The text a message's content blocks hold so far (text, thinking, tool input)."""
    parts: list[str] = []
    for block in blocks or ():
        for name in ("text", "thinking", "partial_json"):
            value = attr(block, name)
            if isinstance(value, str):
                parts.append(value)
        tool_input = attr(block, "input")
        if tool_input:
            parts.append(str(tool_input))
    return "".join(parts)


class MessageTally(Tally):
    """Raw stream events: ``message_start`` (input and cache usage), text deltas, ``message_delta``
    (cumulative usage: the latest value of each field wins)."""

    def __init__(self, charge: Charge) -> None:
        super().__init__(charge)
        self.raw: dict[str, Any] = {}

    def _update(self, usage: Any) -> None:
        for name in _USAGE_FIELDS:
            value = attr(usage, name)
            if value is not None:
                self.raw[name] = value
        if self.raw:
            self.usage = Usage.from_anthropic(self.raw)

    def feed(self, event: Any) -> None:
        kind = attr(event, "type")
        if kind == "message_start":
            message = attr(event, "message")
            self.response_id = attr(message, "id")
            self._update(attr(message, "usage"))
        elif kind == "content_block_delta":
            self.text.append(_content_text([attr(event, "delta")]))
        elif kind == "message_delta":
            self._update(attr(event, "usage"))
            if attr(attr(event, "delta"), "stop_reason") is not None:
                self.complete = True
        elif kind == "message_stop":
            self.complete = True


def _charge(meter: Meter, kwargs: dict[str, Any]) -> Charge:
    parts = [kwargs.get(k) for k in ("messages", "system", "tools")]
    return meter.plan("anthropic.messages", kwargs.get("model"), kwargs, parts, kwargs.get("max_tokens"))


MESSAGES = Api(_charge, MessageTally, Usage.from_anthropic, (anthropic.APITimeoutError,))


def _stream_usage(stream: Any, charge: Charge) -> tuple[Usage, str | None, str | None]:
    """What a ``messages.stream()`` block used, from the SDK's accumulated message."""
    try:
        snapshot = stream.current_message_snapshot
    except AssertionError:  # no event arrived
        return charge.estimated(), "stream closed before any event", None
    usage = Usage.from_anthropic(snapshot.usage)
    if snapshot.stop_reason is not None:
        return usage, None, snapshot.id
    return charge.estimated(_content_text(snapshot.content), usage), "stream closed early", snapshot.id


class _StreamManager:
    """``messages.stream(...)`` (``with`` or ``async with``): holds on entering, before the SDK sends
    the request; commits on leaving, from the message the SDK accumulated."""

    def __init__(self, inner: Any, meter: Meter, charge: Charge) -> None:
        self._inner = inner
        self._meter = meter
        self._charge = charge
        self._stream: Any = None

    def __enter__(self) -> Any:
        self._hold = self._meter.reserve(self._charge)
        try:
            self._stream = self._inner.__enter__()
        except BaseException:
            self._hold.release()
            raise
        return self._stream

    def __exit__(self, *exc: Any) -> None:
        try:
            self._inner.__exit__(*exc)
        finally:
            self._meter.commit(self._hold, self._charge, *_stream_usage(self._stream, self._charge))

    async def __aenter__(self) -> Any:
        self._ahold = await self._meter.areserve(self._charge)
        try:
            self._stream = await self._inner.__aenter__()
        except BaseException:
            await self._ahold.release()
            raise
        return self._stream

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._inner.__aexit__(*exc)
        finally:
            await self._meter.acommit(self._ahold, self._charge, *_stream_usage(self._stream, self._charge))

    _hold: Reservation
    _ahold: AsyncReservation


class _Messages(Endpoint):
    def stream(self, **kwargs: Any) -> _StreamManager:
        charge = _charge(self._meter, kwargs)
        return _StreamManager(self._inner.stream(**kwargs), self._meter, charge)


class _AsyncMessages(AsyncEndpoint, _Messages):
    pass


class BudgetedAnthropic(BudgetedClient):
    """An ``Anthropic`` or ``AsyncAnthropic`` client whose ``messages.create`` and ``messages.stream``
    are budgeted."""

    @property
    def messages(self) -> _Messages:
        kind = _AsyncMessages if self._meter.asynchronous else _Messages
        return kind(self._inner.messages, self._meter, MESSAGES)


def budgeted(client: Any, budget: AnyBudget, **options: Any) -> BudgetedAnthropic:
    """Wrap an ``Anthropic`` (with a ``Budget`` / ``BudgetManager``) or an ``AsyncAnthropic`` (with an
    ``AsyncBudget`` / ``AsyncBudgetManager``); the options are those of
    :func:`distbudget.integrations.openai.budgeted`."""
    return wrap_client(client, budget, (anthropic.Anthropic, anthropic.AsyncAnthropic), BudgetedAnthropic, **options)
