"""Model prices: :class:`ModelRates` (one model's rates) and :class:`PriceBook` (how a budget
prices any model name). Pure: the only I/O is reading a price file the caller names, or the
bundled snapshot ``distbudget/data/prices.json``.

Units. The API takes USD per 1M tokens (:meth:`ModelRates.per_million`); the per-1K constructor
``ModelRates(input_per_1k, output_per_1k)`` stays for agent-budget code. Inside, a rate is integer
nano-USD per million tokens, so a charge is exact integer arithmetic.

Pricing rules (one place each):

- Cached reads, cache writes (5 min and 1 h) are part of ``input_tokens``; reasoning tokens part
  of ``output_tokens`` (as OpenAI reports usage).
- Long-context tiers are *cliffs*: when a request's input tokens (cached ones included) exceed a
  tier's threshold, the WHOLE request (input and output) is priced at that tier's rates, as
  Google, Anthropic and OpenAI bill them.
- A service tier (``batch``, ``flex``, ``priority``, ...) selects that tier's rates; a model
  without that tier is priced at its standard rates.
- Unknown models are an explicit policy: without ``default_rates`` :class:`UnknownModelError`
  (never a silent $0); with it, those rates and a :class:`BudgetWarning` once per model and book.
- A book carries its date; one older than ``max_age_days`` (default 60) logs a warning once per
  process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

from distbudget._core.errors import BudgetWarning, InvalidInputError, UnknownModelError
from distbudget._core.models import canonical_model, first_known, name_forms
from distbudget._core.money import check_tokens, cost_nano, nano_to_usd, rate_to_nano_per_million

log = logging.getLogger("distbudget.prices")

DEFAULT_MAX_AGE_DAYS = 60
# Names a caller may pass for the standard tier (OpenAI reports "default"; "auto" means "whatever
# the project's default is", which is the standard price unless the caller says otherwise).
STANDARD_TIERS = frozenset({"standard", "default", "auto"})
# Service tiers a caller may name even for a model that has no such price (then: standard rates).
KNOWN_SERVICE_TIERS = frozenset({"batch", "flex", "priority"})
# The per-1K fields of every ModelRates, in the order of the constructor.
_RATE_FIELDS = ("input_per_1k", "output_per_1k", "cached_input_per_1k", "cache_write_per_1k", "reasoning_per_1k")
_CACHE_LIMIT = 4096  # resolved names remembered per book (bounded: names come from callers)


def _per_1k(per_million: object, what: str) -> float | None:
    """A USD-per-1M rate as USD per 1K (exact decimal division, then the nearest float)."""
    if per_million is None:
        return None
    if isinstance(per_million, bool) or not isinstance(per_million, (int, float, Decimal, str)):
        raise TypeError(f"{what} must be a number (USD per 1M tokens), got {type(per_million).__name__}")
    try:
        d = per_million if isinstance(per_million, Decimal) else Decimal(str(per_million))
    except InvalidOperation:
        raise InvalidInputError(f"{what} is not a number: {per_million!r}") from None
    return float(d / 1000)


@dataclass(frozen=True)
class ModelRates:
    """One model's rates, USD per 1K tokens (``ModelRates.per_million`` takes USD per 1M).

    ``cached_input_per_1k`` (cache reads) and ``cache_write_per_1k`` default to the input rate,
    ``cache_write_1h_per_1k`` to the cache-write rate, ``reasoning_per_1k`` to the output rate.
    ``long_context`` holds ``(threshold_tokens, rates)`` pairs, ascending: above a threshold the
    whole request is priced at those rates (a cliff). ``service_tiers`` holds ``(name, rates)``
    pairs (``batch``, ``flex``, ``priority``, ...), each with its own ``long_context``.
    ``ModelRates()`` is agent-budget's default, $0.002 / 1K for both.
    """

    input_per_1k: float = 0.002
    output_per_1k: float = 0.002
    cached_input_per_1k: float | None = None
    cache_write_per_1k: float | None = None
    reasoning_per_1k: float | None = None
    cache_write_1h_per_1k: float | None = None
    long_context: tuple[tuple[int, ModelRates], ...] = ()
    service_tiers: tuple[tuple[str, ModelRates], ...] = ()
    # (input, output, cached read, cache write 5 min, cache write 1 h, reasoning) in nano-USD per 1M
    _nano: tuple[int, int, int, int, int, int] = field(init=False, repr=False, compare=False)
    _tiers: dict[str, ModelRates] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def n(value: float | None, fallback: int, what: str) -> int:
            return fallback if value is None else rate_to_nano_per_million(value, what)

        inp = n(self.input_per_1k, 0, "input_per_1k")
        out = n(self.output_per_1k, 0, "output_per_1k")
        write = n(self.cache_write_per_1k, inp, "cache_write_per_1k")
        nano = (
            inp,
            out,
            n(self.cached_input_per_1k, inp, "cached_input_per_1k"),
            write,
            n(self.cache_write_1h_per_1k, write, "cache_write_1h_per_1k"),
            n(self.reasoning_per_1k, out, "reasoning_per_1k"),
        )
        object.__setattr__(self, "_nano", nano)
        object.__setattr__(self, "long_context", _checked_long_context(self.long_context))
        object.__setattr__(self, "service_tiers", _checked_service_tiers(self.service_tiers))
        object.__setattr__(self, "_tiers", dict(self.service_tiers))

    @classmethod
    def per_million(
        cls,
        input: float,
        output: float,
        cached_input: float | None = None,
        cache_write: float | None = None,
        cache_write_1h: float | None = None,
        reasoning: float | None = None,
        *,
        long_context: Mapping[int, ModelRates] | None = None,
        service_tiers: Mapping[str, ModelRates] | None = None,
    ) -> ModelRates:
        """Rates in USD per 1M tokens, the unit of every provider's price list.

        ``long_context={200_000: ModelRates.per_million(2.5, 15)}``: requests with more than
        200,000 input tokens are priced wholly at those rates. ``service_tiers={"batch": ...}``.
        """
        return cls(
            input_per_1k=_per_1k(input, "input") or 0.0,
            output_per_1k=_per_1k(output, "output") or 0.0,
            cached_input_per_1k=_per_1k(cached_input, "cached_input"),
            cache_write_per_1k=_per_1k(cache_write, "cache_write"),
            cache_write_1h_per_1k=_per_1k(cache_write_1h, "cache_write_1h"),
            reasoning_per_1k=_per_1k(reasoning, "reasoning"),
            long_context=tuple(sorted((long_context or {}).items())),
            service_tiers=tuple(sorted((service_tiers or {}).items())),
        )

    @classmethod
    def for_model(cls, model: str) -> ModelRates:
        """Price of ``model`` in the bundled snapshot (provider prefixes, dated snapshots, ``-latest``
        and aliases resolve); :class:`UnknownModelError` if it has none."""
        return PriceBook().rates_for(model)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the registry stores custom rates so); ``from_dict`` reads it back.
        Fields agent-budget-era rates never set are left out, so such rates keep their old form."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _RATE_FIELDS}
        if self.cache_write_1h_per_1k is not None:
            out["cache_write_1h_per_1k"] = self.cache_write_1h_per_1k
        if self.long_context:
            out["long_context"] = [[t, r.to_dict()] for t, r in self.long_context]
        if self.service_tiers:
            out["service_tiers"] = [[name, r.to_dict()] for name, r in self.service_tiers]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRates:
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"rates must be an object, got {type(data).__name__}")
        unknown = set(data) - {*_RATE_FIELDS, "cache_write_1h_per_1k", "long_context", "service_tiers"}
        if unknown:
            raise InvalidInputError(f"unknown rate fields {sorted(unknown)}")
        fields = {k: v for k, v in data.items() if k not in ("long_context", "service_tiers")}
        return cls(
            **fields,
            long_context=tuple((t, cls.from_dict(r)) for t, r in data.get("long_context", ())),
            service_tiers=tuple((name, cls.from_dict(r)) for name, r in data.get("service_tiers", ())),
        )

    def priced(self, input_tokens: int, service_tier: str | None = None) -> ModelRates:
        """The flat rates that apply to a request of ``input_tokens`` in ``service_tier``."""
        rates = self
        if service_tier is not None and not isinstance(service_tier, str):
            raise TypeError(f"service_tier must be a str, got {type(service_tier).__name__}")
        if service_tier is not None and service_tier not in STANDARD_TIERS:
            tier = self._tiers.get(service_tier)
            if tier is not None:
                rates = tier
            elif service_tier not in KNOWN_SERVICE_TIERS:
                known = sorted(KNOWN_SERVICE_TIERS | STANDARD_TIERS | set(self._tiers))
                raise InvalidInputError(f"unknown service_tier {service_tier!r}; one of {known}")
        for threshold, above in reversed(rates.long_context):
            if input_tokens > threshold:
                return above
        return rates

    def cost_nano(
        self,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        *,
        cache_write_1h_tokens: int = 0,
        service_tier: str | None = None,
    ) -> int:
        """Exact cost in nano-USD. Cached, cache-write (5 min, ``cache_write_tokens``; 1 h,
        ``cache_write_1h_tokens``) tokens are part of ``input_tokens``, reasoning tokens part of
        ``output_tokens`` (as OpenAI reports usage)."""
        if cached_input_tokens + cache_write_tokens + cache_write_1h_tokens > input_tokens:
            raise InvalidInputError("cached_input_tokens + cache_write_tokens exceed input_tokens")
        if reasoning_tokens > output_tokens:
            raise InvalidInputError("reasoning_tokens exceed output_tokens")
        rates = self.priced(input_tokens, service_tier) if self.long_context or service_tier is not None else self
        inp, out, cached, write, write_1h, reasoning = rates._nano
        plain_in = input_tokens - cached_input_tokens - cache_write_tokens - cache_write_1h_tokens
        per_million = (
            plain_in * inp
            + cached_input_tokens * cached
            + cache_write_tokens * write
            + cache_write_1h_tokens * write_1h
            + (output_tokens - reasoning_tokens) * out
            + reasoning_tokens * reasoning
        )
        return cost_nano(1, per_million)

    def flat_rates(self) -> tuple[int, int]:
        """(input, output) nano-USD per million tokens of a plain call (no cache or reasoning
        tokens) in the standard tier: ``cost_nano(i, o) == (i * input + o * output + 500_000) //
        1_000_000`` when there are no long-context tiers (the embedded fast path prices so)."""
        return self._nano[0], self._nano[1]

    def worst_case_nano(self, input_tokens: int, max_output_tokens: int, *, service_tier: str | None = None) -> int:
        """What a reservation holds: input at the input rate, output at max(output, reasoning),
        both in the long-context tier ``input_tokens`` falls in."""
        rates = self.priced(input_tokens, service_tier)
        inp, out, _, _, _, reasoning = rates._nano
        return cost_nano(1, input_tokens * inp + max_output_tokens * max(out, reasoning))

    def estimate_cost(self, input_tokens: int, output_tokens: int = 0, *, service_tier: str | None = None) -> float:
        """Cost in USD of a call (floats at the edge only)."""
        check_tokens(input_tokens, "input_tokens")
        check_tokens(output_tokens, "output_tokens")
        return nano_to_usd(self.cost_nano(input_tokens, output_tokens, service_tier=service_tier))


def _checked_long_context(tiers: Any) -> tuple[tuple[int, ModelRates], ...]:
    items = sorted(tiers.items()) if isinstance(tiers, Mapping) else list(tiers)
    out: list[tuple[int, ModelRates]] = []
    for item in items:
        threshold, rates = item
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
            raise InvalidInputError(f"a long-context threshold must be a positive int of tokens, got {threshold!r}")
        if not isinstance(rates, ModelRates):
            raise TypeError(f"long_context[{threshold}] must be a ModelRates")
        if rates.long_context or rates.service_tiers:
            raise InvalidInputError(f"long_context[{threshold}] must be flat rates (no tiers of its own)")
        if out and threshold <= out[-1][0]:
            raise InvalidInputError("long_context thresholds must be distinct and ascending")
        out.append((threshold, rates))
    return tuple(out)


def _checked_service_tiers(tiers: Any) -> tuple[tuple[str, ModelRates], ...]:
    items = sorted(tiers.items()) if isinstance(tiers, Mapping) else list(tiers)
    out: list[tuple[str, ModelRates]] = []
    for item in items:
        name, rates = item
        if not isinstance(name, str) or not name or name in STANDARD_TIERS:
            raise InvalidInputError(f"a service tier needs a name other than {sorted(STANDARD_TIERS)}, got {name!r}")
        if not isinstance(rates, ModelRates):
            raise TypeError(f"service_tiers[{name!r}] must be a ModelRates")
        if rates.service_tiers:
            raise InvalidInputError(f"service_tiers[{name!r}] must not have service tiers of its own")
        out.append((name, rates))
    return tuple(out)


# ---- price tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PriceTable:
    """A price table: ``rates`` of every exact (lower-case) name, ``ids`` mapping each name to its
    canonical model id, the table's date (``as_of``, None if undated), where it came from, and
    each name's provider where the table says."""

    rates: Mapping[str, ModelRates]
    ids: Mapping[str, str]
    as_of: dt.date | None
    source: str
    providers: Mapping[str, str] = field(default_factory=dict)


