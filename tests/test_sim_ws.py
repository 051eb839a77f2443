"""The real ccxt.pro client against the loopback stream simulator, per dialect: subscription,
in-progress updates converging to the closed candle, the closed flag through `KlineTap`,
`watch_ohlcv_for_symbols`, and sharing candles and clock with the REST simulator."""

from __future__ import annotations

import asyncio

import ccxt
import pytest

from candlekeeper.simulator import BinanceSimulator
from candlekeeper.simulator.ccxt_client import make_binance
from candlekeeper.simulator.ws import WsSimulator
from candlekeeper.simulator.ws.ccxt_pro import pro_client, tapped
from candlekeeper.simulator.ws.testing import EXCHANGES, T0, advance, pro, run, stream_sim, watch_until

MIN = 60_000


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_updates_converge_and_the_final_push_is_the_closed_candle(exchange: str) -> None:
    with stream_sim(exchange) as (sim, clock):
        h = sim.history

        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                first = await watch_until(ex, "BTC/USDT", "1m", lambda rows: True)
                assert first == [list(h.candle("BTC/USDT", "1m", T0, T0 + 50_000).ohlcv())]
                advance(sim, clock, T0 + 55_000)
                later = h.candle("BTC/USDT", "1m", T0, T0 + 55_000).ohlcv()
                await watch_until(ex, "BTC/USDT", "1m", lambda rows: rows[-1] == list(later))
                assert ex.drain_closed("BTC/USDT", "1m") == []  # nothing closed yet
                advance(sim, clock, T0 + MIN + 1_000)
                await watch_until(ex, "BTC/USDT", "1m", lambda rows: rows[-1][0] == T0 + MIN)
                closed = ex.drain_closed("BTC/USDT", "1m")
                assert closed == sim.expected_candles("BTC/USDT", "1m", T0, T0 + MIN)
                final = closed[0]
                assert final[5] > later[5]  # volume only grows towards the final
                assert final != later
                assert ex.ohlcvs["BTC/USDT"]["1m"].hashmap[T0] == list(final)
        run(scenario())
        stats = sim.stats()
        assert stats.finals == 1 and stats.updates >= 3 and stats.subscribe_requests == 1


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_every_candle_closing_gets_its_final_push_after_a_clock_jump(exchange: str) -> None:
    with stream_sim(exchange) as (sim, clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "ETH/USDT", "1m", lambda rows: True)
                advance(sim, clock, T0 + 3 * MIN + 5_000)  # three candles close at once
                await watch_until(ex, "ETH/USDT", "1m", lambda r: r[-1][0] == T0 + 3 * MIN)
                assert ex.drain_closed("ETH/USDT", "1m") == sim.expected_candles(
                    "ETH/USDT", "1m", T0, T0 + 3 * MIN)
        run(scenario())


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_watch_ohlcv_for_symbols_is_one_request_and_returns_one_series_per_call(
        exchange: str) -> None:
    with stream_sim(exchange) as (sim, _clock):
        pairs = [["BTC/USDT", "1m"], ["ETH/USDT", "5m"]]

        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                for _ in range(50):
                    got = await asyncio.wait_for(ex.watch_ohlcv_for_symbols(pairs), 5)
                    assert len(got) == 1 and len(next(iter(got.values()))) == 1
                    if "ETH/USDT" in ex.ohlcvs and "BTC/USDT" in ex.ohlcvs:
                        break
                assert list(ex.ohlcvs["ETH/USDT"]) == ["5m"]
                # a later watch_ohlcv for another symbol joins the same connection
                await asyncio.wait_for(ex.watch_ohlcv("SOL/USDT", "1m"), 5)
        run(scenario())
        stats = sim.stats()
        assert stats.subscribe_requests == 2 and stats.connections == 1


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_for_symbols_returns_only_the_first_of_a_burst_the_tap_sees_all(exchange: str) -> None:
    """All 1m candles close at the same instant: their finals arrive in one burst, and each
    `watch_ohlcv_for_symbols` call returns one series. Frames arriving while no call waits
    are only cached; the tap hands every closed candle over."""
    with stream_sim(exchange) as (sim, clock):
        pairs = [["BTC/USDT", "1m"], ["ETH/USDT", "1m"]]

        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await asyncio.wait_for(ex.watch_ohlcv_for_symbols(pairs), 5)
                advance(sim, clock, T0 + MIN + 1_000)
                # the burst is BTC final, BTC update, ETH final, ETH update: wait for the last
                await ex.wait_kline(lambda e: e.symbol == "ETH/USDT" and not e.closed
                                    and e.ohlcv[0] == T0 + MIN)
                got = await asyncio.wait_for(ex.watch_ohlcv_for_symbols(pairs), 5)
                assert list(got) == ["BTC/USDT"]  # pushed first in every burst
                for symbol in ("BTC/USDT", "ETH/USDT"):
                    assert ex.drain_closed(symbol, "1m") == sim.expected_candles(
                        symbol, "1m", T0, T0 + MIN)
        run(scenario())


