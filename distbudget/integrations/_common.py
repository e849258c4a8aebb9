"""What every integration shares: the estimate of a request before it is sent, the hold's worst case,
where a call is charged (budget or manager scope, session), the stable request id of a logical call,
and charging what a call (or a stream cut short) used.

A call is metered in three steps, each one place here: :meth:`Meter.plan` (pure: model, input
estimate, output cap, session, scope, request id), ``reserve`` (one hold of the worst case, before any
HTTP request: a refusal sends nothing), then ``commit`` of the actual :class:`Usage` — or, when a stream
ended before the provider reported usage, of an estimate flagged ``"estimated": true`` in the ledger
entry's metadata — or ``release`` when the provider answered an error (nothing was served).

Input estimate: ``tiktoken`` when the ``distbudget[tokens]`` extra is installed and the model is one it
knows (and its encoding can load: it is downloaded once, then cached; set ``TIKTOKEN_CACHE_DIR`` on
machines without internet). Otherwise a conservative estimate: one token per three UTF-8 bytes of every
string in the request (English averages about four bytes per token), four per message, a fixed
:data:`IMAGE_TOKENS` per image. The estimate is only held: the commit charges what the provider
reports.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar

from distbudget._core.errors import BudgetExceededError, BudgetWarning, InvalidInputError
from distbudget._core.models import first_known
from distbudget._core.usage import Usage, field_value
from distbudget.budget import AsyncBudget, AsyncReservation, Budget, Reservation
from distbudget.manager import AsyncBudgetManager, BudgetManager

log = logging.getLogger("distbudget.integrations")

DEFAULT_MAX_OUTPUT_TOKENS = 4096  # held when a request sets no cap and the price snapshot has no maximum
IMAGE_TOKENS = 1600  # held per image part (OpenAI's high-detail 1024x1024 tile count is ~765; Claude ~1600)
BYTES_PER_TOKEN = 3  # the fallback estimate: conservative against ~4 for English text
MESSAGE_OVERHEAD = 4  # role and separators per message, as OpenAI's cookbook counts them
REQUEST_OVERHEAD = 3

AnyBudget = Budget | BudgetManager | AsyncBudget | AsyncBudgetManager
attr = field_value  # ``obj.name`` or ``obj[name]``, None when absent: SDK objects and their JSON alike
_IMAGE_TYPES = frozenset({"image", "image_url", "input_image", "image_file"})


# ---- estimates ---------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _encoding(model: str) -> Any:
    """tiktoken's encoding for an OpenAI model, or None (not installed, unknown model, cannot load)."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        return tiktoken.encoding_for_model(model.rsplit("/", 1)[-1])
    except KeyError:  # not an OpenAI model: tiktoken would undercount other tokenizers
        return None
    except Exception as exc:  # the encoding file could not be downloaded or read
        log.info("tiktoken cannot load the encoding for %r (%s); using the byte estimate", model, exc)
        return None


def estimate_text_tokens(model: str, text: str) -> int:
    """Tokens of ``text`` for ``model``: tiktoken's count when available, else ceil(bytes / 3)."""
    if not text:
        return 0
    encoding = _encoding(model)
    if encoding is not None:
        return len(encoding.encode(text, disallowed_special=()))
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / BYTES_PER_TOKEN)


def _walk(value: Any, texts: list[str], counts: list[int]) -> None:
    """Collect the strings of a request part; count messages (counts[0]) and images (counts[1])."""
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, Mapping):
        kind = value.get("type")
        if kind in _IMAGE_TYPES or (kind is None and "image_url" in value):
            counts[1] += 1
            return
        if "role" in value:
            counts[0] += 1
        for key, item in value.items():
            if key not in ("role", "type", "cache_control"):
                _walk(item, texts, counts)
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        for item in value:
            _walk(item, texts, counts)
    elif isinstance(value, type):  # a schema class (a pydantic response_format): its JSON schema is sent
        schema = getattr(value, "model_json_schema", None)
        if callable(schema):
            _walk(schema(), texts, counts)
    elif hasattr(value, "model_dump"):  # a pydantic message (LangChain, SDK types)
        _walk(value.model_dump(), texts, counts)