# LiteLLM fields we price, by our name. Each may carry a long-context threshold
# (``_above_200k_tokens``) and a service tier suffix (``_batches``, ``_flex``, ``_priority``, ...).
LITELLM_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
    "output_cost_per_reasoning_token": "reasoning",
}
LITELLM_MODES = frozenset({"chat", "completion", "responses"})
LITELLM_FIELD_RE = re.compile(
    r"^(?P<base>" + "|".join(sorted(LITELLM_FIELDS, key=len, reverse=True)) + r")"
    r"(?:_above_(?P<k>\d+)k_tokens)?(?:_(?P<tier>[a-z]+))?$"
)
_TIER_NAMES = {"batches": "batch"}  # LiteLLM's suffix -> the service_tier a caller passes
# (service tier, threshold) -> our field -> USD per token
_Grid = dict[tuple[str, int], dict[str, Decimal]]


def _usd(value: object, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"{where} must be a non-negative number (USD per token), got {value!r}")
    return Decimal(repr(value))


def litellm_grid(name: str, entry: Mapping[str, Any]) -> _Grid:
    """Every rate of one LiteLLM entry we price, by (service tier, long-context threshold)."""
    grid: _Grid = {}
    for key, value in entry.items():
        m = LITELLM_FIELD_RE.match(key)
        if m is None:
            continue
        tier = m["tier"] or ""
        threshold = int(m["k"]) * 1000 if m["k"] else 0
        grid.setdefault((_TIER_NAMES.get(tier, tier), threshold), {})[LITELLM_FIELDS[m["base"]]] = _usd(
            value, f"{name}.{key}"
        )
    for i, band in enumerate(entry.get("tiered_pricing") or ()):  # [{"range": [lo, hi], fields...}]
        where = f"{name}.tiered_pricing[{i}]"
        if not isinstance(band, Mapping) or not isinstance(band.get("range"), (list, tuple)):
            raise InvalidInputError(f"{where} must be an object with a range")
        low = band["range"][0]
        if isinstance(low, bool) or not isinstance(low, (int, float)) or low < 0:
            raise InvalidInputError(f"{where}.range must start at a token count, got {low!r}")
        cell = grid.setdefault(("", int(low)), {})
        for key, value in band.items():
            if key in LITELLM_FIELDS:  # the entry's own top-level fields win over its first band
                cell.setdefault(LITELLM_FIELDS[key], _usd(value, f"{where}.{key}"))
    return grid


