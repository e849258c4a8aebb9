"""The fleet-wide price book: one per prefix, stored in Redis so every worker prices alike, and
per-scope rate overrides inherited down the scope tree. Pure: the stored format and the rules.

Storage: one hash, ``<prefix>:prices`` (see :func:`distbudget._core.keys.prices_key`), owned
(no TTL), with two fields written together in one atomic step:

    rev    the revision, an integer incremented by each push (workers poll it: one small read)
    book   the price table as JSON (below), read only when ``rev`` changed

The ``book`` JSON, ``{"format": 1, "as_of": "2026-11-30" | null, "source": str, "rates": [...],
"names": {name: [rate index, canonical id, provider]}}``: ``rates`` lists each distinct
:meth:`ModelRates.to_dict` once (a table of 3,600 names holds ~1,500 distinct prices), ``names``
every exact (lower-case) model name the table prices. A worker that meets a ``format`` it does not
know keeps the book it has and says so (an older distbudget in a fleet being upgraded).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distbudget._core.errors import InvalidInputError
from distbudget._core.prices import ModelRates, PriceBook, PriceTable

log = logging.getLogger("distbudget")
FORMAT = 1
REV_FIELD = "rev"
BOOK_FIELD = "book"
FIELDS = (REV_FIELD, BOOK_FIELD)


def encode_book(book: PriceBook | PriceTable) -> str:
    """The ``book`` field for a price book's table (its custom rates are per scope: not stored)."""
    table = book.table if isinstance(book, PriceBook) else book
    if not isinstance(table, PriceTable):
        raise TypeError("encode_book takes a PriceBook")
    rates: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    names: dict[str, list[Any]] = {}
    for name in sorted(table.rates):
        form = table.rates[name].to_dict()
        text = json.dumps(form, sort_keys=True)
        if text not in index:
            index[text] = len(rates)
            rates.append(form)
        names[name] = [index[text], table.ids.get(name, name), table.providers.get(name, "")]
    doc = {
        "format": FORMAT,
        "as_of": table.as_of.isoformat() if table.as_of else None,
        "source": table.source,
        "rates": rates,
        "names": names,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def decode_book(text: str | bytes, max_age_days: float | None = None) -> PriceBook:
    """The price book stored in a ``book`` field; :class:`InvalidInputError` if it is not one."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError("the stored price book is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise InvalidInputError(f"stored price book of format {got!r}; this distbudget reads format {FORMAT}")
    try:
        rates = [ModelRates.from_dict(r) for r in doc["rates"]]
        names: dict[str, Any] = doc["names"]
        table = PriceTable(
            rates={name: rates[i] for name, (i, _, _) in names.items()},
            ids={name: model_id for name, (_, model_id, _) in names.items()},
            as_of=dt.date.fromisoformat(doc["as_of"]) if doc["as_of"] else None,
            source=f"fleet price book ({doc['source']})",
            providers={name: p for name, (_, _, p) in names.items() if p},
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"the stored price book is malformed: {exc!r}") from None
    if max_age_days is None:
        return PriceBook(table=table)
    return PriceBook(table=table, max_age_days=max_age_days)


def parse_rev(value: object) -> int:
    """The ``rev`` field as read (``None``: nothing pushed yet -> 0)."""
    if value is None:
        return 0
    text = value.decode() if isinstance(value, bytes) else str(value)
    if not text.isdigit():
        raise InvalidInputError(f"the stored price book revision is not a number: {text!r}")
    return int(text)


def read_reply(values: Sequence[object]) -> tuple[int, str | None]:
    """(revision, book JSON or None) from an HMGET of ``FIELDS``."""
    rev, book = values
    return parse_rev(rev), book.decode() if isinstance(book, bytes) else None if book is None else str(book)


class FleetBook:
    """The fleet price book as one manager's budgets share it: the latest revision read and its
    table (decoded once per revision, whichever budget read it first)."""

    def __init__(self) -> None:
        self.rev = 0
        self.table: PriceTable | None = None

    def update(self, rev: int, book: str | None) -> None:
        """Take revision ``rev`` (its JSON ``book``, None when unchanged or never pushed). A book this
        version cannot read is logged once and skipped: the budgets keep the prices they have."""
        if book is None or rev == self.rev:
            return
        self.rev = rev
        try:
            self.table = decode_book(book).table
        except InvalidInputError as exc:
            log.warning("fleet price book revision %d not used, keeping the prices in use: %s", rev, exc)


def inherited_rates(
    chain: Sequence[Mapping[str, ModelRates] | None], canonical: Callable[[str], str | None]
) -> dict[str, ModelRates] | None:
    """The custom rates a scope prices with: per model, the override of the nearest scope in
    ``chain`` (the scope itself first, then its parent, ... up to the root) that has one.
    ``canonical`` maps a model name to its canonical id: spellings of one model are one model, and
    the result is keyed by canonical id (a model the table does not know keeps its name)."""
    out: dict[str, ModelRates] = {}
    for table in chain:
        for name, rates in (table or {}).items():
            out.setdefault(canonical(name) or name.lower(), rates)
    return out if any(t is not None for t in chain) else None