def estimate_request_tokens(model: str, *parts: Any) -> int:
    """Input tokens of a request before it is sent: its messages, system prompt, tools and so on."""
    texts: list[str] = []
    counts = [0, 0]
    for part in parts:
        if part is not None:
            _walk(part, texts, counts)
    text = "\n".join(texts)
    return (
        estimate_text_tokens(model, text) + MESSAGE_OVERHEAD * counts[0] + IMAGE_TOKENS * counts[1] + REQUEST_OVERHEAD
    )


@lru_cache(maxsize=1)
def _max_outputs() -> dict[str, int]:
    """Exact (lower-case) model name -> maximum output tokens, from the bundled price snapshot."""
    data = json.loads((resources.files("distbudget") / "data" / "prices.json").read_text("utf-8"))
    out: dict[str, int] = {}
    for name, entry in data["models"].items():
        value = entry.get("max_output_tokens")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[name.lower()] = value
    for alias, target in data.get("aliases", {}).items():
        if target.lower() in out:
            out.setdefault(alias.lower(), out[target.lower()])
    return out


def max_output_tokens(model: str) -> int | None:
    """The model's maximum output tokens from the price snapshot, None when it does not say. The one
    place that reads it; names resolve as prices do (provider prefixes, case, dated snapshots)."""
    return first_known(model, _max_outputs().get)