def _grid_rate(grid: _Grid, tier: str, threshold: int, what: str) -> Decimal | None:
    """One rate of (tier, threshold); a rate the table lacks there comes from the standard tier
    at that threshold or that tier below all thresholds (the higher of the two, so a budget never
    under-prices), else the standard rate below all thresholds."""
    exact = grid.get((tier, threshold), {}).get(what)
    if exact is not None:
        return exact
    near = [v for v in (grid.get(("", threshold), {}).get(what), grid.get((tier, 0), {}).get(what)) if v is not None]
    if near:
        return max(near)
    return grid.get(("", 0), {}).get(what)


def _flat(grid: _Grid, tier: str, threshold: int) -> ModelRates:
    def rate(what: str) -> Decimal | None:
        return _grid_rate(grid, tier, threshold, what)

    def per_1k(value: Decimal | None) -> float | None:
        return None if value is None else float(value * 1000)

    inp, out = rate("input"), rate("output")
    reasoning = rate("reasoning")
    if reasoning is not None and out is not None and (tier, threshold) != ("", 0):
        reasoning = max(reasoning, out)  # a reasoning token is an output token: never cheaper at a higher tier
    return ModelRates(
        input_per_1k=per_1k(inp) or 0.0,
        output_per_1k=per_1k(out) or 0.0,
        cached_input_per_1k=per_1k(rate("cached_input")),
        cache_write_per_1k=per_1k(rate("cache_write")),
        cache_write_1h_per_1k=per_1k(rate("cache_write_1h")),
        reasoning_per_1k=per_1k(reasoning),
    )


