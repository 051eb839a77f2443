"""What each exchange gets without being told (issue 11): page size and budget from ccxt's metadata
(corrected by the exchange's documented facts), the config's `page_limit` and `rate_limit` still
overriding them; only the market types the configured symbols need are listed; and `--simulate`
serves each exchange in its own dialect, saying which it cannot simulate."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ccxt
import pytest
from structlog.testing import capture_logs

from candlekeeper.actors.sources.ccxt_source import CcxtSource
from candlekeeper.actors.sources.profiles import BUDGETS, KNOWN, market_types, profile
from candlekeeper.app import config as config_mod
from candlekeeper.app.settings import requests_per_second, series_settings
from candlekeeper.simulator.server import ExchangeSimulator
from candlekeeper.surfaces.simulate import simulated

DIALECTS = ["binance", "okx", "bybit", "kraken", "coinbase", "kucoin"]
SPOT = {"binance": "BTC/USDT", "okx": "BTC/USDT", "bybit": "BTC/USDT", "kucoin": "BTC/USDT"}


def ccxt_page(exchange_id: str) -> int:
    return int(getattr(ccxt, exchange_id)().features["spot"]["fetchOHLCV"]["limit"])


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_page_size_is_ccxts_for_every_dialect(dialect: str) -> None:
    p = profile(dialect, getattr(ccxt, dialect)())
    assert p.page_limit == ccxt_page(dialect)
    assert p.page_limit in p.caps  # a page of exactly that many may have been cut
    assert p.paging == KNOWN[dialect]["paging"]


def test_an_exchange_without_a_profile_is_paged_oldest_first_with_ccxts_page_and_rate_limit() -> None:
    client = ccxt.bitget()
    assert "bitget" not in KNOWN and "bitget" not in BUDGETS
    p = profile("bitget", client)
    assert p.page_limit == ccxt_page("bitget") != 1000
    assert (p.paging, p.cut, p.omits_empty, p.reach) == ("cursor", "end", False, None)
    assert p.rate == pytest.approx(1000.0 / client.rateLimit)


def exchange_config(**keys: Any) -> config_mod.ExchangeConfig:
    cfg = config_mod.from_dict({"storage": {"path": "/tmp/never.db"},
                                "exchanges": {"x": {"exchange": "okx", "symbols": ["BTC/USDT"], **keys}}})
    return cfg.exchanges[0]


def test_the_config_overrides_page_size_and_budget() -> None:
    default = exchange_config()
    okx = profile("okx", ccxt.okx())
    assert requests_per_second(default) == pytest.approx(okx.rate / okx.cost("ohlcv"))
    assert series_settings(default, 1).page_limit >= ccxt_page("okx")  # the exchange's own page decides
    custom = exchange_config(page_limit=100, rate_limit=3)
    assert requests_per_second(custom) == 3
    assert series_settings(custom, 1).page_limit == 100


def test_market_types_follow_the_symbols() -> None:
    assert market_types("okx", ["BTC/USDT", "ETH/USDT"]) == ["spot"]
    assert market_types("okx", ["BTC/USDT:USDT", "BTC/USDT"]) == ["spot", "swap"]
    assert market_types("okx", ["BTC/USD:BTC-250328"]) == ["future"]
    assert market_types("bybit", ["BTC/USD:BTC"]) == ["inverse"]
    assert market_types("bybit", ["BTC/USDT:USDT", "ETH/USDT:USDT"]) == ["linear"]
    assert market_types("bybit", ["BTC/USD:BTC-250328-50000-C"]) == ["option"]
    assert market_types("kraken", ["BTC/USD"]) is None  # one listing for everything: nothing to choose


@pytest.mark.parametrize("dialect", sorted(SPOT))
def test_spot_symbols_list_no_derivative_market(dialect: str) -> None:
    """Only the spot listing is asked for: a derivative listing is neither paid for nor able to
    fail the load."""
    symbol = SPOT[dialect]
    derivative = {"spot", "currencies", "tickers"}  # listings that are not of a derivative market type
    seen: list[tuple[str, Any]] = []

    def note(path: str, params: Any, status: Any, fault: Any) -> None:
        seen.append((path, params))

    with ExchangeSimulator([symbol], dialect=dialect, on_request=note) as sim:
        async def load() -> set[str]:
            source = CcxtSource(dialect, symbols=[symbol], timeout=5.0, wall=time.time, api_base=sim.url)
            try:
                return set(await source.load_markets())
            finally:
                await source.close()

        listed = asyncio.run(load())
        kinds = [k for path, params in seen if (k := sim.dialect.listing_kind(path, params)) is not None]
    assert symbol in listed
    assert kinds and set(kinds) <= derivative, kinds


def test_simulate_serves_each_exchange_in_its_own_dialect_and_says_which_it_cannot() -> None:
    cfg = config_mod.from_dict({"storage": {"path": "/tmp/never.db"}, "exchanges": {
        "k": {"exchange": "kraken", "symbols": ["BTC/USD"]},
        "o": {"exchange": "okx", "symbols": ["BTC/USDT"]},
        "b": {"exchange": "bitget", "symbols": ["BTC/USDT"]},
    }})
    with capture_logs() as logs:
        out, sims = simulated(cfg)
    try:
        assert [s.dialect.name for s in sims] == ["kraken", "okx", "binance"]
        assert [e.api_base for e in out.exchanges] == [s.url for s in sims]
        unsimulated = [e for e in logs if e["event"] == "simulate_no_dialect"]
        assert [(e["exchange"], e["ccxt_id"], e["simulated_as"]) for e in unsimulated] == [("b", "bitget", "binance")]
    finally:
        for s in sims:
            s.stop()
