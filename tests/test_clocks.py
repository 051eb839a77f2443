"""Clocks that disagree (issue 16, points 4 and 5), in process on the shared test clock.

- The exchange's clock 5 s behind ours, and no `Date` header: a candle is stored only when the
  exchange shows it closed (a later candle in its answer) or its clock, measured from its own
  server time, says so. Polled at the worst moments, just after each close by our clock (while
  the exchange is still inside that candle), over several closes: no open candle is ever stored.
- Our clock 60 s slow (the exchange's a minute ahead): its current candle looks like it is from
  the future; it is left out and everything closed is stored, exact. The offset is measured and
  shown in health (`clock_offset_ms`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from candlekeeper.actors.messages import StoredCandle
from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.faults import Faults
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from tests.test_ingest import TF, expected, make_config, stored, wait_until

SYMBOLS = ["BTC/USDT", "ETH/USDT"]


class Delivered:
    """Every candle as first stored (a subscriber gets a candle once, when it is new)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: dict[tuple[str, int], tuple[Any, ...]] = {}

    def __call__(self, c: StoredCandle) -> None:
        with self.lock:
            self.first.setdefault((c.symbol, c.ts), (c.ts, c.open, c.high, c.low, c.close, c.volume))

    def of(self, symbol: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [v for (s, _), v in sorted(self.first.items()) if s == symbol]


@pytest.fixture
def running() -> Iterator[Callable[..., System]]:
    systems: list[System] = []

    def start(cfg: config_mod.Config, wall: Callable[[], float], subscribers: list[Any] = ()) -> System:
        systems.append(System(cfg, runtime=Runtime(wall=wall), subscribers=subscribers).start())
        return systems[-1]

    yield start
    for system in systems:
        system.stop()


def offset_ms(system: System) -> float | None:
    return system.health()["exchanges"][0].get("clock_offset_ms")


def requests_answered(system: System) -> float:
    return sum(system.metrics.registry.get_sample_value(
        "candlekeeper_requests_total", {"exchange": "binance", "outcome": o}) or 0.0 for o in ("ok", "bad_response"))


def test_exchange_5s_behind_without_date_header_never_stores_an_open_candle(tmp_path, clock, running) -> None:
    start = (clock.ms() // TF) * TF - 3600_000
    sim = BinanceSimulator(SYMBOLS, history_start_ms=start, now_ms=clock.ms,
                           faults=Faults(clock_skew_ms=-5000, date_header=False)).start()
    try:
        delivered = Delivered()
        cfg = make_config(tmp_path, sim, start)
        db = cfg.storage.path
        system = running(cfg, clock, [delivered])
        # caught up by the exchange's clock
        wait_until(lambda: all(len(stored(db, s)) == len(expected(sim, s, start, (sim.now_ms() // TF) * TF))
                               for s in SYMBOLS), timeout=60, what="backfill")
        # several closes; at each, polls at 0.5, 2.5 and 4.5 s past it by our clock: the exchange
        # is still 4.5, 2.5 and 0.5 s inside the candle, whose close our clock says has passed
        for close in range(4):
            for past in (0.5, 2.5, 4.5):
                clock.offset += clock.until_boundary(60) + past if past == 0.5 else 2.0
                before = requests_answered(system)
                for symbol in SYMBOLS:
                    system.reset("binance", symbol)  # poll now
                wait_until(lambda b=before: requests_answered(system) >= b + len(SYMBOLS), timeout=20,
                           what=f"polls {past} s after close {close}")
                for symbol in SYMBOLS:
                    open_ts = (sim.now_ms() // TF) * TF
                    assert all(r[0] < open_ts for r in stored(db, symbol)), f"{symbol}: the open candle was stored"
        # the last candle closes on the exchange's clock too: every candle stored, exact, each as
        # first stored (a candle stored open would have been delivered with its in-progress values)
        clock.offset += 1.0
        for symbol in SYMBOLS:
            system.reset("binance", symbol)
        end = (sim.now_ms() // TF) * TF
        wait_until(lambda: all(len(stored(db, s)) == len(expected(sim, s, start, end)) for s in SYMBOLS),
                   timeout=20, what="the last closed candle")
        for symbol in SYMBOLS:
            want = expected(sim, symbol, start, end)
            assert stored(db, symbol) == want
            assert delivered.of(symbol) == want, f"{symbol}: a candle was first stored with other values"
        assert (system.metrics.registry.get_sample_value("candlekeeper_candles_corrected_total") or 0) == 0
        # measured from the exchange's server time (a heartbeat at start), as there is no Date header
        assert offset_ms(system) is not None and abs(offset_ms(system) + 5000) < 1500, offset_ms(system)
    finally:
        sim.stop()


def test_our_clock_60s_slow_stores_everything_exact_and_shows_the_offset(tmp_path, clock, running) -> None:
    ours = ShiftedClock(clock.offset - 60.0)  # the daemon's wall clock, a minute behind the exchange's
    start = (clock.ms() // TF) * TF - 3600_000
    sim = BinanceSimulator(SYMBOLS, history_start_ms=start, now_ms=clock.ms).start()
    try:
        cfg = make_config(tmp_path, sim, start)
        db = cfg.storage.path
        system = running(cfg, ours)
        end = (sim.now_ms() // TF) * TF  # the exchange's current candle opens here
        wait_until(lambda: all(len(stored(db, s)) >= len(expected(sim, s, start, end)) for s in SYMBOLS),
                   timeout=60, what="backfill up to the exchange's last closed candle")
        for symbol in SYMBOLS:
            rows = stored(db, symbol)
            assert rows == expected(sim, symbol, start, rows[-1][0] + TF)
            assert rows[-1][0] + TF <= sim.now_ms(), "an open candle was stored"
        wait_until(lambda: offset_ms(system) is not None and abs(offset_ms(system) - 60_000) < 1500, timeout=30,
                   what="the offset shown in health")
        report = system.health()
        assert all(s["status"] == "ok" for s in report["series"]), report["series"]
    finally:
        sim.stop()


def test_heartbeats_off_sends_none(tmp_path, clock, running) -> None:
    """`heartbeat = "off"`: the clock comes from the answers' Date headers alone."""
    start = (clock.ms() // TF) * TF - 3600_000
    sim = BinanceSimulator(SYMBOLS, history_start_ms=start, now_ms=clock.ms).start()
    try:
        cfg = make_config(tmp_path, sim, start, heartbeat="off")
        system = running(cfg, clock)
        end = (sim.now_ms() // TF) * TF
        wait_until(lambda: all(len(stored(cfg.storage.path, s)) == len(expected(sim, s, start, end)) for s in SYMBOLS),
                   timeout=30, what="backfill")
        assert offset_ms(system) is not None  # from the Date headers
        assert sim.stats().by_path.get("/api/v3/time", 0) == 0
    finally:
        sim.stop()