def rates_from_grid(grid: _Grid) -> ModelRates:
    """The :class:`ModelRates` of one LiteLLM entry's grid (see :func:`litellm_grid`)."""
    thresholds = sorted({t for _, t in grid if t})
    tiers = sorted({s for s, _ in grid if s})

    def tiered(tier: str) -> ModelRates:
        base = _flat(grid, tier, 0)
        above = tuple((t, _flat(grid, tier, t)) for t in thresholds)
        return ModelRates(**{**_fields(base), "long_context": above})

    standard = tiered("")
    return ModelRates(**{**_fields(standard), "service_tiers": tuple((s, tiered(s)) for s in tiers)})


def _fields(rates: ModelRates) -> dict[str, Any]:
    return {
        "input_per_1k": rates.input_per_1k,
        "output_per_1k": rates.output_per_1k,
        "cached_input_per_1k": rates.cached_input_per_1k,
        "cache_write_per_1k": rates.cache_write_per_1k,
        "cache_write_1h_per_1k": rates.cache_write_1h_per_1k,
        "reasoning_per_1k": rates.reasoning_per_1k,
        "long_context": rates.long_context,
    }


def is_token_priced(entry: object) -> bool:
    """A LiteLLM entry we price: a chat / completion / responses model priced per token."""
    if not isinstance(entry, Mapping) or entry.get("mode") not in LITELLM_MODES:
        return False

    def priced(fields: Mapping[str, Any]) -> bool:
        return all(
            isinstance(fields.get(k), (int, float)) and not isinstance(fields.get(k), bool)
            for k in ("input_cost_per_token", "output_cost_per_token")
        )

    bands = entry.get("tiered_pricing")
    if priced(entry):
        return True
    # or priced by bands only (``tiered_pricing``), the first from 0 tokens
    return isinstance(bands, list) and any(
        isinstance(b, Mapping) and isinstance(b.get("range"), list) and b["range"][:1] == [0] and priced(b)
        for b in bands
    )


