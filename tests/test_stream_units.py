"""The pure parts of live streaming: the closed-candle rule, WebSocket URL rebasing, the `live`
and `ws_url` keys and what they mean, and the stream's health and `ctl top` rows."""

from __future__ import annotations

import asyncio

import pytest

from candlekeeper.actors.market.streamed import CloseTracker, StreamLedger
from candlekeeper.actors.sources.ccxt_stream import rebase_ws_urls, stream_profile, supports
from candlekeeper.app import config as config_mod
from candlekeeper.app import settings
from candlekeeper.surfaces.top import render

TF = 60_000
T = 1_700_000_040_000 - 1_700_000_040_000 % TF


def row(ts: int, close: float = 101.0, volume: float = 5.0) -> tuple[int, float, float, float, float, float]:
    return (ts, 100.0, max(102.0, close), 99.0, close, volume)


# -- closed candles ------------------------------------------------------------------------------


def test_a_flagged_final_is_the_closed_candle_once() -> None:
    t = CloseTracker(TF)
    assert t.frame(T, False, None, None, T + 30_000, 500) == []
    assert t.frame(T, True, None, row(T), T + TF + 5, 500) == [row(T)]
    assert t.frame(T, True, None, row(T), T + TF + 9, 500) == []  # duplicated final
    assert t.frame(T + TF, True, None, row(T + TF), T + 2 * TF, 500) == [row(T + TF)]


def test_a_reordered_final_still_counts_a_duplicate_does_not() -> None:
    t = CloseTracker(TF)
    assert t.frame(T + TF, True, None, row(T + TF), T + 2 * TF, 0) == [row(T + TF)]
    assert t.frame(T, True, None, row(T), T + 2 * TF, 0) == [row(T)]  # late, but never handed out
    assert t.frame(T, True, None, row(T), T + 2 * TF, 0) == []


def test_an_invalid_final_is_left_to_rest() -> None:
    t = CloseTracker(TF)
    assert t.frame(T, True, None, (T, 100.0, 99.0, 101.0, 100.0, 1.0), T + TF, 0) == []  # high < low
    assert t.frame(T + 7, True, None, row(T + 7), T + TF, 0) == []  # not aligned


def test_without_a_flag_a_candle_closes_when_a_later_one_starts_and_its_close_has_passed() -> None:
    t = CloseTracker(TF)
    assert t.frame(T, None, T + 10_000, row(T, 100.5), T + 10_000, 500) == []
    assert t.frame(T, None, T + TF, row(T, 101.0), T + TF, 500) == []  # the final: nothing later yet
    # the next candle has started and the close is past on the exchange's clock
    assert t.frame(T + TF, None, T + TF + 200, row(T + TF), T + TF + 600, 500) == [row(T, 101.0)]
    assert t.frame(T + TF, None, T + TF + 900, row(T + TF), T + TF + 900, 500) == []


def test_without_a_flag_the_clock_must_agree() -> None:
    t = CloseTracker(TF)
    t.frame(T, None, T + TF, row(T), T + TF - 3_000, 500)
    # a later candle, but by the exchange's clock (less its margin) the first has not closed
    assert t.frame(T + TF, None, T + TF, row(T + TF), T + TF + 100, 500) == []


def test_without_a_flag_a_last_message_from_before_the_close_is_not_the_final() -> None:
    t = CloseTracker(TF)
    t.frame(T, None, T + 58_000, row(T, 100.5), T + 58_000, 0)  # the final push was missed
    assert t.frame(T + TF, None, T + TF + 2_000, row(T + TF), T + TF + 2_000, 0) == []
    # a stream that does not say when it sent a message: the last one seen is taken
    u = CloseTracker(TF)
    u.frame(T, None, None, row(T, 100.5), T + 58_000, 0)
    assert u.frame(T + TF, None, None, row(T + TF), T + TF + 2_000, 0) == [row(T, 100.5)]


# -- URLs and config -----------------------------------------------------------------------------


