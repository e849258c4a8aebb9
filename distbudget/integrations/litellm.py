"""LiteLLM, budgeted (``pip install 'distbudget[litellm]'``).

SDK: :func:`completion` and :func:`acompletion` take LiteLLM's arguments plus ``budget=`` (a
``Budget`` / ``BudgetManager``, or their async twins for ``acompletion``)::

    from distbudget.integrations.litellm import completion
    reply = completion(model="openai/gpt-4o", messages=[...], budget=budget, budget_session_id="run-1")

The worst case is held before LiteLLM is called (a refusal raises and nothing is sent: a
``CustomLogger`` cannot do that in SDK mode, its exceptions are swallowed) and the usage LiteLLM
reports is committed; ``stream=True`` adds ``stream_options={"include_usage": True}``.

Proxy: :class:`BudgetLogger` is a ``CustomLogger``; ``async_pre_call_hook`` holds (raising rejects the
request with HTTP 429), ``async_log_success_event`` commits the ``standard_logging_object``'s usage,
``async_post_call_failure_hook`` (and ``async_log_failure_event``) release. The scope comes from the
virtual key: ``scope_from`` names its fields (``"team_id"``, ``"user_id"``, ``"metadata.budget_scope"``
...), ``scope_names`` maps what they hold to your scope names. In the proxy's ``config.yaml``::

    litellm_settings:
      callbacks: budget_hooks.budget_logger   # a module beside config.yaml defining budget_logger
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from distbudget._core.errors import BudgetExceededError
from distbudget._core.usage import Usage
from distbudget.budget import AsyncBudget, AsyncReservation
from distbudget.integrations._common import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    AnyBudget,
    Api,
    Charge,
    ChatTally,
    Meter,
    attr,
    call_async,
    call_sync,
    first_given,
    force_stream_usage,
    log,
)
from distbudget.manager import AsyncBudgetManager

__all__ = ["BudgetLogger", "acompletion", "completion"]


class LiteLLMTally(ChatTally):
    to_usage = staticmethod(Usage.from_litellm)


def _charge(meter: Meter, kwargs: dict[str, Any]) -> Charge:
    parts = [kwargs.get(k) for k in ("messages", "tools", "functions", "response_format")]
    cap = first_given(kwargs, "max_completion_tokens", "max_tokens")
    charge = meter.plan("litellm.completion", kwargs.get("model"), kwargs, parts, cap, kwargs.get("n"))
    if kwargs.get("stream"):
        force_stream_usage(kwargs)
    return charge


COMPLETION = Api(_charge, LiteLLMTally, Usage.from_litellm, (litellm.exceptions.Timeout,))


def completion(*args: Any, budget: AnyBudget, **kwargs: Any) -> Any:
    """``litellm.completion`` with a budget: held before the call, the reported usage committed.
    ``budget_session_id``, ``budget_scope`` (with a manager), ``budget_request_id`` and
    ``budget_metadata`` are taken off before LiteLLM sees the call."""
    kwargs.update(zip(("model", "messages"), args, strict=False))
    return call_sync(Meter(budget, asynchronous=False), COMPLETION, litellm.completion, kwargs)


async def acompletion(*args: Any, budget: AnyBudget, **kwargs: Any) -> Any:
    """``litellm.acompletion`` with an ``AsyncBudget`` / ``AsyncBudgetManager`` (see :func:`completion`)."""
    kwargs.update(zip(("model", "messages"), args, strict=False))
    return await call_async(Meter(budget, asynchronous=True), COMPLETION, litellm.acompletion, kwargs)


# ---- proxy -------------------------------------------------------------------------------------

Picker = str | Sequence[str] | Callable[[Any, dict[str, Any]], str | None]
MAX_HOLDS = 100_000  # holds awaiting their success or failure event, per logger


def _pick(source: Any, path: str) -> Any:
    """``"team_id"`` or ``"metadata.budget_scope"`` on the key's auth object (or a dict)."""
    value = source
    for step in path.split("."):
        value = attr(value, step)
    return value


def _choose(picker: Picker | None, key: Any, data: dict[str, Any]) -> str | None:
    if picker is None:
        return None
    if callable(picker):
        return picker(key, data)
    for path in [picker] if isinstance(picker, str) else picker:
        value = _pick(key, path)
        if value:
            return str(value)
    return None


