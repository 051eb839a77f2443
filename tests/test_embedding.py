"""Embedding: `candlekeeper.start(dict)`, subscribe to stored candles, two systems at once, clean stop."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pykka
import pytest

import candlekeeper
from candlekeeper.actors.storage import StoredCandle
from candlekeeper.simulator.server import BinanceSimulator
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
        s1 = candlekeeper.start(config(d1, sim, ["BTC/USDT", "ETH/USDT"]), subscribers=[on_candle])
        s2 = candlekeeper.start(config(d2, sim, ["ETH/USDT"]), subscribers=[collector])
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


def refetch_newest(system: candlekeeper.System, db: str) -> int:
    """Lose the newest stored candle while its series is removed, then add the series back: it
    resumes from the store and stores that candle again. Returns its open time."""
    system.remove_series("binance", "BTC/USDT", "1m")
    with sqlite3.connect(db) as conn:
        newest = conn.execute("SELECT max(ts) FROM candles").fetchone()[0]
        conn.execute("DELETE FROM candles WHERE ts = ?", (newest,))
    system.add_series("binance", "BTC/USDT", "1m")
    return newest


def test_start_from_a_toml_path_subscribe_later_and_unsubscribe() -> None:
    start = (now_ms() // TF) * TF - 3600_000
    d = tempfile.mkdtemp(dir="/tmp")
    with BinanceSimulator(["BTC/USDT"], history_start_ms=start) as sim:
        toml = Path(d, "candlekeeper.toml")
        toml.write_text(f"""[storage]\npath = "{d}/candles.db"\n[control]\nsocket = "{d}/ctl.sock"\n"""
                        f"""[ingest]\nlookback = "30m"\npoll_interval = "1s"\n"""
                        f"""[exchanges.binance]\nsymbols = ["BTC/USDT"]\napi_base = "{sim.url}"\n""")
        system = candlekeeper.start(str(toml))
        try:
            wait_until(lambda: [s["status"] for s in system.health()["series"]] == ["ok"], what="caught up")
            # a subscriber added after start gets the candles stored from then on, each once
            got: list[StoredCandle] = []
            seen: list[StoredCandle] = []

            def on_candle(c: StoredCandle) -> None:
                got.append(c)

            def witness(c: StoredCandle) -> None:
                seen.append(c)

            system.subscribe(on_candle)
            system.subscribe(witness)
            newest = refetch_newest(system, f"{d}/candles.db")
            wait_until(lambda: newest in [c.ts for c in got], timeout=30, what="refetched candle delivered")
            assert len({c.ts for c in got}) == len(got)  # each once (a live candle may come too)
            # unsubscribed: the next refetched candle reaches the witness only
            system.unsubscribe(on_candle)
            delivered = len(got)
            newest = refetch_newest(system, f"{d}/candles.db")
            wait_until(lambda: newest in [c.ts for c in seen], timeout=30, what="refetched candle to the witness")
            assert len(got) == delivered
        finally:
            system.stop()
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.long(8)
def test_the_embedding_example_runs() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "embed.py"
    run = subprocess.run([sys.executable, str(example), "--candles", "5"], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "health: ok" in run.stdout and "received" in run.stdout, run.stdout