def test_ws_urls_keep_their_paths_on_the_new_host() -> None:
    urls = {"spot": "wss://stream.binance.com:9443/ws", "public": {"spot": "wss://stream.{hostname}/v5/public/spot"},
            "api": "https://api.binance.com/api", "list": ["wss://ws.okx.com:443/ws/v5"]}
    out = rebase_ws_urls(urls, "ws://127.0.0.1:8765/proxy")
    assert out == {"spot": "ws://127.0.0.1:8765/proxy/ws", "public": {"spot": "ws://127.0.0.1:8765/proxy/v5/public/spot"},
                   "api": "https://api.binance.com/api", "list": ["ws://127.0.0.1:8765/proxy/ws/v5"]}
    assert urls["spot"] == "wss://stream.binance.com:9443/ws"  # not mutated
    with pytest.raises(ValueError):
        rebase_ws_urls(urls, "http://127.0.0.1:8765")


def test_streamed_exchanges_are_those_with_a_closed_flag_tap() -> None:
    assert supports("binance") and supports("okx") and supports("bybit")
    assert not supports("kraken")  # ccxt.pro watches it, but no tap reads its frames here
    assert not supports("coinbase")
    assert stream_profile("binance").streams_per_connection == 1024
    assert stream_profile("bybit").subscribe_batch == 10


def _cfg(**exchange: object) -> config_mod.Config:
    return config_mod.from_dict({"exchanges": {"binance": {"symbols": ["BTC/USDT"], **exchange}}})


def test_live_and_ws_url_keys() -> None:
    ex = _cfg().exchanges[0]
    assert ex.live == "auto" and ex.ws_url is None
    assert settings.streams(ex)  # binance, nothing redirected
    assert not settings.streams(_cfg(api_base="http://127.0.0.1:1").exchanges[0])  # REST elsewhere, streams not
    assert settings.streams(_cfg(api_base="http://127.0.0.1:1", ws_url="ws://127.0.0.1:2").exchanges[0])
    assert not settings.streams(_cfg(live="rest").exchanges[0])
    assert settings.streams(_cfg(live="websocket", api_base="http://127.0.0.1:1").exchanges[0])
    kraken = config_mod.from_dict({"exchanges": {"kraken": {"symbols": ["BTC/USD"]}}}).exchanges[0]
    assert not settings.streams(kraken)
    cfg = _cfg(live="websocket", ws_url="wss://proxy.example:9443/binance/")
    assert cfg.exchanges[0].ws_url == "wss://proxy.example:9443/binance"
    again = config_mod.from_dict(config_mod.to_dict(cfg))
    assert again.exchanges[0].live == "websocket" and again.exchanges[0].ws_url == cfg.exchanges[0].ws_url


@pytest.mark.parametrize(("exchange", "message"), [
    ({"live": "stream"}, 'live: expected "auto", "websocket" or "rest"'),
    ({"ws_url": "http://127.0.0.1:1"}, "ws_url: expected"),
    ({"ws_url": "ws://"}, "ws_url: expected"),
])
def test_bad_live_keys_are_one_line_errors(exchange: dict[str, object], message: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=message):
        _cfg(**exchange)


def test_websocket_for_an_exchange_without_a_tap_is_refused() -> None:
    with pytest.raises(config_mod.ConfigError, match=r"live: \"websocket\": no WebSocket candles .* for kraken"):
        config_mod.from_dict({"exchanges": {"kraken": {"symbols": ["BTC/USD"], "live": "websocket"}}})


# -- visibility ------------------------------------------------------------------------------------


def test_top_shows_each_exchanges_stream_and_each_series_source() -> None:
    from rich.console import Console

    health = {
        "status": "degraded",
        "reasons": ["binance: live stream down (0 of 1 connections up: NetworkError: closed); its series poll"
                    " over REST meanwhile"],
        "exchanges": [{"name": "binance", "breaker": "closed", "status": "ok",
                       "stream": {"state": "down", "connections": 1, "connections_up": 0, "streams": 2,
                                  "streams_up": 0, "reconnects": 3}},
                      {"name": "kraken", "breaker": "closed", "status": "ok"}],
        "series": [{"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m", "status": "ok",
                    "last_ts": T, "source": "rest"},
                   {"exchange": "binance", "symbol": "ETH/USDT", "timeframe": "1m", "status": "ok",
                    "last_ts": T, "source": "stream"}],
    }
    console = Console(width=160, record=True, no_color=True)
    console.print(render(health, T / 1000 + 90))
    text = console.export_text()
    assert "STREAM" in text and "SOURCE" in text
    assert "down 0/2 ↻3" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("binance:")}
    assert " rest " in lines["binance:BTC/USDT@1m"] and " stream " in lines["binance:ETH/USDT@1m"]


