"""Holes and gaps end to end: gaps the exchange genuinely has are recorded once and never
refetched; holes in the store (rows lost or deleted) are refetched on start, even when the
exchange cuts pages below `page_limit`; and an operator's reset jumps the exchange's queue."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import pykka

from candlekeeper.actors.exchange import ExchangeActor, ExchangeSettings
from candlekeeper.actors.messages import FetchRequest, FetchResult, SeriesKey
from candlekeeper.actors.sources.ccxt_source import CcxtSource
from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.resilience.breaker import CircuitBreaker
from candlekeeper.simulator.binance import KLINES_MAX_LIMIT
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import WallClock
from candlekeeper.supervisors.supervisor import ChildSpec, start_root
from tests.test_ingest import TF, assert_exact, complete, make_config, now_ms, running, stored, wait_until

__all__ = ["running"]  # the fixture, imported for the tests below

CANDLES = 1500  # more than one page of the exchange's maximum (1000)


def recorded_gaps(db: str) -> list[tuple[int, int]]:
    with Store(db, readonly=True) as store:
        return store.gaps("binance", "BTC/USDT", "1m")


def test_gaps_recorded_and_holes_refetched_past_the_exchange_page_cap(tmp_path, running, logs) -> None:
    start = (now_ms() // TF) * TF - CANDLES * TF
    genuine = [start + i * TF for i in (50, 51, 52, 53, 54, 1400)]
    with BinanceSimulator(["BTC/USDT"], history_start_ms=start, gaps={"BTC/USDT": genuine}) as sim:
        # page_limit above what the exchange serves: pages come back cut at 1000, not "full"
        cfg = make_config(tmp_path, sim, start, symbols=["BTC/USDT"], page_limit=KLINES_MAX_LIMIT + 500)
        db = cfg.storage.path
        system = running(cfg)
        wait_until(complete(system, db, sim, start, ["BTC/USDT"]), what="backfill")
        assert_exact(sim, db, "BTC/USDT", start)
        recorded = [(start + 50 * TF, start + 55 * TF), (start + 1400 * TF, start + 1401 * TF)]
        assert recorded_gaps(db) == recorded
        # the log line says when, in UTC, and why (not raw epoch-ms tuples)
        said = [g for e in logs.of("exchange_gaps_recorded") for g in e["gaps"]]
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((start + 50 * TF) / 1000))
        assert any(g.startswith(f"{iso} to ") and g.endswith("(exchange_hole)") for g in said), said
        system.stop()

        # rows lost: a hole of 1200 candles, more than the exchange serves in one page
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM candles WHERE ts >= ? AND ts < ?", (start + 100 * TF, start + 1300 * TF))
        assert len(stored(db, "BTC/USDT")) < CANDLES - 1000
        requests = sim.stats().total
        system = running(cfg)
        wait_until(complete(system, db, sim, start, ["BTC/USDT"]), what="hole refetched")
        assert_exact(sim, db, "BTC/USDT", start)
        assert recorded_gaps(db) == recorded  # nothing lost recorded as a gap
        assert sim.stats().total - requests <= 6  # markets, two pages of the hole, the tail: no loop


class _Inbox(pykka.ThreadingActor):
    """Stands in for series: records the order in which their answers come back."""

    def __init__(self, order: list[int], done: threading.Event, expect: int) -> None:
        super().__init__()
        self.order, self.done, self.expect = order, done, expect

    def on_receive(self, message: Any) -> None:
        if isinstance(message, FetchResult):
            assert message.error is None, message.error
            self.order.append(message.req_id)
            if len(self.order) == self.expect:
                self.done.set()


def test_a_reset_series_request_jumps_the_exchange_queue() -> None:
    symbols = ["AAA/USDT", "BBB/USDT", "CCC/USDT", "DDD/USDT"]
    with BinanceSimulator(symbols) as sim:
        runtime = Runtime()
        runtime.start()
        # 2 requests/s: the markets load takes the first token, the queue then drains one by one
        def source(wall: WallClock) -> CcxtSource:
            return CcxtSource("binance", symbols=symbols, timeout=5.0, wall=wall, api_base=sim.url)

        cfg = ExchangeSettings(name="binance", source=source, rate_limit=2, timeout=5.0, heartbeat=0)
        ref, _ = start_root(runtime, [ChildSpec("exchange", ExchangeActor, args=(cfg, CircuitBreaker()))])
        order: list[int] = []
        done = threading.Event()
        inbox = _Inbox.start(order, done, len(symbols))
        try:
            exchange = ref.proxy().child_ref("exchange").get()
            since = (now_ms() // TF) * TF - 10 * TF
            for i, symbol in enumerate(symbols):
                exchange.tell(FetchRequest(SeriesKey("binance", symbol, "1m"), since, 5, i, inbox,
                                           priority=(i == len(symbols) - 1)))
            assert done.wait(30), order
            assert order == [3, 0, 1, 2]  # the last told, with priority, is served first
        finally:
            inbox.stop()
            ref.stop()
            runtime.stop()
