"""``distbudget prices``: the built-in model price table; ``prices push FILE`` / ``prices show MODEL``:
the fleet's price book (``BudgetManager.push_prices`` / ``prices``)."""

from __future__ import annotations

import argparse
from decimal import Decimal

from distbudget._core.report import aligned
from distbudget.cli._common import CommandError, connect
from distbudget.pricing import ModelRates, PriceBook, price_table


def run(_args: argparse.Namespace) -> int:
    """List the built-in model prices (USD per 1M tokens)."""
    prices = price_table()
    rows = [["model", "provider", "input", "output", "cached input"]]

    def rate(v: float | None) -> str:
        return "-" if v is None else f"{float(v):g}"

    for name, entry in prices["models"].items():
        rows.append(
            [
                name,
                str(entry.get("provider", "")),
                rate(entry["input"]),
                rate(entry["output"]),
                rate(entry.get("cached_input")),
            ]
        )
    print(
        f"built-in prices as of {prices['as_of']} ({prices['unit']}); "
        f"{len(prices['models'])} models, {len(prices['aliases'])} aliases"
    )
    for line in aligned(rows, right={2, 3, 4}, indent="  "):
        print(line)
    return 0


def run_push(args: argparse.Namespace) -> int:
    """Store FILE (LiteLLM's model_prices_and_context_window.json format) as the price book of every
    worker under --prefix; workers use it from their next registry refresh."""
    book = PriceBook.from_litellm(args.file, as_of=args.as_of)
    revision = connect(args, need="").manager().push_prices(book)
    print(f"pushed {len(book.models())} models dated {book.as_of or 'undated'} as revision {revision}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """The rates the fleet prices MODEL with (its pushed book, else the bundled snapshot)."""
    book = connect(args, need="").manager().prices()
    hit = book.resolve(args.model)
    if hit is None:
        raise CommandError(f"no price for {args.model!r} in prices dated {book.as_of or 'undated'}")
    model_id, rates = hit
    print(f"{model_id} (prices dated {book.as_of or 'undated'}, {book.table.source}); USD per 1M tokens")
    for line in aligned(rate_rows(rates), right={1, 2, 3, 4, 5, 6}, indent="  "):
        print(line)
    return 0


def rate_rows(rates: ModelRates) -> list[list[str]]:
    """One row per tier of a model's rates: standard, each long-context threshold, each service tier."""

    def row(name: str, r: ModelRates) -> list[str]:
        per_1k = r.to_dict()
        cells = [
            per_1k.get(f"{k}_per_1k") for k in ("input", "output", "cached_input", "cache_write", "cache_write_1h")
        ]
        cells.append(per_1k.get("reasoning_per_1k"))
        return [name, *("-" if v is None else f"{Decimal(str(v)) * 1000:f}".rstrip("0").rstrip(".") for v in cells)]

    rows = [["tier", "input", "output", "cached input", "cache write", "cache write 1h", "reasoning"]]
    rows.append(row("standard", rates))
    rows += [row(f"above {t:,} tokens", r) for t, r in rates.long_context]
    rows += [row(name, r) for name, r in rates.service_tiers]
    return rows