def table_from_litellm(
    models: Mapping[str, Any], aliases: Mapping[str, str], as_of: dt.date | None, source: str
) -> PriceTable:
    """A table from LiteLLM-format entries (entries that are not token-priced chat models are
    skipped) and extra ``alias -> model`` names."""
    priced: dict[str, tuple[ModelRates, str]] = {}
    for name, entry in models.items():
        if isinstance(name, str) and is_token_priced(entry) and name.lower() not in priced:
            # keys differing only in case: the first one wins
            priced[name.lower()] = (rates_from_grid(litellm_grid(name, entry)), str(entry.get("litellm_provider", "")))
    return _table(priced, aliases, as_of, source)


def _table(
    priced: Mapping[str, tuple[ModelRates, str]], aliases: Mapping[str, str], as_of: dt.date | None, source: str
) -> PriceTable:
    """A table of (rates, provider) by lower-case name, plus ``alias -> model`` names."""
    rates = {name: r for name, (r, _) in priced.items()}
    for alias, target in aliases.items():
        if target.lower() not in rates:
            raise InvalidInputError(f"alias {alias!r} names {target!r}, which the table does not price")
        rates.setdefault(alias.lower(), rates[target.lower()])
    known: dict[str, str] = {**{n: n for n in rates}, **{a.lower(): t.lower() for a, t in aliases.items()}}
    providers = {name: provider for name, (_, provider) in priced.items()}
    return PriceTable(rates, _canonical_ids(known), as_of, source, providers)


# genai-prices: its price fields (USD per 1M tokens) by our name, and its price variants by the
# service_tier a caller passes.
GENAI_FIELDS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cached_input",
    "cache_write_mtok": "cache_write",
    "cache_write_1h_mtok": "cache_write_1h",
    "output_reasoning_mtok": "reasoning",
}
_GENAI_VARIANTS = {("processing", "batch"): "batch", ("speed", "fast"): "fast"}
# Providers that sell their own models: their price is the one a bare model id gets.
_FIRST_PARTY = ("openai", "anthropic", "google", "mistral", "deepseek", "x-ai", "meta", "cohere", "moonshotai", "zai")


def _genai_tier(when: Mapping[str, str]) -> str | None:
    if len(when) != 1:
        return None
    ((key, value),) = when.items()
    if key == "service_tier":
        return None if value in STANDARD_TIERS else value
    return _GENAI_VARIANTS.get((key, value))