def output_cap(model: str, requested: Any, default: int) -> int:
    """What a call can write: the request's own cap, else the model's maximum, else ``default``."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
            raise InvalidInputError(f"max output tokens must be a non-negative int, got {requested!r}")
        return requested
    return max_output_tokens(model) or default


def _choices(n: Any) -> int:
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"n must be a positive int, got {n!r}")
    return n


def force_stream_usage(kwargs: dict[str, Any]) -> None:
    """Ask an OpenAI-shaped stream to end with a usage chunk (``stream_options.include_usage``)."""
    options = kwargs.get("stream_options")
    kwargs["stream_options"] = {**(options if isinstance(options, Mapping) else {}), "include_usage": True}


def first_given(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = mapping.get(key)
        if value is not None:
            return value
    return None


# ---- one logical call ------------------------------------------------------------------------


@dataclass(frozen=True)
class Charge:
    """One logical call, fixed before it is sent (the SDK's own retries reuse it: one hold, one commit)."""

    api: str
    model: str
    input_estimate: int
    max_output: int
    session_id: str | None
    scope: str | None
    request_id: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def estimated(self, output_text: str = "", known: Usage | None = None) -> Usage:
        """What a call cut short is charged: the input (reported, else estimated) plus the output it had
        written so far (reported, else estimated from the text received). Never zero."""
        known_output = known.output_tokens if known is not None else 0
        output = max(known_output, estimate_text_tokens(self.model, output_text))
        if known is not None and known.input_tokens:
            return Usage(
                known.input_tokens,
                output,
                known.cached_input_tokens,
                known.cache_write_tokens,
                min(known.reasoning_tokens, output),
                known.cache_write_1h_tokens,
            )
        return Usage(max(self.input_estimate, 1), output)


def commit_metadata(charge: Charge, estimated: str | None, response_id: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"integration": charge.api, **charge.metadata}
    if response_id:
        meta["response_id"] = response_id
    if estimated is not None:
        meta["estimated"] = True
        meta["estimate_reason"] = estimated
    return meta


def _over_after_commit(err: BudgetExceededError) -> None:
    # The call was made and is charged (err.record); raising now would throw away a paid answer.
    warnings.warn(f"distbudget: {err.message} (charged; the next call is refused)", BudgetWarning, stacklevel=4)


class Meter:
    """Where a client's calls are charged: a budget (or a manager and a scope), a session, defaults."""

    def __init__(
        self,
        budget: AnyBudget,
        *,
        session_id: str | None = None,
        scope: str | None = None,
        default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
        metadata: Mapping[str, Any] | None = None,
        asynchronous: bool,
    ) -> None:
        wanted: tuple[type, ...] = (AsyncBudget, AsyncBudgetManager) if asynchronous else (Budget, BudgetManager)
        if not isinstance(budget, wanted):
            kind = (
                "an async client needs an AsyncBudget or AsyncBudgetManager"
                if asynchronous
                else ("a sync client needs a Budget or BudgetManager")
            )
            raise TypeError(f"{kind}, got {type(budget).__name__}")
        if isinstance(default_max_output_tokens, bool) or not isinstance(default_max_output_tokens, int):
            raise TypeError("default_max_output_tokens must be an int")
        if default_max_output_tokens <= 0:
            raise InvalidInputError("default_max_output_tokens must be positive")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError("metadata must be a dict")
        self.budget = budget
        self.session_id = session_id
        self.scope = scope
        self.default_max_output_tokens = default_max_output_tokens
        self.metadata = dict(metadata or {})
        self.asynchronous = asynchronous
        self.is_manager = isinstance(budget, (BudgetManager, AsyncBudgetManager))

    def view(self, session_id: str | None, scope: str | None) -> Meter:
        """The same meter charging another session (and, for a manager, scope)."""
        meter = object.__new__(Meter)
        meter.__dict__.update(self.__dict__)
        if session_id is not None:
            meter.session_id = session_id
        if scope is not None:
            meter.scope = scope
        return meter

    def plan(
        self,
        api: str,
        model: Any,
        kwargs: dict[str, Any],
        input_parts: Iterable[Any],
        requested_cap: Any,
        choices: Any = None,
    ) -> Charge:
        """Pop the per-call keywords (``budget_session_id``, ``budget_scope``, ``budget_request_id``,
        ``budget_metadata``) from ``kwargs`` and fix the call's charge (pure). ``choices``
        (OpenAI's ``n``): that many answers, that many times the output cap held."""
        session_id = kwargs.pop("budget_session_id", None) or self.session_id
        scope = kwargs.pop("budget_scope", None) or self.scope
        request_id = kwargs.pop("budget_request_id", None) or uuid.uuid4().hex
        extra = kwargs.pop("budget_metadata", None)
        if not isinstance(model, str) or not model:
            raise InvalidInputError(f"model must be a non-empty string, got {model!r}")
        if self.is_manager and scope is None:
            raise TypeError("calls through a BudgetManager need a scope: budgeted(..., scope=) or budget_scope=")
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError("budget_metadata must be a dict")
        return Charge(
            api=api,
            model=model,
            input_estimate=estimate_request_tokens(model, *input_parts),
            max_output=output_cap(model, requested_cap, self.default_max_output_tokens) * _choices(choices),
            session_id=session_id,
            scope=scope,
            request_id=request_id,
            metadata={**self.metadata, **(extra or {})},
        )

    # ---- sync ----

    def reserve(self, charge: Charge) -> Reservation:
        c = charge
        if isinstance(self.budget, BudgetManager):
            assert c.scope is not None
            return self.budget.reserve(
                c.scope, c.model, c.input_estimate, c.max_output, session_id=c.session_id, request_id=c.request_id
            )
        assert isinstance(self.budget, Budget)
        return self.budget.reserve(
            c.model, c.input_estimate, c.max_output, session_id=c.session_id, request_id=c.request_id
        )

    @staticmethod
    def commit(
        hold: Reservation, charge: Charge, usage: Usage, estimated: str | None, response_id: str | None = None
    ) -> None:
        meta = commit_metadata(charge, estimated, response_id)
        try:
            hold.commit(usage, metadata=meta)
        except BudgetExceededError as err:
            _over_after_commit(err)

    # ---- async ----

    async def areserve(self, charge: Charge) -> AsyncReservation:
        c = charge
        if isinstance(self.budget, AsyncBudgetManager):
            assert c.scope is not None
            return await self.budget.reserve(
                c.scope, c.model, c.input_estimate, c.max_output, session_id=c.session_id, request_id=c.request_id
            )
        assert isinstance(self.budget, AsyncBudget)
        return await self.budget.reserve(
            c.model, c.input_estimate, c.max_output, session_id=c.session_id, request_id=c.request_id
        )

    @staticmethod
    async def acommit(
        hold: AsyncReservation, charge: Charge, usage: Usage, estimated: str | None, response_id: str | None = None
    ) -> None:
        meta = commit_metadata(charge, estimated, response_id)
        try:
            await hold.commit(usage, metadata=meta)
        except BudgetExceededError as err:
            _over_after_commit(err)


# ---- streams -----------------------------------------------------------------------------------


class Tally:
    """Reads a stream's events as they pass (sans I/O): the usage once reported, the text so far."""

    def __init__(self, charge: Charge) -> None:
        self.charge = charge
        self.usage: Usage | None = None  # the latest usage the stream reported (cumulative, never summed)
        self.complete = False  # the provider's final usage arrived
        self.text: list[str] = []
        self.response_id: str | None = None

    def feed(self, event: Any) -> None:  # pragma: no cover - each provider overrides it
        raise NotImplementedError

    def settle(self, reason: str) -> tuple[Usage, str | None]:
        """(usage to commit, None) when the stream reported its final usage, else an estimate and why."""
        if self.complete and self.usage is not None:
            return self.usage, None
        return self.charge.estimated("".join(self.text), self.usage), reason


def _delegate(wrapper: object, name: str) -> Any:
    """``wrapper._inner.name`` (never recursing when ``_inner`` is not set yet)."""
    inner = wrapper.__dict__.get("_inner")
    if inner is None:
        raise AttributeError(name)
    return getattr(inner, name)


class ChatTally(Tally):
    """OpenAI-shaped chat chunks (OpenAI, LiteLLM): text deltas, then (``include_usage``) a last chunk
    with the usage."""

    to_usage: Callable[[Any], Usage] = staticmethod(Usage.from_openai)

    def feed(self, chunk: Any) -> None:
        self.response_id = self.response_id or attr(chunk, "id")
        usage = attr(chunk, "usage")
        if usage is not None:
            self.usage = self.to_usage(usage)
            self.complete = True
        for choice in attr(chunk, "choices") or ():
            delta = attr(choice, "delta")
            for name in ("content", "refusal", "reasoning_content"):
                text = attr(delta, name)
                if isinstance(text, str):
                    self.text.append(text)
            for call in attr(delta, "tool_calls") or ():
                function = attr(call, "function")
                for name in ("name", "arguments"):
                    text = attr(function, name)
                    if isinstance(text, str):
                        self.text.append(text)


class MeteredStream:
    """A sync stream that commits once it ends: exhausted (the reported usage), or closed, broken off,
    interrupted or dropped early (an estimate, flagged). Everything else is the SDK's stream."""

    def __init__(self, inner: Any, tally: Tally, finish: Callable[[Usage, str | None, str | None], None]) -> None:
        self._inner = inner
        self._iterator = iter(inner)
        self._tally = tally
        self._finish_cb = finish
        self._done = False

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        usage, estimated = self._tally.settle(reason)
        self._finish_cb(usage, estimated, self._tally.response_id)

    def __iter__(self) -> MeteredStream:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._iterator)
        except StopIteration:
            self._finish("stream ended before its usage")
            raise
        except BaseException:
            self._finish("stream interrupted")
            raise
        self._tally.feed(item)
        return item

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish("stream closed early")

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return _delegate(self, name)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            try:
                self._finish("stream dropped unclosed")
            except Exception:  # a finalizer must not raise; the hold expires by itself
                log.exception("distbudget: could not charge a dropped stream")