def test_the_ledger_tells_a_stream_behind_from_one_that_passed_a_series_by() -> None:
    now = [100.0]
    ledger = StreamLedger()
    ledger.saw("a", "1m", 0, lambda: now[0])
    ledger.saw("b", "1m", 0, lambda: now[0])
    assert ledger.passed_at("1m", 0) is None  # nothing after candle 0 yet: behind
    now[0] = 161.0
    ledger.saw("a", "1m", 60_000, lambda: now[0])  # the next candle begins, for a only
    now[0] = 170.0
    ledger.saw("a", "1m", 60_000, lambda: now[0])  # more frames of it change nothing
    assert ledger.passed_at("1m", 0) == 161.0
    assert ledger.passed_at("1m", 60_000) is None
    assert (ledger.seen("a"), ledger.seen("b"), ledger.seen("c")) == (60_000, 0, None)
    assert ledger.passed_at("5m", 0) is None  # per timeframe
    for i in range(2, 10):
        ledger.saw("a", "1m", i * 60_000, lambda i=i: 100.0 + 60 * i)
    assert ledger.passed_at("1m", 0) == 100.0 + 60 * 6  # only the last few are kept: the oldest of those
    ledger.took("a", 60_000)
    ledger.took("a", 0)
    assert ledger.newest("a") == 60_000


def test_ccxt_keeps_only_the_last_few_candles_of_each_stream() -> None:
    # ccxt.pro's cache holds 1000 candles per stream by default: ten million rows a day at
    # 10,000 series, none of them read again (the store keeps the candles)
    from candlekeeper.actors.sources.ccxt_stream import OHLCV_KEPT, pro_client
    from candlekeeper.simulator.ws.testing import T0, advance, run, stream_sim, watch_until

    with stream_sim("binance") as (sim, clock):
        async def scenario() -> None:
            ex = pro_client("binance", symbols=["BTC/USDT"], timeout=5.0, wall=clock, api_base=sim.http_base,
                            ws_url=sim.ws_base)
            try:
                watching = asyncio.ensure_future(
                    watch_until(ex, "BTC/USDT", "1m", lambda rows: rows[-1][0] == T0 + 9 * TF))
                await asyncio.to_thread(sim.wait_for, lambda s: s.subscribed >= 1)
                advance(sim, clock, T0 + 10 * TF + 1_000)  # ten candles close at once
                await watching
                assert len(ex.ohlcvs["BTC/USDT"]["1m"]) == OHLCV_KEPT < 10
            finally:
                await ex.close()
        run(scenario())


@pytest.mark.parametrize("exchange", ["binance", "okx", "bybit"])
def test_streams_are_not_deflated(exchange: str) -> None:
    # inflating each frame hands the GIL back and waits for it again: at 10,000 series that
    # was most of a stream loop's time, and the close's finals were read late
    from candlekeeper.actors.sources.ccxt_stream import pro_client
    from candlekeeper.simulator.ws.testing import T0, advance, run, stream_sim, watch_until

    with stream_sim(exchange) as (sim, clock):
        async def scenario() -> None:
            ex = pro_client(exchange, symbols=["BTC/USDT"], timeout=5.0, wall=clock, api_base=sim.http_base,
                            ws_url=sim.ws_base)
            try:
                watching = asyncio.ensure_future(watch_until(ex, "BTC/USDT", "1m", bool))
                await asyncio.to_thread(sim.wait_for, lambda s: s.subscribed >= 1)
                advance(sim, clock, T0 + 2 * TF + 1_000)  # a candle closes: ccxt's watch returns
                await watching
                assert ex.clients and all(c.connection.compress == 0 for c in ex.clients.values())
            finally:
                await ex.close()
        run(scenario())
