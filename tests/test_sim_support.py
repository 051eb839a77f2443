"""Shared helpers for the dialect tests (no tests here): a fake clock, a request log, and per
exchange facts (symbol, raw requests through ccxt's implicit API)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ccxt

from candlekeeper.simulator import ExchangeSimulator
from candlekeeper.simulator.ccxt_client import make_client, use_clock
from candlekeeper.simulator.history import align_down

MIN = 60_000
T0 = 1_700_006_430_123  # mid-candle "now" (2023-11-14 23:59:30 UTC, a Tuesday)
START = align_down(T0, "1h") - 3_600_000  # ~2 h of 1m history: inside Kraken's 720-bar reach
DIALECT_NAMES = ("binance", "okx", "bybit", "kraken", "coinbase", "kucoin")


class FakeClock:
    """The wall clock, advanced by hand."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Log:
    """Request-log hook; entries exist before the client sees the response (no sleeping)."""

    def __init__(self) -> None:
        self.entries: list[tuple] = []
        self.lock = threading.Lock()

    def __call__(self, path, params, status, fault) -> None:
        with self.lock:
            self.entries.append((path, dict(params), status, fault))

    def paths(self) -> list[str]:
        with self.lock:
            return [e[0] for e in self.entries]


@dataclass(frozen=True)
class Spec:
    """What the tests need to know about one dialect."""

    name: str
    quote: str  # main quote currency of its default list
    # a raw candle request for a market id the exchange does not list
    unknown: Callable[[ccxt.Exchange], object]

    @property
    def symbol(self) -> str:
        return f"BTC/{self.quote}"

    def sym(self, base: str) -> str:
        return f"{base}/{self.quote}"


SPECS: dict[str, Spec] = {
    "binance": Spec("binance", "USDT",
                    lambda e: e.publicGetKlines({"symbol": "NOPEUSDT", "interval": "1m"})),
    "okx": Spec("okx", "USDT",
                lambda e: e.publicGetMarketCandles({"instId": "NOPE-USDT", "bar": "1m"})),
    "bybit": Spec("bybit", "USDT", lambda e: e.publicGetV5MarketKline(
        {"category": "spot", "symbol": "NOPEUSDT", "interval": "1"})),
    "kraken": Spec("kraken", "USD",
                   lambda e: e.publicGetOHLC({"pair": "NOPEUSD", "interval": 1})),
    "coinbase": Spec("coinbase", "USD", lambda e: e.v3PublicGetBrokerageMarketProductsProductIdCandles(
        {"product_id": "NOPE-USD", "granularity": "ONE_MINUTE", "start": T0 // 1000 - 600,
         "end": T0 // 1000})),
    "kucoin": Spec("kucoin", "USDT",
                   lambda e: e.publicGetMarketCandles({"symbol": "NOPE-USDT", "type": "1min"})),
}


@contextmanager
def running(dialect: str, clock: FakeClock, **kwargs) -> Iterator[ExchangeSimulator]:
    kwargs.setdefault("history_start_ms", START)
    with ExchangeSimulator(dialect=dialect, now_ms=clock, **kwargs) as sim:
        yield sim


def client(sim: ExchangeSimulator, clock: Callable[[], int] | None = None, *,
           timeout_ms: int = 2000, **kwargs) -> ccxt.Exchange:
    """A real ccxt client on the simulator; `clock` makes it share the fake clock."""
    ex = make_client(sim.dialect.ccxt_id, sim.url, timeout_ms=timeout_ms, **kwargs)
    if clock is not None:
        use_clock(ex, clock)
    return ex


def walk(ex: ccxt.Exchange, symbol: str, since: int, now: int, limit: int,
         timeframe: str = "1m", max_pages: int = 100) -> tuple[list[list], int]:
    """Page forward from `since` the way a backfill does; returns (closed rows, pages)."""
    ms = ex.parse_timeframe(timeframe) * 1000
    got: list[list] = []
    for pages in range(1, max_pages + 1):
        page = ex.fetch_ohlcv(symbol, timeframe, since=since, limit=limit)
        closed = [r for r in page if r[0] + ms <= now]
        got += closed
        if not page or len(closed) < len(page) or page[-1][0] + ms >= now:
            return got, pages
        since = page[-1][0] + ms
    raise AssertionError("walk did not finish")
