"""The simulator's documented rate limits: counted for every client of a server together, in the
dialect's own headers, and enforced with the dialect's own rate-limit reply when asked to; an IP
ban; and what the daemon's source makes of a ban that does not say how long it lasts."""

from __future__ import annotations

import asyncio
import time

import ccxt
import pytest

from candlekeeper.actors.sources.base import SourceFailure
from candlekeeper.actors.sources.ccxt_source import CcxtSource
from candlekeeper.simulator.ccxt_client import make_client
from candlekeeper.simulator.faults import FaultKind, Faults
from candlekeeper.simulator.limits import Limit, Meters
from candlekeeper.simulator.server import ExchangeSimulator

MINUTE = 60_000


class Clock:
    def __init__(self, ms: int) -> None:
        self.now = ms

    def __call__(self) -> int:
        return self.now


def test_fixed_and_sliding_meters() -> None:
    meters = Meters()
    fixed, sliding = Limit("w", 10, 1_000), Limit("s", 3, 1_000, sliding=True)
    assert meters.try_charge([(fixed, 6)], 5_100) is None
    assert meters.try_charge([(fixed, 6)], 5_200) == pytest.approx(0.8)  # until the window's end
    assert meters.usage(fixed, 5_999) == (6, 6_000)
    assert meters.usage(fixed, 6_000) == (0, 7_000)
    for t in (0, 100, 400):
        assert meters.try_charge([(sliding, 1)], t) is None
    assert meters.try_charge([(sliding, 1)], 500) == pytest.approx(0.5)  # the oldest leaves at 1000
    assert meters.try_charge([(sliding, 1)], 1_000) is None
    # a request counted against two limits fits both or neither
    assert meters.try_charge([(fixed, 1), (sliding, 1)], 1_050) is not None
    assert meters.usage(fixed, 1_050)[0] == 0


def test_both_clients_count_in_one_window_of_the_binance_weight() -> None:
    clock = Clock(1_800_000_000_000 + 10_000)
    with ExchangeSimulator(["BTC/USDT"], dialect="binance", catalogue=False, now_ms=clock) as sim:
        a, b = make_client("binance", sim.url), make_client("binance", sim.url)
        a.publicGetExchangeInfo()
        b.publicGetKlines({"symbol": "BTCUSDT", "interval": "1m", "limit": 5})
        assert b.last_response_headers["x-mbx-used-weight-1m"] == "22"
        clock.now += MINUTE
        a.publicGetPing()
        assert a.last_response_headers["x-mbx-used-weight-1m"] == "1"  # a new minute


def test_the_documented_limit_is_enforced_with_the_dialects_own_reply() -> None:
    clock = Clock(1_800_000_000_000 + 15_000)  # 45 s before the minute ends
    with ExchangeSimulator(["BTC/USDT"], dialect="binance", catalogue=False, now_ms=clock,
                           faults=Faults(documented_limits=True)) as sim:
        client = make_client("binance", sim.url)
        for _ in range(300):
            client.publicGetExchangeInfo()  # 6000 weight
        with pytest.raises(ccxt.DDoSProtection):
            client.publicGetPing()
        assert client.last_response_headers["Retry-After"] == "45"
        assert client.last_response_headers["x-mbx-used-weight-1m"] == "6000"  # refused: not counted
        assert sim.stats().by_fault[FaultKind.RATE_LIMIT] == 1
        clock.now += 45_000
        client.publicGetPing()


def test_okx_limits_are_per_endpoint_and_sliding() -> None:
    clock = Clock(1_800_000_000_000)
    with ExchangeSimulator(["BTC/USDT"], dialect="okx", catalogue=False, now_ms=clock,
                           faults=Faults(documented_limits=True)) as sim:
        client = make_client("okx", sim.url)
        history = {"instId": "BTC-USDT", "bar": "1m", "limit": "5"}
        for _ in range(20):
            clock.now += 50
            client.publicGetMarketHistoryCandles(history)
        with pytest.raises(ccxt.RateLimitExceeded):
            client.publicGetMarketHistoryCandles(history)
        client.publicGetMarketCandles(history)  # another endpoint, another limit
        clock.now += 1_100  # 2 s after the first one: it left the window
        client.publicGetMarketHistoryCandles(history)


def test_a_ban_answers_everything_with_the_dialects_ban() -> None:
    with ExchangeSimulator(["BTC/USDT"], dialect="binance", catalogue=False) as sim:
        client = make_client("binance", sim.url)
        sim.ban(30)
        with pytest.raises(ccxt.DDoSProtection):
            client.publicGetPing()
        assert client.last_http_response is not None and int(client.last_response_headers["Retry-After"]) == 30
        assert sim.stats().http_418 == 1


def test_a_ban_that_says_nothing_lasts_as_long_as_the_exchange_documents() -> None:
    """Bybit's IP ban is a 403 "access too frequent" with no Retry-After: 10 minutes, its docs say."""
    with ExchangeSimulator(["BTC/USDT"], dialect="bybit", catalogue=False) as sim:
        async def run() -> SourceFailure:
            source = CcxtSource("bybit", symbols=["BTC/USDT"], timeout=5.0, wall=time.time, api_base=sim.url)
            try:
                await source.load_markets()
                sim.ban(30)
                try:
                    await source.heartbeat()
                except SourceFailure as failure:
                    return failure
                raise AssertionError("not banned")
            finally:
                await source.close()

        failure = asyncio.run(run())
    assert isinstance(failure.error, ccxt.RateLimitExceeded)
    assert failure.retry_after == 600.0
