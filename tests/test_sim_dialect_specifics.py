"""Per-exchange quirks the daemon must live with, each shown with the real ccxt client."""

from __future__ import annotations

import ccxt
import pytest

from candlekeeper.simulator import PoisonKind
from candlekeeper.simulator.history import align_down
from tests.test_sim_support import MIN, START, T0, FakeClock, Log, client, running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ----------------------------------------------------------------------------------- OKX
def test_okx_picks_its_endpoint_by_its_own_clock(clock: FakeClock) -> None:
    """ccxt compares `since` with ITS clock: against a fake-clock exchange every request goes
    to /market/history-candles (closed bars only) unless the client shares the clock."""
    log = Log()
    with running("okx", clock, on_request=log) as sim:
        open_t = align_down(T0, "1m")
        own = client(sim).fetch_ohlcv("BTC/USDT", "1m", since=open_t - 2 * MIN, limit=3)
        assert log.paths()[-1] == "/api/v5/market/history-candles"
        assert [r[0] for r in own] == [open_t - 2 * MIN, open_t - MIN]  # no in-progress bar
        shared = client(sim, clock).fetch_ohlcv("BTC/USDT", "1m", since=open_t - 2 * MIN,
                                                 limit=3)
        assert log.paths()[-1] == "/api/v5/market/candles"
        assert [r[0] for r in shared] == [open_t - 2 * MIN, open_t - MIN, open_t]
        # older than 1439 bars: ccxt switches to history-candles by itself
        client(sim, clock).fetch_ohlcv("BTC/USDT", "1m", since=T0 - 1500 * MIN, limit=3)
        assert log.paths()[-1] == "/api/v5/market/history-candles"


def test_okx_recent_candles_reach_only_1440_bars(clock: FakeClock) -> None:
    with running("okx", clock, history_start_ms=T0 - 3 * 86_400_000) as sim:
        ex = client(sim, clock)
        old = {"instId": "BTC-USDT", "bar": "1m", "after": T0 - 1500 * MIN}
        assert ex.publicGetMarketCandles(old)["data"] == []
        assert len(ex.publicGetMarketHistoryCandles(old)["data"]) == 100  # default limit


def test_okx_history_cap_below_ccxts_limit_drops_the_oldest_part(clock: FakeClock) -> None:
    """OKX answers newest-first: if /history-candles serves fewer rows than ccxt asks for
    (older docs: 100; ccxt asks 300), the page is the *newest* part of ccxt's window, and a
    backfill that resumes after the last row silently skips the start."""
    since = START - 1000 * MIN
    with running("okx", clock, history_start_ms=since - 86_400_000,
                 page_caps={"history-candles": 100}) as sim:
        rows = client(sim).fetch_ohlcv("BTC/USDT", "1m", since=since, limit=300)
        assert len(rows) == 100 and rows[0][0] == since + 200 * MIN
        assert rows == [list(c) for c in sim.expected_candles(
            "BTC/USDT", "1m", since + 200 * MIN, since + 300 * MIN)]


def test_okx_instruments_need_an_underlying_for_options(clock: FakeClock) -> None:
    with running("okx", clock) as sim:
        ex = client(sim)
        with pytest.raises(ccxt.ExchangeError):  # 50015
            ex.publicGetPublicInstruments({"instType": "OPTION"})
        with pytest.raises(ccxt.BadRequest):  # 50014
            ex.publicGetPublicInstruments({})
        spot = ex.publicGetPublicInstruments({"instType": "SPOT", "instId": "BTC-USDT"})
        assert [d["instId"] for d in spot["data"]] == ["BTC-USDT"]


# --------------------------------------------------------------------------------- Bybit
def test_bybit_start_and_end(clock: FakeClock) -> None:
    with running("bybit", clock) as sim:
        ex = client(sim, clock)
        raw = ex.publicGetV5MarketKline({"category": "spot", "symbol": "BTCUSDT",
                                         "interval": "1", "start": START + 30_000, "limit": 2})
        rows = raw["result"]["list"]
        assert [int(r[0]) for r in rows] == [START + MIN, START]  # newest first; contains start
        raw = ex.publicGetV5MarketKline({"category": "spot", "symbol": "BTCUSDT",
                                         "interval": "1", "end": START + 10 * MIN, "limit": 2})
        assert [int(r[0]) for r in raw["result"]["list"]] == [START + 10 * MIN, START + 9 * MIN]
        # ccxt aligns a mid-bar `since` up to the next bar (ccxt#26736)
        assert ex.fetch_ohlcv("BTC/USDT", "1m", since=START + 30_000, limit=1)[0][0] == \
            START + MIN
        with pytest.raises(ccxt.BadSymbol):  # derivatives' candles are not served
            ex.publicGetV5MarketKline({"category": "linear", "symbol": "BTCUSDT",
                                       "interval": "1"})


