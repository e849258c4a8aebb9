"""Reports: the ledger rolled up into rows (tokens by kind, cost, requests, refusals) grouped by any
subset of day, model, session and scope. Pure and streaming: entries go in one at a time
(:meth:`Rollup.add`), memory grows with the number of rows, never with the number of entries.

Which entries count: the charges that count against the reported scope (its own and its
descendants', see :meth:`LedgerEntry.counts_for`) with ``since <= timestamp < until``, and the
refusals of the scope where the ledger records them (entries of kind ``"refusal"``). Resets are not
usage and are left out. While the ledger was never trimmed or reset, the totals of a report over
all time equal the scope's counters.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from distbudget._core.calendar import check_tz, period_at
from distbudget._core.errors import InvalidInputError
from distbudget._core.ledger import LedgerEntry
from distbudget._core.money import nano_to_usd

Group = Literal["day", "model", "session", "scope"]
GROUPS: tuple[Group, ...] = ("day", "model", "session", "scope")
FORMATS = ("table", "csv", "json")
US = 1_000_000


def check_by(by: object) -> tuple[Group, ...]:
    """``by`` as a tuple of group names in canonical order: a sequence, or ``"day,model"``."""
    if by is None:
        return ()
    if isinstance(by, str):
        by = [part.strip() for part in by.split(",") if part.strip()]
    if not isinstance(by, (list, tuple)):
        raise TypeError(f"by must be a sequence of {GROUPS} or a comma-separated str, got {type(by).__name__}")
    for g in by:
        if g not in GROUPS:
            raise InvalidInputError(f"cannot group a report by {g!r}; by any of {GROUPS}")
    if len(set(by)) != len(by):
        raise InvalidInputError(f"by names a group twice: {by!r}")
    return tuple(g for g in GROUPS if g in by)


def check_time(value: object, what: str) -> int | None:
    """``since`` / ``until``: None, seconds since the epoch, or an aware datetime -> µs."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise InvalidInputError(f"{what} must be an aware datetime (give it a tzinfo)")
        value = value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise TypeError(f"{what} must be None, seconds since the epoch or an aware datetime, got {value!r}")
    return round(value * US)


@dataclass(slots=True)
class ReportRow:
    """One row: its group values (``None`` for groups not asked for) and the sums."""

    day: str | None = None
    model: str | None = None
    session: str | None = None
    scope: str | None = None
    requests: int = 0
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano_usd: int = 0
    refusals: int = 0

    @property
    def cost_usd(self) -> float:
        return nano_to_usd(self.cost_nano_usd)

    def add(self, entry: LedgerEntry) -> None:
        if entry.kind == "refusal":
            self.refusals += 1
            return
        self.requests += entry.requests
        self.tokens += entry.tokens
        self.input_tokens += entry.input_tokens
        self.output_tokens += entry.output_tokens
        self.cached_input_tokens += entry.cached_input_tokens
        self.cache_write_tokens += entry.cache_write_tokens
        self.reasoning_tokens += entry.reasoning_tokens
        self.cost_nano_usd += entry.cost_nano_usd

    def merge(self, other: ReportRow) -> None:
        """Add ``other``'s sums to this row's."""
        for name in _SUM_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self, by: Sequence[Group] = GROUPS) -> dict[str, Any]:
        """The row's groups in ``by``, then its sums (and ``cost_usd``)."""
        out: dict[str, Any] = {g: getattr(self, g) for g in by}
        for name in _SUM_FIELDS:
            out[name] = getattr(self, name)
        out["cost_usd"] = self.cost_usd
        return out


_SUM_FIELDS = tuple(f.name for f in fields(ReportRow) if f.name not in GROUPS)


def total_of(rows: Iterable[ReportRow]) -> ReportRow:
    """The sums of ``rows`` in one row (no group values)."""
    total = ReportRow()
    for row in rows:
        total.merge(row)
    return total