class MeteredAsyncStream:
    """The asyncio twin of :class:`MeteredStream` (a stream dropped unclosed is not charged by a
    finalizer, which cannot await: its hold expires; close streams or use ``async with``)."""

    def __init__(self, inner: Any, tally: Tally, finish: Callable[[Usage, str | None, str | None], Any]) -> None:
        self._inner = inner
        self._iterator = inner.__aiter__()
        self._tally = tally
        self._finish_cb = finish
        self._done = False

    async def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        usage, estimated = self._tally.settle(reason)
        await self._finish_cb(usage, estimated, self._tally.response_id)

    def __aiter__(self) -> MeteredAsyncStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._iterator.__anext__()
        except StopAsyncIteration:
            await self._finish("stream ended before its usage")
            raise
        except BaseException:
            await self._finish("stream interrupted")
            raise
        self._tally.feed(item)
        return item

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            await self._finish("stream closed early")

    async def __aenter__(self) -> MeteredAsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return _delegate(self, name)


# ---- one call, start to end --------------------------------------------------------------------

ToUsage = Callable[[Any], Usage]
NO_USAGE = "the response reported no usage"
TIMED_OUT = "timed out: the provider may have served it"


@dataclass(frozen=True)
class Api:
    """How one SDK method is metered: ``plan`` pops the per-call keywords and fixes the charge,
    ``tally`` reads its stream, ``to_usage`` its response's usage; ``timeouts`` are the SDK's."""

    plan: Callable[[Meter, dict[str, Any]], Charge]
    tally: Callable[[Charge], Tally]
    to_usage: ToUsage
    timeouts: tuple[type[BaseException], ...]


