"""LangChain, budgeted by a callback handler (``pip install 'distbudget[langchain]'``)::

    from langchain_openai import ChatOpenAI
    from distbudget.integrations.langchain import BudgetCallbackHandler

    llm = ChatOpenAI(model="gpt-4o", callbacks=[BudgetCallbackHandler(budget, session_id="run-1")])
    llm.invoke("hi")

The handler has ``raise_error = True``: ``on_chat_model_start`` / ``on_llm_start`` hold the worst case
(the model and ``max_tokens`` / ``max_completion_tokens`` from ``invocation_params``) and a refusal
stops the run before the model is called; ``on_llm_end`` commits the message's ``usage_metadata`` (with
its input and output token details; else the ``llm_output`` token usage, else the estimate, flagged);
``on_llm_error`` releases. Per run: ``config={"metadata": {"budget_session_id": ..., "budget_scope":
...}}``. :class:`AsyncBudgetCallbackHandler` is the twin for an ``AsyncBudget`` / ``AsyncBudgetManager``.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.outputs import LLMResult

from distbudget._core.usage import Usage
from distbudget.integrations._common import (
    AnyBudget,
    Charge,
    Meter,
    attr,
    first_given,
)

__all__ = ["AsyncBudgetCallbackHandler", "BudgetCallbackHandler"]

NO_USAGE = "the model reported no usage"


def _charge(meter: Meter, inputs: Any, metadata: dict[str, Any] | None, kwargs: dict[str, Any]) -> Charge:
    params = kwargs.get("invocation_params") or {}
    meta = metadata or {}
    model = first_given(params, "model", "model_name", "model_id") or meta.get("ls_model_name")
    cap = first_given(params, "max_completion_tokens", "max_tokens", "max_output_tokens") or meta.get("ls_max_tokens")
    per_run = {k: meta[k] for k in ("budget_session_id", "budget_scope", "budget_request_id") if meta.get(k)}
    return meter.plan("langchain", model, per_run, [inputs, params.get("tools")], cap, params.get("n"))


def _result_usage(response: LLMResult, charge: Charge) -> tuple[Usage, str | None]:
    for generations in response.generations:
        for generation in generations:
            usage = attr(attr(generation, "message"), "usage_metadata")
            if usage:
                return Usage.from_langchain(usage), None
    token_usage = attr(response.llm_output, "token_usage") or attr(response.llm_output, "usage")
    if token_usage:
        return Usage.from_openai(token_usage), None
    text = "".join(g.text for gens in response.generations for g in gens)
    return charge.estimated(text), NO_USAGE


def _response_id(response: LLMResult) -> str | None:
    for generations in response.generations:
        for generation in generations:
            message = attr(generation, "message")
            rid = attr(attr(message, "response_metadata"), "id") or attr(message, "id")
            if rid:
                return str(rid)
    return None


class _Handler:
    """What both handlers share: the meter (``asynchronous`` says which budgets it takes) and the
    holds of the runs in flight, by run id."""

    asynchronous = False

    def __init__(self, budget: AnyBudget, **options: Any) -> None:
        """``options``: ``session_id``, ``scope`` (a manager's), ``default_max_output_tokens``,
        ``metadata`` (as :func:`distbudget.integrations.openai.budgeted` takes them)."""
        self.meter = Meter(budget, asynchronous=self.asynchronous, **options)
        self.holds: dict[UUID, tuple[Any, Charge]] = {}


class BudgetCallbackHandler(_Handler, BaseCallbackHandler):
    """Budget a LangChain chat model or LLM with a ``Budget`` / ``BudgetManager`` (see the module)."""

    raise_error = True

    def _start(self, inputs: Any, run_id: UUID, metadata: dict[str, Any] | None, kwargs: dict[str, Any]) -> None:
        charge = _charge(self.meter, inputs, metadata, kwargs)
        self.holds[run_id] = (self.meter.reserve(charge), charge)

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        self._start(messages, run_id, kwargs.pop("metadata", None), kwargs)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        self._start(prompts, run_id, kwargs.pop("metadata", None), kwargs)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        held = self.holds.pop(run_id, None)
        if held is not None:
            hold, charge = held
            usage, estimated = _result_usage(response, charge)
            self.meter.commit(hold, charge, usage, estimated, _response_id(response))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        held = self.holds.pop(run_id, None)
        if held is not None:
            held[0].release()


class AsyncBudgetCallbackHandler(_Handler, AsyncCallbackHandler):
    """The asyncio twin of :class:`BudgetCallbackHandler`, for an ``AsyncBudget`` / ``AsyncBudgetManager``."""

    raise_error = True
    asynchronous = True

    async def _start(self, inputs: Any, run_id: UUID, metadata: dict[str, Any] | None, kwargs: dict[str, Any]) -> None:
        charge = _charge(self.meter, inputs, metadata, kwargs)
        self.holds[run_id] = (await self.meter.areserve(charge), charge)

    async def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        await self._start(messages, run_id, kwargs.pop("metadata", None), kwargs)

    async def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        await self._start(prompts, run_id, kwargs.pop("metadata", None), kwargs)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        held = self.holds.pop(run_id, None)
        if held is not None:
            hold, charge = held
            usage, estimated = _result_usage(response, charge)
            await self.meter.acommit(hold, charge, usage, estimated, _response_id(response))

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        held = self.holds.pop(run_id, None)
        if held is not None:
            await held[0].release()
