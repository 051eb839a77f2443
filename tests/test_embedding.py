"""Embedding: `supervisors.start(dict)`, subscribe to stored candles, two systems at once, clean stop."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pykka

import supervisors
from actors.storage import StoredCandle
from simulator.server import BinanceSimulator
from tests.test_ingest import TF, now_ms, wait_until


def config(d: str, sim: BinanceSimulator, symbols: list[str]) -> dict:
    return {
        "storage": {"path": f"{d}/candles.db"},
        "control": {"socket": f"{d}/ctl.sock"},
        "ingest": {"lookback": "90m", "poll_interval": "2s"},
        "exchanges": {"binance": {"symbols": symbols, "api_base": sim.url, "rate_limit": 100, "timeout": "2s"}},
    }


def test_two_embedded_systems_subscribe_and_stop_cleanly() -> None:
    start = (now_ms() // TF) * TF - 3 * 3600_000
    d1, d2 = tempfile.mkdtemp(dir="/tmp"), tempfile.mkdtemp(dir="/tmp")
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        got1: list[StoredCandle] = []
        got2: list[StoredCandle] = []
        done1, done2 = threading.Event(), threading.Event()

        class Collector(pykka.ThreadingActor):  # an ActorRef subscriber, as an app might use
            def on_receive(self, message: object) -> None:
                got2.append(message)  # type: ignore[arg-type]
                if len(got2) >= 89:
                    done2.set()

        def on_candle(c: StoredCandle) -> None:
            got1.append(c)
            if len(got1) >= 2 * 89:
                done1.set()

        collector = Collector.start()
        s1 = supervisors.start(config(d1, sim, ["BTC/USDT", "ETH/USDT"]), subscribers=[on_candle])
        s2 = supervisors.start(config(d2, sim, ["ETH/USDT"]), subscribers=[collector])
        try:
            assert done1.wait(60) and done2.wait(60)
            # each candle exactly once, only closed ones, from the right system
            keys1 = [(c.symbol, c.ts) for c in got1]
            assert len(keys1) == len(set(keys1))
            assert {c.symbol for c in got1} == {"BTC/USDT", "ETH/USDT"} and {c.symbol for c in got2} == {"ETH/USDT"}
            assert all(c.ts + TF <= now_ms() for c in got1 + got2)
            expected = {tuple(c) for c in sim.expected_candles("ETH/USDT", "1m", got2[0].ts, got2[-1].ts + TF)}
            assert {(c.ts, c.open, c.high, c.low, c.close, c.volume) for c in got2} <= expected
            assert s1.health()["status"] == "ok" and len(s2.health()["series"]) == 1
            # run-time add through the API, and reset
            s2.add_series("binance", "BTC/USDT", "1m")
            wait_until(lambda: any(c.symbol == "BTC/USDT" for c in got2), what="added series delivering")
            assert s2.reset("binance")["series_reset"] == 2
        finally:
            s1.stop()
            s2.stop()
            collector.stop()
    assert Path(d1, "candles.db").exists() and not Path(d1, "ctl.sock").exists()
