"""Rate budgets that follow each exchange: the cost of each request as ccxt charges it (in the
exchange's own unit), default budgets that are the exchanges' documented limits, and the
exchange's own counts keeping the daemon out of rate-limit answers when another client on the
same address eats most of the budget (the simulator counts both in one window).

The other client is this test itself: a plain ccxt client hammering the simulator."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ccxt
import pytest
from structlog.testing import capture_logs

from candlekeeper.actors.sources.ccxt_source import CcxtSource
from candlekeeper.actors.sources.profiles import BUDGETS
from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.ccxt_client import make_client
from candlekeeper.simulator.faults import FaultKind, Faults
from candlekeeper.simulator.server import ExchangeSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock

TF = 60_000
SYMBOL = {"binance": "BTC/USDT", "okx": "BTC/USDT", "bybit": "BTC/USDT", "kraken": "BTC/USD",
          "coinbase": "BTC/USD", "kucoin": "BTC/USDT"}
#: the path of a candle request in each dialect (OKX: its history endpoint, for backfills)
CANDLES = {"binance": "/api/v3/klines", "okx": "/api/v5/market/history-candles", "bybit": "/v5/market/kline",
           "kraken": "/0/public/OHLC", "coinbase": "/api/v3/brokerage/market/products/BTC-USD/candles",
           "kucoin": "/api/v1/market/candles"}


# -- what a request costs ---------------------------------------------------------------------


@pytest.mark.parametrize("dialect", sorted(SYMBOL))
def test_each_answer_costs_what_ccxt_charges_in_the_exchanges_unit(dialect: str) -> None:
    """The first guesses in BUDGETS are what ccxt charges (times the unit's scale): the learned
    costs never surprise the governor. OKX's two candle endpoints cost differently."""
    now = int(time.time() * 1000)
    symbol = SYMBOL[dialect]
    with ExchangeSimulator([symbol], dialect=dialect, history_start_ms=now - 3 * 86_400_000) as sim:
        async def run() -> dict[str, float | None]:
            source = CcxtSource(dialect, symbols=[symbol], timeout=5.0, wall=time.time, api_base=sim.url)
            try:
                await source.load_markets()
                old = await source.fetch_ohlcv(symbol, "1m", now - 2 * 86_400_000, 100, now - 2 * 86_400_000 + 100 * TF)
                recent = await source.fetch_ohlcv(symbol, "1m", now - 100 * TF, 100, None)
                beat = await source.heartbeat()
                return {"markets": source.markets_answer.cost, "old": old.answer.cost,
                        "recent": recent.answer.cost, "heartbeat": beat.cost}
            finally:
                await source.close()

        costs = asyncio.run(run())
    guess = BUDGETS[dialect].costs
    assert costs["markets"] == pytest.approx(guess["markets"])
    assert costs["heartbeat"] == pytest.approx(guess["heartbeat"])
    assert costs["old"] == pytest.approx(guess["ohlcv"])
    assert costs["recent"] == pytest.approx(0.5 if dialect == "okx" else guess["ohlcv"])


def documented_candle_rate(sim: ExchangeSimulator, path: str) -> float:
    """Candle requests a second the simulated exchange's documented limits allow."""
    return min(limit.limit / cost / (limit.window_ms / 1000) for limit, cost in sim.dialect.limits(path))


@pytest.mark.parametrize("dialect", sorted(SYMBOL))
def test_the_default_budget_is_the_exchanges_documented_limit(dialect: str) -> None:
    with ExchangeSimulator([SYMBOL[dialect]], dialect=dialect) as sim:
        source = CcxtSource(dialect, symbols=[SYMBOL[dialect]], timeout=5.0, wall=time.time, api_base=sim.url)
        documented = documented_candle_rate(sim, CANDLES[dialect])
    ours = source.profile.rate / source.profile.cost("ohlcv")
    if dialect == "kraken":
        # Kraken publishes no hard figure ("about one a second"); ccxt charges OHLC 1.2 s because
        # exactly one a second "triggers too many requests immediately": its margin is kept
        assert ours == pytest.approx(documented / 1.2)
    else:
        assert ours == pytest.approx(documented)


# -- the exchange's own counts ------------------------------------------------------------------


class Hammer(threading.Thread):
    """Another client on the same address, greedy: whenever the exchange's window has more than
    `leave` units left, it spends them (as fast as one plain ccxt client can); then it waits for
    the window to reset. Counts the rate-limit answers it gets itself."""

    def __init__(self, client: ccxt.Exchange, call: Callable[[ccxt.Exchange], Any], cost: float,
                 left_and_reset: Callable[[Any], tuple[float, float]], leave: float) -> None:
        super().__init__(daemon=True, name="hammer")
        self.client, self.call, self.cost = client, call, cost
        self.left_and_reset, self.leave = left_and_reset, leave
        self.limited = 0
        self.spent = 0.0
        self.done = threading.Event()
        self.first_burn = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.call(self.client)
            except (ccxt.RateLimitExceeded, ccxt.DDoSProtection):
                self.limited += 1
                self.done.wait(0.2)
                continue
            self.spent += self.cost
            left, reset_in = self.left_and_reset(self.client.last_response_headers)
            if left - self.cost < self.leave:
                self.first_burn.set()
                self.done.wait(max(0.0, reset_in) + 0.02)

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def binance_left(clock: ShiftedClock) -> Callable[[Any], tuple[float, float]]:
    def read(h: Any) -> tuple[float, float]:
        now = clock.ms()
        return 6000 - float(h["x-mbx-used-weight-1m"]), (60_000 - now % 60_000) / 1000
    return read


def bybit_left(h: Any) -> tuple[float, float]:
    return float(h["X-Bapi-Limit-Status"]), (int(h["X-Bapi-Limit-Reset-Timestamp"]) - int(h["Timenow"])) / 1000


def kucoin_left(h: Any) -> tuple[float, float]:
    return float(h["gw-ratelimit-remaining"]), int(h["gw-ratelimit-reset"]) / 1000


def stored(db: str, exchange: str, symbol: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT ts, open, high, low, close, volume FROM candles WHERE exchange=? AND symbol=?"
                            " AND timeframe='1m' ORDER BY ts", (exchange, symbol)).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def complete(sim: ExchangeSimulator, db: str, exchange: str, symbols: list[str], start: int) -> bool:
    horizon = (sim.now_ms() // TF) * TF
    return all(len(stored(db, exchange, s)) >= len(sim.expected_candles(s, "1m", start, horizon - TF))
               for s in symbols)


def assert_exact(sim: ExchangeSimulator, db: str, exchange: str, symbol: str, start: int) -> None:
    rows = stored(db, exchange, symbol)
    assert rows, f"nothing stored for {symbol}"
    end = rows[-1][0] + TF
    assert rows == [tuple(c) for c in sim.expected_candles(symbol, "1m", start, end)], symbol
    assert end >= (sim.now_ms() // TF) * TF - TF, "behind the last closed candle"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def config(tmp_path: Any, sim: ExchangeSimulator, dialect: str, symbols: list[str], since_ms: int,
           **exchange: Any) -> config_mod.Config:
    ex = {"exchange": dialect, "symbols": symbols, "api_base": sim.url, "timeout": "2s",
          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since_ms / 1000)), "poll_interval": "2s",
          "retry_base_delay": "50ms", "retry_max_delay": "500ms", **exchange}  # no rate_limit: the exchange's own
    return config_mod.from_dict({"storage": {"path": str(tmp_path / "candles.db")}, "exchanges": {dialect: ex}})


