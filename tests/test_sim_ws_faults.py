"""Each stream fault, and exactly what ccxt.pro 4.5.90's caller sees."""

from __future__ import annotations

import asyncio
from typing import Any

import ccxt
import pytest

from candlekeeper.simulator.ws import StallMode, StreamFault, StreamFaults
from candlekeeper.simulator.ws.testing import (
    ANY,
    EXCHANGES,
    T0,
    advance,
    first_error,
    outcome,
    pending_watch,
    pro,
    quiet,
    run,
    stats_wait,
    stream_sim,
    until,
    watch_until,
)

MIN = 60_000


# ----------------------------------------------------------------- dropped connections
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("reset", [True, False], ids=["rst", "close_frame"])
def test_drop_is_a_networkerror_and_only_the_callers_next_watch_reconnects(
        exchange: str, reset: bool) -> None:
    with stream_sim(exchange) as (sim, _clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                waiting = await pending_watch(ex, sim)
                assert await asyncio.to_thread(sim.drop_connections, reset=reset) == 1
                err = await outcome(waiting)
                assert type(err) is ccxt.NetworkError
                code = 1006 if reset else 1011
                assert str(err) == f"Connection closed by remote server, closing code {code}"
                # ccxt dropped the client: nothing is left that could reconnect by itself
                assert ex.clients == {}
                assert sim.stats().connections == 1
                sim.update_faults(stall=None)
                await watch_until(ex, "BTC/USDT", "1m", ANY)  # the caller watches again
                st = sim.stats()
                assert (st.connections, st.subscribe_requests) == (2, 2)
                # a drop while no watch waits is never raised: the next watch reconnects
                await asyncio.to_thread(sim.drop_connections, reset=reset)
                await until(lambda: not ex.clients)
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                st = sim.stats()
                assert (st.connections, st.subscribe_requests) == (3, 3)
        run(scenario())


# ------------------------------------------------------------------------------ stalls
@pytest.mark.parametrize("exchange", EXCHANGES)
def test_data_stall_just_hangs_and_closing_the_client_is_the_way_out(exchange: str) -> None:
    with stream_sim(exchange) as (sim, _clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                sim.update_faults(stall=StallMode.DATA)
                await quiet(ex)  # no exception: pings are answered, the feed is just dead
                await quiet(ex)  # watching again does not resubscribe either
                assert sim.stats().subscribe_requests == 1
                [client] = ex.clients.values()
                await client.close()
                assert ex.clients == {}
                sim.update_faults(stall=None)
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                st = sim.stats()
                assert (st.connections, st.subscribe_requests) == (2, 2)
        run(scenario())


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_silent_peer_is_a_requesttimeout_from_the_keepalive(exchange: str) -> None:
    with stream_sim(exchange) as (sim, _clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                ex.streaming["keepAlive"] = 100  # ms; read when the client is created
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                sim.update_faults(stall=StallMode.SILENT)
                err = await first_error(lambda: ex.watch_ohlcv("BTC/USDT", "1m"))
                assert type(err) is ccxt.RequestTimeout
                assert "ping-pong keepalive missing on time" in str(err)
                sim.update_faults(stall=None)
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                assert sim.stats().subscribe_requests == 2
        run(scenario())


# ------------------------------------------------------- duplicates, order, missed pushes
@pytest.mark.parametrize("exchange", EXCHANGES)
def test_duplicates_are_absorbed_by_the_cache_but_a_final_is_reported_twice(
        exchange: str) -> None:
    with stream_sim(exchange, faults=StreamFaults({StreamFault.DUPLICATE: 1.0})) as (sim, clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                advance(sim, clock, T0 + MIN + 1_000)
                rows = await watch_until(ex, "BTC/USDT", "1m", lambda r: r[-1][0] == T0 + MIN)
                assert len({r[0] for r in rows}) == len(rows)  # one row per candle
                await ex.wait_kline(lambda e: e.ohlcv[0] == T0 + MIN)
                expected = sim.expected_candles("BTC/USDT", "1m", T0, T0 + MIN)
                assert ex.drain_closed("BTC/USDT", "1m") == expected * 2
        run(scenario())


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_late_update_overwrites_the_cached_final_but_not_the_tapped_one(
        exchange: str) -> None:
    """Out of order: the last in-progress update of a candle arrives after its final. ccxt's
    cache takes the late values (the candle looks unclosed again); the tap kept the final."""
    with stream_sim(exchange) as (sim, clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                sim.update_faults(rates={StreamFault.REORDER: 1.0})
                await stats_wait(sim, lambda st: st.faults.get(StreamFault.REORDER, 0) >= 1)
                advance(sim, clock, T0 + MIN + 1_000)  # sends: final, then the held update
                final = sim.expected_candles("BTC/USDT", "1m", T0, T0 + MIN)[0]

                def after_final(e: Any) -> bool:
                    log = ex.kline_log
                    at = next((i for i, x in enumerate(log) if x.closed and x.ohlcv[0] == T0),
                              None)
                    return (at is not None and not e.closed and e.ohlcv[0] == T0
                            and any(x is e for x in log[at + 1:]))
                late = await ex.wait_kline(after_final)
                assert ex.drain_closed("BTC/USDT", "1m") == [final]
                assert ex.ohlcvs["BTC/USDT"]["1m"].hashmap[T0] == list(late.ohlcv) != list(final)
        run(scenario())


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_missed_updates_leave_only_the_final(exchange: str) -> None:
    with stream_sim(exchange, faults=StreamFaults({StreamFault.MISS: 1.0})) as (sim, clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                watching = asyncio.ensure_future(ex.watch_ohlcv("BTC/USDT", "1m"))
                await stats_wait(sim, lambda st: st.subscribed == 1)
                advance(sim, clock, T0 + MIN + 1_000)
                expected = sim.expected_candles("BTC/USDT", "1m", T0, T0 + MIN)
                assert [tuple(r) for r in await asyncio.wait_for(watching, 5)] == expected
                assert ex.drain_closed("BTC/USDT", "1m") == expected
        run(scenario())
        st = sim.stats()
        assert st.updates == 0 and st.finals == 1


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_missed_final_leaves_the_last_update_in_the_cache_and_nothing_closed(
        exchange: str) -> None:
    """The caller sees the next candle start; the previous one's final never came: its
    cached values are the last in-progress ones. Only REST can tell the closed values."""
    with stream_sim(exchange, faults=StreamFaults({StreamFault.MISS_FINAL: 1.0})) as (
            sim, clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                advance(sim, clock, T0 + MIN + 1_000)
                rows = await watch_until(ex, "BTC/USDT", "1m", lambda r: r[-1][0] == T0 + MIN)
                assert ex.drain_closed("BTC/USDT", "1m") == []
                final = sim.expected_candles("BTC/USDT", "1m", T0, T0 + MIN)[0]
                cached = ex.ohlcvs["BTC/USDT"]["1m"].hashmap[T0]
                assert cached != list(final) and cached[5] < final[5]
                assert rows[-1][0] == T0 + MIN
        run(scenario())
        assert sim.stats().faults[StreamFault.MISS_FINAL] == 1


# ---------------------------------------------------------------- refused subscriptions
REFUSALS = {
    # exchange: (exception class, words, other watches on the connection rejected too,
    #            watching again after the refusal resubscribes)
    "binance": (ccxt.ExchangeError, "Invalid request: invalid stream", False, False),
    "okx": (ccxt.BadRequest, '"code":"60018"', True, False),
    "bybit": (ccxt.ExchangeError, "Params Error", False, True),
}


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_refused_subscription(exchange: str) -> None:
    exc, words, rejects_all, resubscribes = REFUSALS[exchange]
    with stream_sim(exchange, faults=StreamFaults(refuse=frozenset({"ETH/USDT"}))) as (
            sim, _clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                sim.update_faults(stall=StallMode.DATA)  # keep the BTC watch pending
                await quiet(ex)
                btc = asyncio.ensure_future(ex.watch_ohlcv("BTC/USDT", "1m"))
                with pytest.raises(exc) as refused:
                    await asyncio.wait_for(ex.watch_ohlcv("ETH/USDT", "1m"), 5)
                assert type(refused.value) is exc and words in str(refused.value)
                sim.update_faults(stall=None, refuse=frozenset())
                if rejects_all:  # OKX's error event has no id: every watch is rejected
                    with pytest.raises(exc):
                        await asyncio.wait_for(btc, 5)
                else:
                    await asyncio.wait_for(btc, 5)
                before = sim.stats().subscribe_requests
                if resubscribes:
                    await watch_until(ex, "ETH/USDT", "1m", ANY)
                    assert sim.stats().subscribe_requests == before + 1
                else:  # ccxt still holds the refused subscription: no SUBSCRIBE is sent
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(ex.watch_ohlcv("ETH/USDT", "1m"), 0.3)
                    assert sim.stats().subscribe_requests == before
                    [client] = ex.clients.values()
                    await client.close()  # the way out: a new connection subscribes again
                    await watch_until(ex, "ETH/USDT", "1m", ANY)
        run(scenario())


# ------------------------------------------------------------- connection lifetime
EXPIRY_WORDS = {
    "binance": "Connection closed by remote server, closing code 1001",
    "okx": '"code":"64008"',  # OKX's service-upgrade notice, sent before it closes
    "bybit": "Connection closed by remote server, closing code 1001",
}


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_connections_expire_after_max_age_then_the_caller_reconnects(exchange: str) -> None:
    with stream_sim(exchange) as (sim, _clock):
        async def scenario() -> None:
            async with pro(exchange, sim) as ex:
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                waiting = await pending_watch(ex, sim)
                sim.update_rules(max_age_s=0.2)  # Binance: 24 h
                err = await outcome(waiting)
                assert type(err) is ccxt.NetworkError and EXPIRY_WORDS[exchange] in str(err)
                sim.update_rules(max_age_s=None)
                sim.update_faults(stall=None)
                # OKX's notice arrives while the socket is open: a watch made before the
                # close lands would be rejected again (1001); wait for ccxt to drop it
                await until(lambda: not ex.clients)
                await watch_until(ex, "BTC/USDT", "1m", ANY)
                assert sim.stats().connections >= 2
        run(scenario())
        assert sim.stats().faults[StreamFault.EXPIRE] >= 1
