"""The usage of one call, whatever shape the provider reported it in.

One normal form: ``input_tokens`` counts every input token, cache reads and cache writes included,
and ``output_tokens`` every output token, reasoning included (OpenAI's convention). Anthropic reports
cache reads and writes *beside* ``input_tokens``; :meth:`Usage.from_anthropic` adds them in, so a
commit never undercharges a cached call and never fails ``cached + written <= input``.

Each ``from_*`` accepts the SDK's object or its JSON (a mapping); a detail object may be missing or
``None``. Pure: no I/O. Bad input raises :class:`InvalidInputError` (or ``TypeError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distbudget._core.errors import InvalidInputError
from distbudget._core.money import check_tokens


def field_value(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``; None when absent (SDK objects and their JSON alike)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(obj: Any, name: str, *path: str) -> int:
    """A token count at ``obj.name[.path...]``: 0 when any step is missing or None."""
    value = field_value(obj, name)
    for step in path:
        value = field_value(value, step)
    if value is None:
        return 0
    try:
        return check_tokens(value, name if not path else f"{name}.{'.'.join(path)}")
    except TypeError as err:
        raise InvalidInputError(str(err)) from None


def _usage_of(source: Any) -> Any:
    """A response (which carries ``usage``) or the usage itself."""
    if source is None:
        raise InvalidInputError("no usage reported")
    inner = field_value(source, "usage")
    if inner is not None and not isinstance(inner, (int, float, str)):
        return inner
    return source


@dataclass(frozen=True)
class Usage:
    """Tokens of one call. ``input_tokens`` includes ``cached_input_tokens`` (cache reads) and
    ``cache_write_tokens`` (of which ``cache_write_1h_tokens`` were written for one hour, the rest for
    five minutes); ``output_tokens`` includes ``reasoning_tokens``."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def __post_init__(self) -> None:
        for name in (
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "cache_write_1h_tokens",
        ):
            try:
                check_tokens(getattr(self, name), name)
            except TypeError as err:
                raise InvalidInputError(str(err)) from None
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            raise InvalidInputError(
                f"cached_input_tokens ({self.cached_input_tokens}) + cache_write_tokens ({self.cache_write_tokens}) "
                f"exceed input_tokens ({self.input_tokens}): input_tokens must include cache reads and writes "
                "(Usage.from_anthropic adds them for you)"
            )
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            raise InvalidInputError("cache_write_1h_tokens exceed cache_write_tokens (they are a part of them)")
        if self.reasoning_tokens > self.output_tokens:
            raise InvalidInputError("reasoning_tokens exceed output_tokens (they are a part of them)")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cache_write_5m_tokens(self) -> int:
        return self.cache_write_tokens - self.cache_write_1h_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        """OpenAI usage: Chat Completions (``prompt_tokens``, ``prompt_tokens_details.cached_tokens`` and
        ``.cache_write_tokens``, ``completion_tokens_details.reasoning_tokens``) or Responses
        (``input_tokens``, ``input_tokens_details.cached_tokens`` and ``.cache_write_tokens``,
        ``output_tokens_details.reasoning_tokens``). Cached and cache-write tokens are already inside
        the prompt count. Accepts the usage or a response carrying it."""
        u = _usage_of(usage)
        for inp, out in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
            if field_value(u, inp) is not None or field_value(u, out) is not None:
                details_in, details_out = inp + "_details", out + "_details"
                return cls(
                    input_tokens=_count(u, inp),
                    output_tokens=_count(u, out),
                    cached_input_tokens=_count(u, details_in, "cached_tokens"),
                    cache_write_tokens=_count(u, details_in, "cache_write_tokens"),
                    reasoning_tokens=_count(u, details_out, "reasoning_tokens"),
                )
        raise InvalidInputError(f"not an OpenAI usage (no prompt_tokens or input_tokens): {usage!r}")

    @classmethod
    def from_anthropic(cls, usage: Any) -> Usage:
        """Anthropic usage: ``input_tokens`` are only the uncached input; ``cache_read_input_tokens``
        and ``cache_creation_input_tokens`` come on top and are added in here. The 1-hour part of the
        cache writes comes from ``cache_creation.ephemeral_1h_input_tokens``."""
        u = _usage_of(usage)
        if field_value(u, "input_tokens") is None and field_value(u, "output_tokens") is None:
            raise InvalidInputError(f"not an Anthropic usage (no input_tokens or output_tokens): {usage!r}")
        read = _count(u, "cache_read_input_tokens")
        written = _count(u, "cache_creation_input_tokens")
        one_hour = _count(u, "cache_creation", "ephemeral_1h_input_tokens")
        if not written:  # only the per-TTL breakdown was given
            written = one_hour + _count(u, "cache_creation", "ephemeral_5m_input_tokens")
        return cls(
            input_tokens=_count(u, "input_tokens") + read + written,
            output_tokens=_count(u, "output_tokens"),
            cached_input_tokens=read,
            cache_write_tokens=written,
            cache_write_1h_tokens=min(one_hour, written),
        )

    @classmethod
    def from_litellm(cls, usage: Any) -> Usage:
        """LiteLLM usage (OpenAI-shaped for every provider; ``prompt_tokens`` already include cache reads
        and writes): a ``ModelResponse``, its ``usage``, or the ``usage_object`` / fields of a
        ``standard_logging_object``. Cache writes: ``prompt_tokens_details.cache_write_tokens`` or
        ``cache_creation_input_tokens``, their 1-hour part in ``prompt_tokens_details.cache_creation_token_details``."""
        u = _usage_of(usage)
        logged = field_value(field_value(u, "metadata"), "usage_object")  # a standard_logging_object
        if logged:
            u = logged
        if field_value(u, "prompt_tokens") is None and field_value(u, "completion_tokens") is None:
            raise InvalidInputError(f"not a LiteLLM usage (no prompt_tokens): {usage!r}")
        base = cls.from_openai(u)
        cached = base.cached_input_tokens or _count(u, "cache_read_input_tokens")
        written = base.cache_write_tokens or _count(u, "cache_creation_input_tokens")
        one_hour = _count(u, "prompt_tokens_details", "cache_creation_token_details", "ephemeral_1h_input_tokens")
        return cls(
            input_tokens=base.input_tokens,
            output_tokens=base.output_tokens,
            cached_input_tokens=cached,
            cache_write_tokens=written,
            reasoning_tokens=base.reasoning_tokens,
            cache_write_1h_tokens=min(one_hour, written),
        )

    @classmethod
    def from_langchain(cls, usage_metadata: Any) -> Usage:
        """LangChain ``usage_metadata`` (an ``AIMessage``'s, or the dict): ``input_tokens`` is the sum of
        every input type; ``input_token_details.cache_read`` / ``cache_creation`` (and
        ``ephemeral_1h_input_tokens``), ``output_token_details.reasoning``."""
        u = field_value(usage_metadata, "usage_metadata") or usage_metadata
        if field_value(u, "input_tokens") is None and field_value(u, "output_tokens") is None:
            raise InvalidInputError(f"not a LangChain usage_metadata (no input_tokens): {usage_metadata!r}")
        written = _count(u, "input_token_details", "cache_creation")
        return cls(
            input_tokens=_count(u, "input_tokens"),
            output_tokens=_count(u, "output_tokens"),
            cached_input_tokens=_count(u, "input_token_details", "cache_read"),
            cache_write_tokens=written,
            reasoning_tokens=_count(u, "output_token_details", "reasoning"),
            cache_write_1h_tokens=min(written, _count(u, "input_token_details", "ephemeral_1h_input_tokens")),
        )


def charge_args(
    input_tokens: int | Usage,
    output_tokens: int | None,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> tuple[int, int, int, int, int, int]:
    """``record()``/``commit()``'s token arguments, given as numbers or as one :class:`Usage` in place
    of ``input_tokens``: (input, output, cached, cache write, reasoning, the 1-hour part of the cache
    write). A ``Usage`` comes alone."""
    if isinstance(input_tokens, Usage):
        if output_tokens is not None or cached_input_tokens or cache_write_tokens or reasoning_tokens:
            raise TypeError("pass either a Usage or token counts, not both")
        u = input_tokens
        return (
            u.input_tokens,
            u.output_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.reasoning_tokens,
            u.cache_write_1h_tokens,
        )
    if output_tokens is None:
        raise TypeError("output_tokens is required (or pass a Usage instead of input_tokens)")
    return input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, 0