@pytest.fixture
def systems() -> Iterator[list[System]]:
    started: list[System] = []
    yield started
    for system in started:
        system.stop()


SHARED = {
    # dialect: (window of its count in s, the other client's call, its cost, what it leaves)
    "binance": (60, lambda c: c.publicGetExchangeInfo(), 20.0, 250.0),
    "bybit": (5, lambda c: c.publicGetV5MarketTime(), 1.0, 100.0),
    "kucoin": (30, lambda c: c.publicGetMarketAllTickers(), 15.0, 200.0),
}


@pytest.mark.parametrize("dialect", sorted(SHARED))
@pytest.mark.long
def test_a_second_client_eating_most_of_the_budget_never_pushes_the_daemon_into_rate_limits(
        tmp_path, systems, dialect: str) -> None:
    window_s, call, cost, leave = SHARED[dialect]
    # start a few seconds before the exchange's window resets: the daemon must hold for the rest
    clock = ShiftedClock.before_boundary(window_s, min(6.0, 0.8 * window_s))
    start = (clock.ms() // TF) * TF - 6 * 3600_000  # 36 pages of 10 a series: more than is left
    symbols = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    sim = ExchangeSimulator(symbols, dialect=dialect, catalogue=False, history_start_ms=start, now_ms=clock.ms,
                            faults=Faults(documented_limits=True)).start()
    left = {"binance": binance_left(clock), "bybit": bybit_left, "kucoin": kucoin_left}[dialect]
    hammer = Hammer(make_client(dialect, sim.url), call, cost, left, leave)
    try:
        hammer.start()
        assert hammer.first_burn.wait(10), "the other client did not get through the budget"
        cfg = config(tmp_path, sim, dialect, symbols, start, page_limit=5 if dialect == "bybit" else 10)
        with capture_logs() as logs:
            systems.append(System(cfg, runtime=Runtime(wall=clock)).start())
            wait_until(lambda: complete(sim, cfg.storage.path, dialect, symbols, start), 60, "backfill")
        hammer.stop()
        for symbol in symbols:
            assert_exact(sim, cfg.storage.path, dialect, symbol, start)
        served = sim.stats().by_fault.get(FaultKind.RATE_LIMIT, 0)
        limited = [e for e in logs if e["event"] == "rate_limited"]
        assert served - hammer.limited == 0, limited  # the daemon got none (the log says why if it did)
        assert any(e["event"] == "rate_budget_held" for e in logs), "the daemon never had to hold"
        limit = {"binance": 6000, "bybit": 600, "kucoin": 2000}[dialect]
        assert hammer.spent >= 0.8 * (limit - leave)  # it did eat most of a window
    finally:
        hammer.stop()
        sim.stop()
