"""The fleet-wide price book's stored format and the inheritance of per-scope overrides
(distbudget/_core/fleet_prices.py)."""

from __future__ import annotations

import json

import pytest

from distbudget._core.fleet_prices import FleetBook, decode_book, encode_book, inherited_rates, parse_rev
from distbudget._core.keys import prices_key
from distbudget._core.prices import ModelRates, PriceBook
from distbudget._exceptions import InvalidInputError

LITELLM = {
    "acme-large": {
        "litellm_provider": "acme",
        "mode": "chat",
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.5e-05,
        "cache_read_input_token_cost": 3e-07,
        "cache_creation_input_token_cost": 3.75e-06,
        "input_cost_per_token_above_200k_tokens": 6e-06,
        "output_cost_per_token_above_200k_tokens": 2.25e-05,
        "input_cost_per_token_batches": 1.5e-06,
        "output_cost_per_token_batches": 7.5e-06,
    },
    "acme/acme-small-2026-01-01": {
        "litellm_provider": "acme",
        "mode": "chat",
        "input_cost_per_token": 1e-07,
        "output_cost_per_token": 4e-07,
    },
}


def test_a_book_round_trips_with_tiers_and_names() -> None:
    book = PriceBook.from_litellm(LITELLM, as_of="2026-11-01")
    back = decode_book(encode_book(book))
    assert back.as_of == book.as_of and back.models() == book.models()
    for model in ("acme-large", "acme/acme-large", "acme-small-2026-01-01", "acme/acme-small"):
        assert back.resolve(model) == book.resolve(model), model
    big = back.rates_for("acme-large")
    assert big.cost_nano(250_000, 1_000) == book.rates_for("acme-large").cost_nano(250_000, 1_000)
    assert big.cost_nano(100_000, 0, service_tier="batch") == 150_000_000


def test_the_bundled_snapshot_round_trips_and_dedupes() -> None:
    book = PriceBook()
    text = encode_book(book)
    doc = json.loads(text)
    assert len(doc["rates"]) < len(doc["names"]) == len(book.table.rates)
    back = decode_book(text)
    assert back.as_of == book.as_of
    assert all(back.table.rates[n] == r for n, r in book.table.rates.items())
    assert dict(back.table.ids) == dict(book.table.ids)
    assert back.rates_for("claude-sonnet-4-5") == book.rates_for("claude-sonnet-4-5")


def test_unknown_formats_and_garbage_are_refused() -> None:
    text = encode_book(PriceBook.from_litellm(LITELLM))
    with pytest.raises(InvalidInputError, match="format 2"):
        decode_book(text.replace('"format":1', '"format":2'))
    with pytest.raises(InvalidInputError, match="not JSON"):
        decode_book(b"\xff")
    with pytest.raises(InvalidInputError, match="malformed"):
        decode_book(json.dumps({"format": 1, "rates": [], "names": {"x": [3, "x", ""]}, "as_of": None}))
    with pytest.raises(TypeError):
        encode_book({"acme": 1})  # type: ignore[arg-type]
    assert parse_rev(None) == 0 and parse_rev(b"12") == 12
    with pytest.raises(InvalidInputError):
        parse_rev("x")


def test_one_key_per_prefix() -> None:
    assert prices_key("distbudget") == "distbudget:prices"
    with pytest.raises(InvalidInputError):
        prices_key("bad prefix")


def test_overrides_are_inherited_from_the_nearest_ancestor() -> None:
    book = PriceBook()
    org = {"gpt-4o": ModelRates.per_million(1, 1), "o3": ModelRates.per_million(2, 2)}
    team = {"openai/GPT-4o": ModelRates.per_million(5, 5)}  # another spelling of the same model
    bot = None
    got = inherited_rates([bot, team, org], book.model_id)
    assert got == {"gpt-4o": ModelRates.per_million(5, 5), "o3": ModelRates.per_million(2, 2)}
    assert PriceBook(got, table=book).rates_for("gpt-4o") == ModelRates.per_million(5, 5)
    assert inherited_rates([None, None], book.model_id) is None
    assert inherited_rates([{"My-Model": ModelRates()}], book.model_id) == {"my-model": ModelRates()}


def test_a_worker_keeps_its_prices_when_a_book_is_unreadable(caplog: pytest.LogCaptureFixture) -> None:
    fleet = FleetBook()
    good = encode_book(PriceBook.from_litellm(LITELLM))
    fleet.update(1, good)
    assert fleet.rev == 1 and fleet.table is not None and "acme-large" in fleet.table.rates
    table = fleet.table
    fleet.update(1, None)  # unchanged
    fleet.update(2, good.replace('"format":1', '"format":9'))  # from a newer distbudget
    assert fleet.rev == 2 and fleet.table is table
    assert "revision 2 not used" in caplog.text
