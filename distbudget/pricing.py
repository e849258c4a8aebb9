"""Model prices: :class:`ModelRates` and the built-in, dated table in ``data/prices.json``.

Unknown models are an explicit policy: without ``default_rates`` a budget raises
:class:`UnknownModelError` (never a silent $0); with it, the model is priced at those rates and a
:class:`BudgetWarning` is issued once per model.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from distbudget._core.money import check_tokens, cost_nano, nano_to_usd, rate_to_nano_per_million
from distbudget._exceptions import BudgetWarning, InvalidInputError, UnknownModelError

_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-latest|-\d{3})$")


@dataclass(frozen=True)
class ModelRates:
    """USD per 1K tokens. ``cached_input_per_1k`` (cache reads), ``cache_write_per_1k`` and
    ``reasoning_per_1k`` default to the input / input / output rate when not given."""

    input_per_1k: float
    output_per_1k: float
    cached_input_per_1k: float | None = None
    cache_write_per_1k: float | None = None
    reasoning_per_1k: float | None = None
    _nano: tuple[int, int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def n(value: float | None, fallback: int, what: str) -> int:
            return fallback if value is None else rate_to_nano_per_million(value, what)

        inp = n(self.input_per_1k, 0, "input_per_1k")
        out = n(self.output_per_1k, 0, "output_per_1k")
        object.__setattr__(
            self,
            "_nano",
            (
                inp,
                out,
                n(self.cached_input_per_1k, inp, "cached_input_per_1k"),
                n(self.cache_write_per_1k, inp, "cache_write_per_1k"),
                n(self.reasoning_per_1k, out, "reasoning_per_1k"),
            ),
        )

    @classmethod
    def for_model(cls, model: str) -> ModelRates:
        """Built-in list price for ``model`` (dated aliases and ``provider/`` prefixes resolve)."""
        rates = _lookup(model)
        if rates is None:
            raise UnknownModelError(f"no built-in price for model {model!r}; pass rates= or default_rates=")
        return rates

    def cost_nano(
        self,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> int:
        """Exact cost in nano-USD. Cached/cache-write tokens are part of ``input_tokens``,
        reasoning tokens part of ``output_tokens`` (as OpenAI reports usage)."""
        if cached_input_tokens + cache_write_tokens > input_tokens:
            raise InvalidInputError("cached_input_tokens + cache_write_tokens exceed input_tokens")
        if reasoning_tokens > output_tokens:
            raise InvalidInputError("reasoning_tokens exceed output_tokens")
        inp, out, cached, write, reasoning = self._nano
        plain_in = input_tokens - cached_input_tokens - cache_write_tokens
        per_million = (
            plain_in * inp
            + cached_input_tokens * cached
            + cache_write_tokens * write
            + (output_tokens - reasoning_tokens) * out
            + reasoning_tokens * reasoning
        )
        return cost_nano(1, per_million)

    def worst_case_nano(self, input_tokens: int, max_output_tokens: int) -> int:
        """What a reservation holds: input at the input rate, output at max(output, reasoning)."""
        inp, out, _, _, reasoning = self._nano
        return cost_nano(1, input_tokens * inp + max_output_tokens * max(out, reasoning))

    def estimate_cost(self, input_tokens: int, output_tokens: int = 0) -> float:
        check_tokens(input_tokens, "input_tokens")
        check_tokens(output_tokens, "output_tokens")
        return nano_to_usd(self.cost_nano(input_tokens, output_tokens))


@lru_cache(maxsize=1)
def price_table() -> dict[str, Any]:
    """The built-in table (``as_of``, ``models`` per 1M tokens, ``aliases``)."""
    text = (resources.files("distbudget") / "data" / "prices.json").read_text("utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def _from_entry(entry: Mapping[str, Any]) -> ModelRates:
    def per_1k(key: str) -> float | None:
        v = entry.get(key)
        return None if v is None else float(v) / 1000

    return ModelRates(
        input_per_1k=float(entry["input"]) / 1000,
        output_per_1k=float(entry["output"]) / 1000,
        cached_input_per_1k=per_1k("cached_input"),
        cache_write_per_1k=per_1k("cache_write"),
        reasoning_per_1k=per_1k("reasoning"),
    )


@lru_cache(maxsize=1024)
def _lookup(model: str) -> ModelRates | None:
    name = _table_id(model)
    return None if name is None else _from_entry(price_table()["models"][name])


@lru_cache(maxsize=4096)
def _table_id(model: str) -> str | None:
    table = price_table()
    models, aliases = table["models"], table["aliases"]
    candidates = [model, model.lower()]
    if "/" in model:
        candidates.append(model.rsplit("/", 1)[1].lower())
    for name in list(candidates):
        stripped = _SUFFIX.sub("", name)
        if stripped != name:
            candidates.append(stripped)
    for candidate in candidates:
        name = aliases.get(candidate, candidate)
        if name in models:
            return str(name)
    return None


class PriceBook:
    """How one budget prices a model: custom ``rates`` first, then the built-in table, then
    ``default_rates`` (with a warning), else :class:`UnknownModelError`."""

    def __init__(self, rates: Mapping[str, ModelRates] | None = None, default_rates: ModelRates | None = None) -> None:
        if rates is not None and not isinstance(rates, Mapping):
            raise TypeError("rates must be a dict of model name -> ModelRates")
        for name, r in (rates or {}).items():
            if not isinstance(r, ModelRates):
                raise TypeError(f"rates[{name!r}] must be a ModelRates")
        if default_rates is not None and not isinstance(default_rates, ModelRates):
            raise TypeError("default_rates must be a ModelRates")
        self.custom = dict(rates or {})
        self.default_rates = default_rates
        self._warned: set[str] = set()

    def model_id(self, model: str) -> str | None:
        """The canonical id of ``model``: a custom rate's name, else the table's, else None."""
        if model in self.custom:
            return model
        return _table_id(model)

    def models(self) -> list[str]:
        return sorted({*price_table()["models"], *self.custom})

    def rates_for(self, model: str) -> ModelRates:
        canonical = _table_id(model)
        r = self.custom.get(model) or (canonical and self.custom.get(canonical)) or _lookup(model)
        if r is not None:
            return r
        if self.default_rates is None:
            raise UnknownModelError(
                f"no price for model {model!r}: pass rates={{{model!r}: ModelRates(...)}} "
                "or default_rates=ModelRates(...)"
            )
        if model not in self._warned:
            self._warned.add(model)
            warnings.warn(f"model {model!r} has no known price; using default_rates", BudgetWarning, stacklevel=4)
        return self.default_rates
