"""Model identity: the one place that decides which spellings name the same model.

``openai/gpt-4o``, ``GPT-4o``, ``gpt-4o-2024-08-06`` and ``azure/gpt-4o`` all name ``gpt-4o``. A
name is reduced step by step, most specific form first:

1. the name as given, then lower-cased;
2. each provider prefix dropped in turn (``azure/eu/gpt-5.1`` -> ``eu/gpt-5.1`` -> ``gpt-5.1``),
   and Bedrock's ``[region.]vendor.`` prefix (``us.anthropic.claude-sonnet-4-6``);
3. at each of those levels, version suffixes dropped one at a time: Bedrock ``-v1:0``, dated
   snapshots (``-2024-08-06``, ``-20250929``, ``@20240620``, ``-09-2025``, ``-0613``, ``-001``) and
   ``-latest``.

A price book says which of these forms it knows (:class:`ModelCatalog`); the first known form wins
and the book maps it to its canonical id (for a table loaded from LiteLLM: the most general name of
the table the form reduces to). Pure: no I/O, no state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")

# One version suffix at the end of a name; dropped repeatedly (``-20241022-v2:0`` is two).
_VERSION_SUFFIX = re.compile(
    r"(?:-v\d+(?::\d+)?"  # Bedrock revision: -v1:0, -v2
    r"|[-@]\d{4}-?\d{2}-?\d{2}"  # dated snapshot: -2024-08-06, -20250929, @20240620
    r"|-\d{2}-\d{4}"  # month-year snapshot: -09-2025
    r"|-\d{3,4}"  # short snapshot: -0613, -001
    r"|-latest)$"
)
# Bedrock and Vertex model ids: an optional region, then the vendor, then the model.
_VENDOR_PREFIX = re.compile(
    r"^(?:(?:us|eu|apac|au|jp|ca|global|us-gov)\.)?"
    r"(?:anthropic|openai|meta|mistral|amazon|cohere|ai21|deepseek|qwen|google|writer|moonshotai)\."
)


class ModelCatalog(Protocol):
    """What the resolver needs from a price book: the canonical id of an exact (lower-case) name
    the book knows, else None."""

    def canonical_id(self, exact_name: str) -> str | None: ...


def name_forms(name: str) -> Iterator[str]:
    """Every form ``name`` reduces to, most specific first (may repeat a form)."""
    yield name
    lowered = name.lower()
    yield lowered
    parts = lowered.split("/")
    for start in range(len(parts)):
        level = "/".join(parts[start:])
        yield from _without_suffixes(level)
        bare = _VENDOR_PREFIX.sub("", level) if start == len(parts) - 1 else level
        if bare != level:
            yield from _without_suffixes(bare)


def _without_suffixes(name: str) -> Iterator[str]:
    yield name
    while True:
        shorter = _VERSION_SUFFIX.sub("", name)
        if shorter == name or not shorter:
            return
        name = shorter
        yield name


def first_known(name: str, lookup: Callable[[str], T | None]) -> T | None:
    """``lookup`` of the first form of ``name`` it answers for, else None."""
    for form in name_forms(name):
        found = lookup(form)
        if found is not None:
            return found
    return None


def canonical_model(name: str, book: ModelCatalog) -> str | None:
    """The canonical model id of ``name`` in ``book`` (a :class:`~distbudget.pricing.PriceBook`),
    or None when the book knows no form of it."""
    return first_known(name, book.canonical_id)