def _genai_active(prices: Any, constraint: Any, today: dt.date) -> Any:
    """The prices in force today: unconstrained or started (time-of-day prices: see ``_peak``)."""
    if constraint is None:
        return prices
    start = getattr(constraint, "start_date", None)
    return prices if isinstance(start, dt.date) and start <= today else None


def _peak(base: Any, cp: Any) -> Any:
    """A time-of-day price (DeepSeek's day and night rates) replaces ``base`` only if it is dearer:
    a budget charges the peak price, whichever of the two the data lists as unconstrained."""
    if base is None or getattr(cp.constraint, "start_time", None) is None:
        return base
    dearer = (getattr(cp.prices, "input_mtok", None) or 0) > (getattr(base, "input_mtok", None) or 0)
    return cp.prices if dearer else base


def genai_grid(model: Any, today: dt.date) -> _Grid:
    """Every rate of one genai-prices model we price, by (service tier, long-context threshold)."""
    grid: _Grid = {}

    def cells(tier: str, prices: Any) -> None:
        for attr, ours in GENAI_FIELDS.items():
            value = getattr(prices, attr, None)
            if value is None:
                continue
            grid.setdefault((tier, 0), {})[ours] = Decimal(getattr(value, "base", value)) / 10**6
            for band in getattr(value, "tiers", ()):  # TieredPrices: a cliff above each start
                grid.setdefault((tier, int(band.start)), {})[ours] = Decimal(band.price) / 10**6

    conditional = model.prices if isinstance(model.prices, list) else [None]
    base = None
    for cp in conditional:  # the last price in force wins
        base = (model.prices if cp is None else _genai_active(cp.prices, cp.constraint, today)) or _peak(base, cp)
    if base is not None:
        cells("", base)
    for variant in model.price_variants or ():
        tier = _genai_tier(variant.when)
        prices = _genai_active(variant.prices, variant.constraint, today)
        if tier is not None and prices is not None:
            cells(tier, prices)
    return grid


def table_from_genai(providers: Iterable[Any], as_of: dt.date | None, today: dt.date) -> PriceTable:
    """A table from genai-prices' providers: ``provider/model`` for every model priced per token,
    and the bare model id at the first-party provider's price (else the first provider's)."""
    rank = {name: i for i, name in enumerate(_FIRST_PARTY)}
    ordered = sorted(providers, key=lambda p: rank.get(p.id, len(rank)))  # stable: others keep their order
    priced: dict[str, tuple[ModelRates, str]] = {}
    for provider in ordered:
        for model in provider.models:
            grid = genai_grid(model, today)
            if not {"input", "output"} <= set(grid.get(("", 0), {})):
                continue
            rates = rates_from_grid(grid)
            for name in (f"{provider.id}/{model.id}".lower(), str(model.id).lower()):
                priced.setdefault(name, (rates, provider.id))
    return _table(priced, {}, as_of, "genai-prices")


def _canonical_ids(known: Mapping[str, str]) -> dict[str, str]:
    """Each name's canonical id: the most general known name it reduces to (following aliases)."""
    ids: dict[str, str] = {}

    def root(name: str) -> str:
        if name in ids:
            return ids[name]
        ids[name] = name  # provisional: an alias cycle ends here
        target = known[name]
        if target == name:
            general = [form for form in name_forms(name) if form != name and form in known]
            target = general[-1] if general else name
        ids[name] = result = name if target == name else root(target)
        return result

    for name in known:
        root(name)
    return ids


