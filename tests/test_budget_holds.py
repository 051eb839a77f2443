"""One ban or rate-limit answer stops every request to that exchange (every series, heartbeats and
market lists too) until its Retry-After (or, when the exchange says nothing, its window), and the
daemon backs off once: the answers to requests already in flight are the only others. Counted at
the simulated exchange, request by request."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import pytest
from structlog.testing import capture_logs

from candlekeeper.app.system import System
from candlekeeper.simulator.faults import FaultKind, Faults
from candlekeeper.simulator.server import ExchangeSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from tests.test_budgets import TF, assert_exact, complete, config, systems, wait_until  # noqa: F401 - fixture

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "DOGE/USDT", "ADA/USDT"]


class Log:
    """Every request the exchange saw: (monotonic time, path, status)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[float, str, int | None]] = []

    def __call__(self, path: str, params: Mapping[str, str], status: int | None, fault: FaultKind | None) -> None:
        with self.lock:
            self.seen.append((time.monotonic(), path, status))

    def count(self, path_part: str) -> int:
        with self.lock:
            return sum(1 for _, p, _ in self.seen if path_part in p)

    def first(self, status: int) -> float:
        with self.lock:
            return next(t for t, _, s in self.seen if s == status)

    def between(self, lo: float, hi: float) -> list[tuple[float, str, int | None]]:
        with self.lock:
            return [r for r in self.seen if lo <= r[0] < hi]


CASES = {
    # name: (dialect, candle path, how the stop is started, its status, hold in s)
    "binance ban (418 + Retry-After)": ("binance", "klines", "ban", 418, 3.0),
    "binance 429 + Retry-After": ("binance", "klines", "429", 429, 2.0),
    "okx 429 without Retry-After (its 2 s window)": ("okx", "candles", "429", 429, 2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.long
def test_one_stop_answer_holds_every_request_of_the_exchange(tmp_path, systems, case: str) -> None:
    dialect, candles, how, status, hold = CASES[case]
    clock = ShiftedClock.before_boundary(60.0, 45.0)  # no candle closes during the test
    start = (clock.ms() // TF) * TF - 4 * 3600_000
    log = Log()
    sim = ExchangeSimulator(SYMBOLS, dialect=dialect, catalogue=False, history_start_ms=start, now_ms=clock.ms,
                            faults=Faults(documented_limits=True, retry_after_s=int(hold)), on_request=log).start()
    try:
        cfg = config(tmp_path, sim, dialect, SYMBOLS, start, page_limit=20, heartbeat="1s")
        with capture_logs() as logs:
            systems.append(System(cfg, runtime=Runtime(wall=clock)).start())
            wait_until(lambda: log.count(candles) >= 20, 30, "the backfill under way")
            if how == "ban":
                sim.ban(hold)
            else:
                sim.update_faults(rates={FaultKind.HTTP_429: 1.0})
                wait_until(lambda: any(s == 429 for _, _, s in log.seen), 10, "a 429 served")
                sim.update_faults(rates={})  # one answer said stop: the next request would be served
            wait_until(lambda: complete(sim, cfg.storage.path, dialect, SYMBOLS, start), 60, "backfill")
        first = log.first(status)
        stopped = [r for r in log.seen if r[2] == status]
        # only requests already in flight when the first answer came back were answered the same
        assert len(stopped) <= 16, stopped
        assert all(t < first + 0.5 for t, _, _ in stopped)
        # and nothing at all (no series, no heartbeat, no market list) until the hold was over
        during = log.between(first + 0.5, first + hold - 0.05)
        assert during == [], during
        assert log.between(first + hold - 0.05, first + hold + 5.0), "the daemon came back after the hold"
        warned = [e for e in logs if e["event"] == "rate_limited"]
        assert warned and warned[0]["hold_s"] == pytest.approx(hold, abs=0.01)
        assert {"exchange_left", "pace_tokens", "retry_after"} <= set(warned[0])  # what it believed
        for symbol in SYMBOLS:
            assert_exact(sim, cfg.storage.path, dialect, symbol, start)
    finally:
        sim.stop()
