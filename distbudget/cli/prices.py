"""``distbudget prices``: the built-in model price table."""

from __future__ import annotations

import argparse
from typing import Any

from distbudget.cli._common import table
from distbudget.pricing import price_table


def add_parser(sub: Any) -> None:
    prices = sub.add_parser(
        "prices",
        help="list the built-in model price table",
        description="List the built-in model prices (USD per 1M tokens).",
    )
    prices.set_defaults(func=run)


def run(_args: argparse.Namespace) -> int:
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
    for line in table(rows, {2, 3, 4}):
        print(line)
    return 0