def _read_json(path: str | PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({exc})") from None


@lru_cache(maxsize=1)
def bundled_table() -> PriceTable:
    """The snapshot shipped in ``distbudget/data/prices.json`` (see ``scripts/gen_prices.py``)."""
    data = json.loads((resources.files("distbudget") / "data" / "prices.json").read_text("utf-8"))
    as_of = dt.date.fromisoformat(data["as_of"])
    return table_from_litellm(data["models"], data["aliases"], as_of, f"bundled snapshot ({data['source']})")


# Stale price tables warned about in this process: one warning per (source, date), not per budget.
_warned_stale: set[tuple[str, dt.date]] = set()


def warn_if_stale(table: PriceTable, max_age_days: float, today: dt.date) -> bool:
    """Log (once per process and table) that ``table`` is older than ``max_age_days``."""
    if table.as_of is None or (today - table.as_of).days <= max_age_days:
        return False
    key = (table.source, table.as_of)
    if key not in _warned_stale:
        _warned_stale.add(key)
        log.warning(
            "model prices from %s are dated %s, %d days ago (older than %g days): update distbudget, "
            "or load a current table with PriceBook.from_litellm(...)",
            table.source,
            table.as_of.isoformat(),
            (today - table.as_of).days,
            max_age_days,
        )
    return True


# ---- the price book --------------------------------------------------------------------------


class PriceBook:
    """How one budget prices a model: custom ``rates`` first (an override for ``gpt-4o`` applies to
    every spelling of it), then the table (default: the bundled snapshot), then ``default_rates``
    (with a warning), else :class:`UnknownModelError`.

    ``PriceBook.from_litellm(path_or_mapping)`` loads LiteLLM's price file;
    ``PriceBook(rates, table=book)`` layers custom rates over another book.
    """

    def __init__(
        self,
        rates: Mapping[str, ModelRates] | None = None,
        default_rates: ModelRates | None = None,
        *,
        table: PriceBook | PriceTable | None = None,
        max_age_days: float = DEFAULT_MAX_AGE_DAYS,
    ) -> None:
        if rates is not None and not isinstance(rates, Mapping):
            raise TypeError("rates must be a dict of model name -> ModelRates")
        for name, r in (rates or {}).items():
            if not isinstance(name, str) or not name:
                raise InvalidInputError(f"rates keys must be model names, got {name!r}")
            if not isinstance(r, ModelRates):
                raise TypeError(f"rates[{name!r}] must be a ModelRates")
        if default_rates is not None and not isinstance(default_rates, ModelRates):
            raise TypeError("default_rates must be a ModelRates")
        if isinstance(max_age_days, bool) or not isinstance(max_age_days, (int, float)) or not max_age_days >= 0:
            raise InvalidInputError(f"max_age_days must be a number >= 0, got {max_age_days!r}")
        custom = dict(rates or {})
        if isinstance(table, PriceBook):
            custom = {**table.custom, **custom}
            default_rates = default_rates or table.default_rates
            table = table.table
        elif table is not None and not isinstance(table, PriceTable):
            raise TypeError("table must be a PriceBook")
        self.table: PriceTable = table if table is not None else bundled_table()
        self.custom: dict[str, ModelRates] = custom
        self.default_rates: ModelRates | None = default_rates
        self.max_age_days = max_age_days
        self._custom = {name.lower(): r for name, r in custom.items()}
        self._resolved: dict[str, tuple[str, ModelRates]] = {}
        self._warned: set[str] = set()
        warn_if_stale(self.table, max_age_days, dt.date.today())

    # ---- loading

    @classmethod
    def from_litellm(
        cls,
        path_or_mapping: str | PathLike[str] | Mapping[str, Any],
        *,
        as_of: dt.date | str | None = None,
        max_age_days: float = DEFAULT_MAX_AGE_DAYS,
    ) -> PriceBook:
        """A book from LiteLLM's ``model_prices_and_context_window.json`` (a path or the parsed
        mapping). The format carries no date: ``as_of`` dates it, else a file's modification
        date (a mapping stays undated, and is never called stale)."""
        if isinstance(path_or_mapping, Mapping):
            data, source = path_or_mapping, "a LiteLLM price mapping"
            date = None
        elif isinstance(path_or_mapping, (str, PathLike)):
            data, source = _read_json(path_or_mapping), f"LiteLLM prices {path_or_mapping}"
            mtime = Path(path_or_mapping).stat().st_mtime
            date = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).date()
        else:
            raise TypeError("from_litellm takes a path or a mapping of LiteLLM price entries")
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"{source}: expected an object of model entries")
        if as_of is not None:
            date = as_of if isinstance(as_of, dt.date) else dt.date.fromisoformat(as_of)
        table = table_from_litellm(data, {}, date, source)
        if not table.rates:
            raise InvalidInputError(f"{source}: no token-priced chat model in it")
        return cls(table=table, max_age_days=max_age_days)

    @classmethod
    def from_genai_prices(
        cls, *, as_of: dt.date | str | None = None, max_age_days: float = DEFAULT_MAX_AGE_DAYS
    ) -> PriceBook:
        """A book from the `genai-prices` package's data (``pip install 'distbudget[genai-prices]'``):
        input, output, cache read / write (5 min, 1 h), reasoning, long-context tiers and the batch,
        flex, priority and fast variants, at the prices in force today. Names: ``provider/model``
        and the bare model id (genai-prices' ids, not its pattern rules). Dated by the data's
        update time, else ``as_of``, else undated."""
        try:
            from genai_prices import data_snapshot
        except ImportError:
            raise ImportError("PriceBook.from_genai_prices needs: pip install 'distbudget[genai-prices]'") from None
        snapshot = data_snapshot.get_snapshot()
        stamp = getattr(snapshot, "timestamp", None)
        date = stamp.date() if isinstance(stamp, dt.datetime) and snapshot.from_auto_update else None
        if as_of is not None:
            date = as_of if isinstance(as_of, dt.date) else dt.date.fromisoformat(as_of)
        return cls(table=table_from_genai(snapshot.providers, date, dt.date.today()), max_age_days=max_age_days)

    # ---- lookups

    @property
    def as_of(self) -> dt.date | None:
        """The date of the table's prices (None: undated)."""
        return self.table.as_of

    @property
    def stale(self) -> bool:
        """The table is older than ``max_age_days`` today."""
        return self.as_of is not None and (dt.date.today() - self.as_of).days > self.max_age_days

    def canonical_id(self, exact_name: str) -> str | None:
        """The canonical id of an exact (lower-case) name this book prices, else None."""
        table_id = self.table.ids.get(exact_name)
        if table_id is not None:
            return table_id
        return exact_name if exact_name in self._custom else None

    def model_id(self, model: str) -> str | None:
        """The canonical id of ``model`` (see :func:`distbudget._core.models.canonical_model`)."""
        return canonical_model(model, self)

    def resolve(self, model: str) -> tuple[str, ModelRates] | None:
        """(canonical id, rates) of ``model``, or None when neither the custom rates nor the table
        price any form of it. The most specific form priced wins (``gpt-4o-2024-05-13`` keeps its
        own price); a custom rate for the canonical id overrides the table for every spelling."""
        hit = self._resolved.get(model)
        if hit is None:
            hit = first_known(model, self._exact)
            if hit is not None:
                if len(self._resolved) >= _CACHE_LIMIT:
                    self._resolved.clear()
                self._resolved[model] = hit
        return hit

    def _exact(self, form: str) -> tuple[str, ModelRates] | None:
        custom = self._custom.get(form)
        model_id = self.canonical_id(form)
        if model_id is None:
            return None
        rates = custom or self._custom.get(model_id) or self.table.rates[form]
        return model_id, rates

    def rates_for(self, model: str) -> ModelRates:
        hit = self.resolve(model)
        if hit is not None:
            return hit[1]
        if self.default_rates is None:
            raise UnknownModelError(
                f"no price for model {model!r} in prices dated {self.as_of or 'undated'}: pass "
                f"rates={{{model!r}: ModelRates.per_million(...)}} to Budget(...) or to "
                "BudgetManager.register(scope, rates=...), or default_rates=ModelRates(...)"
            )
        if model not in self._warned:
            self._warned.add(model)
            warnings.warn(f"model {model!r} has no known price; using default_rates", BudgetWarning, stacklevel=4)
        return self.default_rates

    def models(self) -> list[str]:
        """The canonical ids this book prices (custom ones included), sorted."""
        return sorted({*self.table.ids.values(), *(self.canonical_id(n) or n for n in self._custom)})


def price_table() -> dict[str, Any]:
    """The bundled snapshot as a listing: ``as_of``, ``unit`` (USD per 1M tokens), ``models``
    (canonical id -> provider, input, output, cached_input) and ``aliases`` (other names -> id)."""
    table = bundled_table()
    models: dict[str, Any] = {}
    for model_id in sorted(set(table.ids.values())):
        r = table.rates[model_id]
        models[model_id] = {
            "provider": table.providers.get(model_id, ""),
            "input": _usd_per_million(r.input_per_1k),
            "output": _usd_per_million(r.output_per_1k),
            "cached_input": _usd_per_million(r.cached_input_per_1k),
        }
    aliases = {name: i for name, i in table.ids.items() if name != i}
    as_of = table.as_of.isoformat() if table.as_of else "undated"
    return {"as_of": as_of, "unit": "USD per 1M tokens", "models": models, "aliases": aliases}


def _usd_per_million(per_1k: float | None) -> float | None:
    return None if per_1k is None else float(Decimal(str(per_1k)) * 1000)