# -------------------------------------------------------------------------------- Kraken
def test_kraken_since_is_exclusive_and_the_current_bar_always_comes(clock: FakeClock) -> None:
    with running("kraken", clock) as sim:
        ex = client(sim)
        r = ex.publicGetOHLC({"pair": "XBTUSD", "interval": 1, "since": (START + MIN) // 1000})
        rows = r["result"]["XXBTZUSD"]  # the altname is accepted, the result keyed by the id
        assert rows[0][0] * 1000 == START + 2 * MIN
        assert r["result"]["last"] * 1000 == align_down(T0, "1m") - MIN
        r = ex.publicGetOHLC({"pair": "XXBTZUSD", "interval": 1, "since": T0 // 1000 + 3600})
        assert [row[0] * 1000 for row in r["result"]["XXBTZUSD"]] == [align_down(T0, "1m")]
        with pytest.raises(ccxt.BadRequest):  # EGeneral:Invalid arguments
            ex.publicGetOHLC({"pair": "XXBTZUSD", "interval": 2})


def test_kraken_rate_limit_is_ddos_protection_not_rate_limit_exceeded(clock: FakeClock) -> None:
    """ccxt matches "EAPI:Rate limit exceeded" exactly (DDoSProtection) before its broad
    ":Rate limit exceeded" rule (RateLimitExceeded) gets a chance."""
    with running("kraken", clock) as sim:
        ex = client(sim)
        sim.set_rate_limit(1)
        ex.fetch_time()
        with pytest.raises(ccxt.DDoSProtection) as info:
            ex.fetch_time()
        assert not isinstance(info.value, ccxt.RateLimitExceeded)
        assert "EAPI:Rate limit exceeded" in str(info.value)


# ------------------------------------------------------------------------------ Coinbase
def test_coinbase_window_is_start_inclusive_end_exclusive_newest_first(clock: FakeClock) -> None:
    with running("coinbase", clock) as sim:
        ex = client(sim)
        s = START // 1000
        r = ex.v3PublicGetBrokerageMarketProductsProductIdCandles(
            {"product_id": "BTC-USD", "granularity": "ONE_MINUTE", "start": s, "end": s + 180})
        assert [int(c["start"]) for c in r["candles"]] == [s + 120, s + 60, s]
        with pytest.raises(ccxt.BadRequest):  # INVALID_ARGUMENT
            ex.v3PublicGetBrokerageMarketProductsProductIdCandles(
                {"product_id": "BTC-USD", "granularity": "FOUR_MINUTE", "start": s,
                 "end": s + 60})


def test_coinbase_without_since_uses_the_clients_clock(clock: FakeClock) -> None:
    with running("coinbase", clock) as sim:
        assert client(sim).fetch_ohlcv("BTC/USD", "1m", limit=3) == []  # years off
        rows = client(sim, clock).fetch_ohlcv("BTC/USD", "1m", limit=3)
        assert rows[-1][0] == align_down(T0, "1m")


# -------------------------------------------------------------------------------- KuCoin
def test_kucoin_over_wide_window_keeps_the_newest_bars(clock: FakeClock) -> None:
    with running("kucoin", clock, history_start_ms=T0 - 3 * 86_400_000) as sim:
        ex = client(sim, clock)
        since = T0 - 2000 * MIN
        rows = ex.publicGetMarketCandles({"symbol": "BTC-USDT", "type": "1min",
                                          "startAt": since // 1000,
                                          "endAt": since // 1000 + 1600 * 60})["data"]
        assert len(rows) == 1500 and int(rows[-1][0]) * 1000 == align_down(since, "1m") + 101 * MIN
        # rows are [time, open, close, high, low, volume, turnover]: ccxt reorders them
        parsed = ex.fetch_ohlcv("BTC/USDT", "1m", since=START, limit=1)[0]
        raw = ex.publicGetMarketCandles({"symbol": "BTC-USDT", "type": "1min",
                                         "startAt": START // 1000,
                                         "endAt": START // 1000 + 60})["data"][0]
        assert parsed[1:5] == [float(raw[1]), float(raw[3]), float(raw[4]), float(raw[2])]


def test_kucoin_limit_above_the_cap_skips_the_start_of_the_window(clock: FakeClock) -> None:
    """ccxt turns `limit` into the window (endAt = since + limit bars) without capping it at
    1500: the exchange keeps the newest 1500, so the page starts `limit - 1500` bars late."""
    since = align_down(T0, "1m") - 4000 * MIN
    with running("kucoin", clock, history_start_ms=T0 - 5 * 86_400_000) as sim:
        rows = client(sim, clock).fetch_ohlcv("BTC/USDT", "1m", since=since, limit=2000)
        assert len(rows) == 1500 and rows[0][0] == since + 500 * MIN


# ------------------------------------------------------------------------------- Binance
def test_binance_default_load_markets_also_loads_futures(clock: FakeClock) -> None:
    log = Log()
    with running("binance", clock, on_request=log) as sim:
        markets = client(sim, spot_only=False).load_markets()
        assert log.paths() == ["/api/v3/exchangeInfo", "/fapi/v1/exchangeInfo",
                               "/dapi/v1/exchangeInfo"]
        assert {m["type"] for m in markets.values()} == {"spot", "swap", "future"}
        assert markets["BTC/USDT:USDT"]["linear"] and markets["BTC/USD:BTC"]["inverse"]


@pytest.mark.parametrize("dialect,key,symbol", [("okx", "BTC-USDT", "BTC/USDT"),
                                                ("kraken", "XXBTZUSD", "BTC/USD")])
def test_poison_by_the_dialects_own_id(dialect: str, key: str, symbol: str,
                                       clock: FakeClock) -> None:
    with running(dialect, clock) as sim:
        sim.poison(key, PoisonKind.EMPTY)
        assert client(sim, clock).fetch_ohlcv(symbol, "1m", since=START, limit=3) == []
        sim.unpoison(key)
        assert len(client(sim, clock).fetch_ohlcv(symbol, "1m", since=START, limit=3)) == 3