class BudgetLogger(CustomLogger):
    """The LiteLLM proxy's budget: hold in ``async_pre_call_hook``, commit on success, release on failure.

    ``budget``: an ``AsyncBudget`` (one scope for every key) or an ``AsyncBudgetManager`` with
    ``scope_from`` — field paths of the virtual key's ``UserAPIKeyAuth`` tried in order (``"user_id"``,
    ``"team_id"``, ``"key_alias"``, ``"metadata.budget_scope"``, ``"team_metadata.budget_scope"`` ...)
    or a callable ``(user_api_key_dict, data) -> scope``; ``scope_names`` maps the value found to a
    scope name (unmapped values are used as they are). A request with no scope is refused.
    ``session_from``: likewise for the session (default: the request's ``litellm_session_id`` or
    ``metadata.session_id``)."""

    def __init__(
        self,
        budget: AsyncBudget | AsyncBudgetManager,
        *,
        scope_from: Picker | None = ("user_id", "team_id"),
        scope_names: Mapping[str, str] | None = None,
        session_from: Picker | None = None,
        default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.meter = Meter(
            budget, default_max_output_tokens=default_max_output_tokens, metadata=metadata, asynchronous=True
        )
        self.scope_from = scope_from
        self.scope_names = dict(scope_names or {})
        self.session_from = session_from
        self.holds: dict[str, tuple[AsyncReservation, Charge]] = {}

    def scope_of(self, user_api_key_dict: Any, data: dict[str, Any]) -> str | None:
        if not self.meter.is_manager:
            return None
        value = _choose(self.scope_from, user_api_key_dict, data)
        return None if value is None else self.scope_names.get(value, value)

    def session_of(self, user_api_key_dict: Any, data: dict[str, Any]) -> str | None:
        if self.session_from is not None:
            return _choose(self.session_from, user_api_key_dict, data)
        session = data.get("litellm_session_id") or _pick(data, "metadata.session_id")
        return None if session is None else str(session)

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        call_id = data.get("litellm_call_id")
        if not call_id:  # the proxy sets it before its hooks; without one a commit could not find the hold
            raise ValueError("distbudget BudgetLogger: the request has no litellm_call_id")
        kwargs = {
            "budget_scope": self.scope_of(user_api_key_dict, data),
            "budget_session_id": self.session_of(user_api_key_dict, data),
            "budget_request_id": str(call_id),
        }
        parts = [data.get(k) for k in ("messages", "tools", "functions", "input")]
        cap = first_given(data, "max_completion_tokens", "max_tokens")
        charge = self.meter.plan("litellm.proxy", data.get("model"), kwargs, parts, cap, data.get("n"))
        try:
            hold = await self.meter.areserve(charge)
        except BudgetExceededError as err:
            err.status_code = 429  # type: ignore[attr-defined]  # the proxy answers with it
            raise
        if len(self.holds) >= MAX_HOLDS:  # events that never came: forget the oldest (its hold expires)
            self.holds.pop(next(iter(self.holds)))
        self.holds[str(call_id)] = (hold, charge)
        return data

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        held = self.holds.pop(str(kwargs.get("litellm_call_id")), None)
        if held is None:
            return
        hold, charge = held
        logged = kwargs.get("standard_logging_object")
        try:
            usage = Usage.from_litellm(logged if logged else response_obj)
            estimated = None
        except Exception:  # never lose the charge for an odd payload: charge the estimate, flagged
            log.exception("distbudget BudgetLogger: no usage in the success event; charging the estimate")
            usage, estimated = charge.estimated(), "the success event reported no usage"
        response_id = attr(logged, "id") if logged else attr(response_obj, "id")
        await self.meter.acommit(hold, charge, usage, estimated, response_id)

    async def _release(self, call_id: Any) -> None:
        held = self.holds.pop(str(call_id), None)
        if held is not None:
            await held[0].release()

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await self._release(kwargs.get("litellm_call_id"))

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: Any = None,
    ) -> None:
        await self._release(request_data.get("litellm_call_id"))
