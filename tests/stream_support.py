"""Live-stream test support: a REST simulator and a WebSocket simulator of the same exchange
sharing candles and the test's clock, a system streaming from them, and a way to move time.

Time: the system, both simulators and the test share one `ShiftedClock`. `to_close` moves it
forward to just before the next minute close, so a test sees many closes in seconds. The stream
follows a jump at once (the simulator pushes every close it owes); timers scheduled before a jump
keep their real delays, so a test jumps only while the exchange actor has no request out (an
answer that straddles a jump would skew the exchange clock it measures) and relies on what is
scheduled after the jump.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from candlekeeper.actors import stream as stream_mod
from candlekeeper.actors.sources import ccxt_stream
from candlekeeper.app import config as config_mod
from candlekeeper.app import settings as settings_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.server import ExchangeSimulator
from candlekeeper.simulator.ws import WsSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock

TF = 60_000
SYMBOLS = ["BTC/USDT", "ETH/USDT"]
PERIOD_S = 0.2  # the stream simulator's in-progress update period in these tests
IDLE_S = 1.5  # a connection with no frame for this long is stalled (the real ones: 10 s and more)
GRACE_S = 2.0  # a streamed series polls REST this long after a close its stream said nothing about (long
# enough for frames parsed late on a loaded machine: eight test workers on two cores)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """State owned by other threads: polled, with a generous deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def fast_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream timings shrunk for tests (the rules stay the exchanges' own otherwise)."""
    for name in ("binance", "okx", "bybit"):
        monkeypatch.setitem(ccxt_stream.PROFILES, name,
                            dataclasses.replace(ccxt_stream.PROFILES[name], idle_s=IDLE_S, connect_spacing_s=0.05))
    monkeypatch.setattr(settings_mod, "STREAM_GRACE_S", GRACE_S)
    monkeypatch.setattr(stream_mod, "WORD_DELAY_S", GRACE_S / 5)  # as 2 s is to the real 10 s grace


class Live:
    """One exchange's REST and stream simulators on the test's clock, and systems streaming them."""

    def __init__(self, exchange: str, clock: ShiftedClock, tmp: Any, *, symbols: list[str] | None = None,
                 hours: int = 2) -> None:
        self.exchange = exchange
        self.clock = clock
        self.symbols = symbols or list(SYMBOLS)
        self.start_ms = (clock.ms() // TF) * TF - hours * 3600_000
        self.db = str(tmp / "candles.db")
        self.rest = ExchangeSimulator(self.symbols, dialect=exchange, history_start_ms=self.start_ms,
                                      now_ms=clock.ms).start()
        self.ws = WsSimulator.sharing(self.rest, exchange, serve_markets=False, update_period_s=PERIOD_S,
                                      prompt_finals=True).start()
        self.ws.update_rules(max_connections_per_window=None)
        self.systems: list[System] = []
        self._owed: dict[tuple[str, int], int] = {}

    def config(self, **exchange: Any) -> config_mod.Config:
        ex = {
            "exchange": self.exchange,
            "symbols": self.symbols,
            "api_base": self.rest.url,
            "ws_url": self.ws.ws_base,
            "live": "websocket",
            "rate_limit": 200,
            "timeout": "2s",
            "heartbeat": "off",  # no request the test does not cause (see the module docstring)
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start_ms / 1000)),
            "poll_interval": "2s",
            "retry_base_delay": "50ms",
            "retry_max_delay": "500ms",
            "breaker_recovery": "1s",
            "stream_recovery": "1s",
            "stream_max_recovery": "1s",
        }
        ex.update(exchange)
        return config_mod.from_dict({"storage": {"path": self.db}, "exchanges": {self.exchange: ex}})

    def start(self, **exchange: Any) -> System:
        system = System(self.config(**exchange), runtime=Runtime(wall=self.clock, allow_crash_injection=True))
        self.systems.append(system.start())
        return system

    def close(self) -> None:
        for system in self.systems:
            system.stop()
        self.ws.stop()
        self.rest.stop()

    # -- the store ---------------------------------------------------------------------------------

    def stored(self, symbol: str) -> list[tuple[Any, ...]]:
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        except sqlite3.OperationalError:
            return []
        try:
            return conn.execute(
                "SELECT ts, open, high, low, close, volume FROM candles"
                " WHERE exchange=? AND symbol=? AND timeframe='1m' ORDER BY ts", (self.exchange, symbol),
            ).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def last(self, symbol: str) -> int | None:
        rows = self.stored(symbol)
        return rows[-1][0] if rows else None

    def expected(self, symbol: str, end: int) -> list[tuple[Any, ...]]:
        return [tuple(c) for c in self.rest.expected_candles(symbol, "1m", self.start_ms, end)]

    def closed_to(self) -> int:
        """Open time of the candle in progress now: every candle before it is closed."""
        return (self.clock.ms() // TF) * TF

    def complete(self) -> bool:
        """Every closed candle stored (counted, so a hole is not complete). Polled: the count
        the exchange owes is computed once per close."""
        end = self.closed_to()
        for s in self.symbols:
            if (s, end) not in self._owed:
                self._owed[(s, end)] = len(self.expected(s, end))
        return all(len(self.stored(s)) == self._owed[(s, end)] for s in self.symbols)

    def wait_complete(self, timeout: float = 30.0) -> None:
        wait_until(self.complete, timeout, what="every closed candle stored")

    def assert_exact(self) -> None:
        for symbol in self.symbols:
            rows = self.stored(symbol)
            assert rows, f"nothing stored for {symbol}"
            end = rows[-1][0] + TF
            assert end <= self.clock.ms(), "an open candle was stored"
            want = self.expected(symbol, end)
            diff = [(a, b) for a, b in zip(rows, want, strict=False) if a != b][:3]
            assert rows == want, f"{symbol}: the store differs from the exchange's history: {len(rows)} rows," \
                                 f" {len(want)} expected, first differences {diff}"

    # -- time --------------------------------------------------------------------------------------

    def to_close(self, system: System, lead: float = 0.3) -> int:
        """Move time to `lead` s before the next minute close (forward only, once the exchange
        actor has nothing in flight); returns the open time of the candle that closes then."""
        ref = system.blueprint.exchanges[self.exchange]
        wait_until(lambda: ref.proxy().status().get(timeout=5)["in_flight"] == 0, 20, "no request in flight")
        until = self.clock.until_boundary(60)
        if until > lead:
            self.clock.offset += until - lead
        self.ws.wake()
        return (self.clock.ms() // TF) * TF

    def next_candle(self, system: System, timeout: float = 15.0) -> int:
        """Jump to just before the next close and wait until every series stored that candle."""
        ts = self.to_close(system)
        wait_until(lambda: all((self.last(s) or 0) >= ts for s in self.symbols), timeout, f"candle {ts} stored")
        return ts


def series(system: System) -> dict[str, dict[str, Any]]:
    return {s["symbol"]: s for s in system.health()["series"]}


def sources(system: System) -> dict[str, str | None]:
    return {sym: s.get("source") for sym, s in series(system).items()}


def stream_row(system: System) -> dict[str, Any]:
    return system.health()["exchanges"][0].get("stream") or {}


def klines(sim: ExchangeSimulator) -> int:
    """Candle requests the REST simulator served."""
    return sum(n for path, n in sim.stats().by_path.items() if "kline" in path or "candle" in path)


@contextmanager
def live_exchange(exchange: str, clock: ShiftedClock, tmp: Any, **kwargs: Any) -> Iterator[Live]:
    live = Live(exchange, clock, tmp, **kwargs)
    try:
        yield live
    finally:
        live.close()