def test_binance_stream_shares_rest_candles_and_clock() -> None:
    """A candle closed over WS equals the REST simulator's candle (same history and clock),
    with ccxt.pro loading markets from the REST simulator."""
    clock = [T0 + 50_000]
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], now_ms=lambda: clock[0],
                          history_start_ms=T0 - 86_400_000) as rest:
        sim = WsSimulator.sharing(rest, "binance", update_period_s=0.05, serve_markets=False)
        with sim:
            async def scenario() -> list:
                ex = pro_client("binance", sim, rest_base=rest.url, cls=tapped("binance"))
                ex.timeout_on_exit = 0
                try:
                    await watch_until(ex, "ETH/USDT", "1m", lambda rows: True)
                    clock[0] = T0 + MIN + 500
                    sim.wake()
                    await watch_until(ex, "ETH/USDT", "1m", lambda r: r[-1][0] == T0 + MIN)
                    return ex.drain_closed("ETH/USDT", "1m")
                finally:
                    await ex.close()
            closed = run(scenario())
            assert rest.stats().by_path.get("/api/v3/exchangeInfo") == 1  # ccxt.pro's
            rows = make_binance(rest.url).fetch_ohlcv("ETH/USDT", "1m", since=T0, limit=1)
            assert [list(c) for c in closed] == rows


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_load_markets_needs_one_request_on_the_stream_simulator(exchange: str) -> None:
    with stream_sim(exchange) as (sim, _):
        async def scenario() -> dict:
            async with pro(exchange, sim) as ex:
                return await ex.load_markets()
        markets = run(scenario())
        assert {"BTC/USDT", "ETH/USDT", "SOL/USDT"} <= set(markets)
        assert all(m["spot"] for m in markets.values())


def test_the_tap_is_the_real_ccxt_class() -> None:
    for exchange in EXCHANGES:
        cls = tapped(exchange)
        assert issubclass(cls, getattr(ccxt.pro, exchange))
        assert cls().id == exchange


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_final_landing_between_watches_comes_back_only_with_the_next_frame(
        exchange: str) -> None:
    """ccxt resolves only watches that are pending: a final that lands between two
    `watch_ohlcv` calls is returned by the next call, which waits for the next frame."""
    with stream_sim(exchange) as (sim, clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", lambda rows: True)
                sim.update_rules(update_period_s=0.5)
                advance(sim, clock, T0 + MIN + 1_000)
                await ex.wait_kline(lambda e: e.ohlcv[0] == T0 + MIN)  # final and next seen
                updates = sim.stats().updates
                rows = [list(r) for r in await asyncio.wait_for(
                    ex.watch_ohlcv("BTC/USDT", "1m"), 5)]
                assert sim.stats().updates > updates  # it took one more frame
                assert [r[0] for r in rows] == [T0, T0 + MIN]
                assert tuple(rows[0]) == sim.expected_candles("BTC/USDT", "1m", T0, T0 + MIN)[0]
        run(scenario())
