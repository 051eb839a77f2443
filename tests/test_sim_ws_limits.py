"""Each exchange's connection and subscription limits and keepalive rules, and what
ccxt.pro 4.5.90's caller sees when they bite."""

from __future__ import annotations

import asyncio
from typing import Any

import ccxt
import pytest

from candlekeeper.simulator.server import synthetic_symbols
from candlekeeper.simulator.ws import StallMode, StreamFault, StreamFaults
from candlekeeper.simulator.ws.testing import (
    ANY,
    EXCHANGES,
    first_error,
    pro,
    run,
    stats_wait,
    stream_sim,
    until,
    watch_until,
)


def test_binance_puts_every_ohlcv_watch_on_one_connection_up_to_its_stream_limit() -> None:
    with stream_sim("binance") as (sim, _clock):
        sim.update_rules(max_streams_per_connection=2)  # Binance: 1024

        async def scenario() -> None:
            async with pro("binance", sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                await watch_until(ex, "ETH/USDT", "1m", ANY)
                with pytest.raises(ccxt.ExchangeError, match="too many streams"):
                    await asyncio.wait_for(ex.watch_ohlcv("SOL/USDT", "1m"), 5)
                assert sim.topics() == [["btcusdt@kline_1m", "ethusdt@kline_1m"]]
        run(scenario())


def test_bybit_spot_refuses_more_than_ten_topics_in_one_request() -> None:
    symbols = tuple(synthetic_symbols(11))
    with stream_sim("bybit", symbols=symbols) as (sim, _clock):
        async def scenario() -> None:
            async with pro("bybit", sim) as ex:
                with pytest.raises(ccxt.ExchangeError, match="args size >10"):
                    await asyncio.wait_for(
                        ex.watch_ohlcv_for_symbols([[s, "1m"] for s in symbols]), 5)
                await asyncio.wait_for(  # ten is fine (on a new connection)
                    ex.watch_ohlcv_for_symbols([[s, "5m"] for s in symbols[:10]]), 5)
        run(scenario())


@pytest.mark.parametrize("throttled", [False, True], ids=["no_ratelimit", "enableRateLimit"])
def test_binance_closes_a_connection_sending_over_five_frames_a_second(throttled: bool) -> None:
    """Each watch_ohlcv of a new series is one SUBSCRIBE frame. Six at once break Binance's
    5 frames/s limit unless ccxt's own throttle (ws cost 5 x 50 ms) spaces them."""
    symbols = tuple(synthetic_symbols(6))
    with stream_sim("binance", symbols=symbols) as (sim, _clock):
        async def scenario() -> list[Any]:
            async with pro("binance", sim, enableRateLimit=throttled) as ex:
                watches = [asyncio.wait_for(ex.watch_ohlcv(s, "1m"), 5) for s in symbols]
                return await asyncio.gather(*watches, return_exceptions=True)
        results = run(scenario())
        errors = [r for r in results if isinstance(r, BaseException)]
        if throttled:
            assert errors == [] and StreamFault.OVER_RATE not in sim.stats().faults
        else:
            assert errors and all(type(e) is ccxt.NetworkError for e in errors)
            assert all(str(e).endswith("closing code 1008") for e in errors)


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_refused_handshake_is_a_networkerror_and_backs_off_the_next_dial(exchange: str) -> None:
    with stream_sim(exchange, faults=StreamFaults(handshake_status=503)) as (sim, _clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                err = await first_error(lambda: ex.watch_ohlcv("BTC/USDT", "1m"), attempts=1)
                assert type(err) is ccxt.NetworkError and "503" in str(err)
                [url] = ex.ws_dial_backoff
                assert ex.ws_dial_delay(url) > 0  # the next dial sleeps first
                sim.update_faults(handshake_status=None)
                await watch_until(ex, "BTC/USDT", "1m", ANY)
        run(scenario())


def test_connection_rate_limit_answers_429_and_ccxt_honours_retry_after() -> None:
    with stream_sim("okx") as (sim, _clock):
        sim.update_rules(max_connections_per_window=(1, 60.0))  # OKX: 3 per second

        async def scenario() -> None:
            async with pro("okx", sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                await asyncio.to_thread(sim.drop_connections)
                await until(lambda: not ex.clients)
                err = await first_error(lambda: ex.watch_ohlcv("BTC/USDT", "1m"), attempts=1)
                assert type(err) is ccxt.NetworkError and str(err).startswith("429")
                [url] = ex.ws_dial_backoff
                assert ex.ws_dial_delay(url) > 30  # Retry-After (60 s window) beats 0.2 s
        run(scenario())


def test_binance_server_pings_are_answered_by_ccxt() -> None:
    with stream_sim("binance") as (sim, _clock):
        sim.update_rules(server_ping_s=0.05, pong_timeout_s=0.5)  # Binance: 20 s / 60 s

        async def scenario() -> None:
            async with pro("binance", sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                await stats_wait(sim, lambda st: st.pongs_received >= 3)
                await watch_until(ex, "BTC/USDT", "1m", ANY)
        run(scenario())
        st = sim.stats()
        assert st.connections == 1 and StreamFault.PONG_TIMEOUT not in st.faults


def test_okx_closes_a_stalled_connection_after_its_idle_time() -> None:
    with stream_sim("okx") as (sim, _clock):
        async def scenario() -> None:
            async with pro("okx", sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                sim.update_rules(idle_close_s=0.2)  # OKX: 30 s without anything pushed
                sim.update_faults(stall=StallMode.DATA)
                err = await first_error(lambda: ex.watch_ohlcv("BTC/USDT", "1m"))
                assert type(err) is ccxt.NetworkError
                assert str(err).endswith("closing code 4004")
        run(scenario())
        assert sim.stats().faults[StreamFault.IDLE] == 1