class Rollup:
    """Fold ledger entries into report rows for ``scope``; see the module docstring."""

    def __init__(
        self,
        scope: str,
        by: object = (),
        since: object = None,
        until: object = None,
        tz: str | None = None,
    ) -> None:
        self.scope = scope
        self.by = check_by(by)
        self.since_us = check_time(since, "since")
        self.until_us = check_time(until, "until")
        if self.since_us is not None and self.until_us is not None and self.until_us < self.since_us:
            raise InvalidInputError("until is before since")
        self.tz = check_tz(tz)
        self.total = ReportRow()
        self._rows: dict[tuple[str | None, ...], ReportRow] = {}
        self._day: tuple[int, int, str] = (0, 0, "")  # the last day seen: [start, end) µs, label

    def counts(self, entry: LedgerEntry) -> bool:
        if entry.kind == "charge":
            return self.scope in entry.path
        return entry.kind == "refusal" and self.scope in entry.path

    def add(self, entry: LedgerEntry) -> None:
        if not self.counts(entry):
            return
        ts = round(entry.timestamp * US)
        if (self.since_us is not None and ts < self.since_us) or (self.until_us is not None and ts >= self.until_us):
            return
        key = tuple(self._group(g, entry, ts) for g in self.by)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = ReportRow()
            for group, value in zip(self.by, key, strict=True):
                setattr(row, group, value)
        row.add(entry)
        self.total.add(entry)

    def add_all(self, entries: Iterable[LedgerEntry]) -> Rollup:
        for entry in entries:
            self.add(entry)
        return self

    def _group(self, group: Group, entry: LedgerEntry, ts: int) -> str | None:
        if group == "day":
            start, end, label = self._day
            if not start <= ts < end:  # entries come in time order: one zone lookup per day
                p = period_at("calendar_day", self.tz, ts)
                self._day = (p.start_us, p.end_us, p.label)
                label = p.label
            return label
        if group == "session":
            return entry.session_id
        return entry.model if group == "model" else entry.scope

    def rows(self) -> list[ReportRow]:
        """The rows, ordered by their group values (``None`` first)."""
        return [self._rows[k] for k in sorted(self._rows, key=lambda k: [(v is not None, v or "") for v in k])]


def rollup(
    entries: Iterable[LedgerEntry],
    scope: str,
    by: object = (),
    since: object = None,
    until: object = None,
    tz: str | None = None,
) -> list[ReportRow]:
    return Rollup(scope, by, since, until, tz).add_all(entries).rows()


# ---- output formats (the CLI's --format) --------------------------------------------------------

_SUMS = ("requests", "tokens", "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens")
_SUMS_TAIL = ("reasoning_tokens", "refusals", "cost_usd")


def columns(by: Sequence[Group], exact: bool = True) -> list[str]:
    """The columns of a report grouped ``by``; ``exact`` adds ``cost_nano_usd`` (csv, json)."""
    return [*by, *_SUMS, *_SUMS_TAIL, *(["cost_nano_usd"] if exact else [])]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def render(rows: Sequence[ReportRow], by: Sequence[Group], fmt: str, total: ReportRow | None = None) -> str:
    """``rows`` as ``table`` (aligned text, with a total line), ``csv`` or ``json`` (a list of objects)."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"format must be one of {FORMATS}, got {fmt!r}")
    cols = columns(by, exact=fmt != "table")
    dicts = [r.to_dict(by) for r in rows]
    if fmt == "json":
        return json.dumps(dicts, indent=2, ensure_ascii=False)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(dicts)
        return buf.getvalue()
    table = [cols, *([_cell(d[c]) for c in cols] for d in dicts)]
    if total is not None:
        t = total.to_dict(by)
        table.append([("total" if i == 0 else "") if c in by else _cell(t[c]) for i, c in enumerate(cols)])
    return "\n".join(aligned(table, right=range(len(by), len(cols))))


def aligned(rows: Sequence[Sequence[str]], right: Container[int] = (), indent: str = "") -> list[str]:
    """``rows`` (the first one a header) as text columns two spaces apart, each as wide as its widest
    cell: left-aligned, or right-aligned where the column index is in ``right``. The tables of
    ``distbudget report``, ``status``, ``prices`` and ``demo`` are all printed through here."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