def _response_usage(result: Any, charge: Charge, to_usage: ToUsage) -> tuple[Usage, str | None]:
    usage = attr(result, "usage")
    if usage is None:
        return charge.estimated(), NO_USAGE
    return to_usage(usage), None


def call_sync(meter: Meter, api: Api, send: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Hold, send (the SDK retries inside: one hold, one commit), commit what was served. An error
    answer releases the hold; a timeout charges the input estimate (flagged: it may have been served)."""
    charge = api.plan(meter, kwargs)
    hold = meter.reserve(charge)
    try:
        result = send(**kwargs)
    except api.timeouts:
        meter.commit(hold, charge, charge.estimated(), TIMED_OUT)
        raise
    except BaseException:
        hold.release()
        raise
    if kwargs.get("stream"):
        return MeteredStream(result, api.tally(charge), lambda u, est, rid: meter.commit(hold, charge, u, est, rid))
    usage, estimated = _response_usage(result, charge, api.to_usage)
    meter.commit(hold, charge, usage, estimated, attr(result, "id"))
    return result


async def call_async(meter: Meter, api: Api, send: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """The asyncio twin of :func:`call_sync` (``send`` returns an awaitable)."""
    charge = api.plan(meter, kwargs)
    hold = await meter.areserve(charge)
    try:
        result = await send(**kwargs)
    except api.timeouts:
        await meter.acommit(hold, charge, charge.estimated(), TIMED_OUT)
        raise
    except BaseException:
        await hold.release()
        raise
    if kwargs.get("stream"):

        async def finish(usage: Usage, estimated: str | None, response_id: str | None) -> None:
            await meter.acommit(hold, charge, usage, estimated, response_id)

        return MeteredAsyncStream(result, api.tally(charge), finish)
    usage, estimated = _response_usage(result, charge, api.to_usage)
    await meter.acommit(hold, charge, usage, estimated, attr(result, "id"))
    return result


# ---- wrapped clients ---------------------------------------------------------------------------


class Proxy:
    """A view of an SDK object: what it does not override is the object's own."""

    def __init__(self, inner: Any, meter: Meter) -> None:
        self._inner = inner
        self._meter = meter

    def __getattr__(self, name: str) -> Any:
        return _delegate(self, name)


class Endpoint(Proxy):
    """An SDK resource whose ``create`` is metered (``api``); the rest is the resource's own."""

    def __init__(self, inner: Any, meter: Meter, api: Api) -> None:
        super().__init__(inner, meter)
        self._api = api

    def create(self, **kwargs: Any) -> Any:
        return call_sync(self._meter, self._api, self._inner.create, kwargs)


class AsyncEndpoint(Endpoint):
    async def create(self, **kwargs: Any) -> Any:
        return await call_async(self._meter, self._api, self._inner.create, kwargs)


def endpoint(inner: Any, meter: Meter, api: Api) -> Endpoint:
    """The metered view of a resource of a sync or an async client."""
    return (AsyncEndpoint if meter.asynchronous else Endpoint)(inner, meter, api)


C = TypeVar("C", bound="BudgetedClient")


class BudgetedClient(Proxy):
    """A budgeted SDK client (sync or async): the budgeted resources are the subclass's, the rest is
    the client's."""

    @property
    def unbudgeted(self) -> Any:
        """The wrapped client itself."""
        return self._inner

    def with_session(self: C, session_id: str | None = None, *, scope: str | None = None) -> C:
        """A view of this client charging another session (and, with a manager, another scope)."""
        return type(self)(self._inner, self._meter.view(session_id, scope))

    def with_options(self: C, **options: Any) -> C:
        """The SDK's ``with_options`` (timeouts, retries ...), still budgeted."""
        return type(self)(self._inner.with_options(**options), self._meter)

    copy = with_options


def wrap_client(client: Any, budget: AnyBudget, sdk: tuple[type, type], wrapper: type[C], **options: Any) -> C:
    """``budgeted()`` of every SDK: ``sdk`` = (its sync client class, its async client class);
    ``options`` are :class:`Meter`'s (``session_id``, ``scope``, ``default_max_output_tokens``,
    ``metadata``)."""
    asynchronous = isinstance(client, sdk[1])
    if not asynchronous and not isinstance(client, sdk[0]):
        raise TypeError(f"client must be a {sdk[0].__name__} or {sdk[1].__name__}, got {type(client).__name__}")
    return wrapper(client, Meter(budget, asynchronous=asynchronous, **options))
