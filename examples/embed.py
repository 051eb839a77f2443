"""Embedding candlekeeper in your own app: start it from a dict, get every new candle, stop it.

    python examples/embed.py                # against a local simulated exchange (no network)
    python examples/embed.py --real         # against Binance itself
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading

import candlekeeper
from candlekeeper.actors.storage import StoredCandle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="use the real Binance API")
    parser.add_argument("--candles", type=int, default=50, help="stop after this many new candles")
    args = parser.parse_args()

    exchange: dict[str, object] = {"symbols": ["BTC/USDT", "ETH/USDT"], "lookback": "2h"}
    sim = None
    if not args.real:
        from candlekeeper.simulator.server import BinanceSimulator

        sim = BinanceSimulator(["BTC/USDT", "ETH/USDT"]).start()
        exchange["api_base"] = sim.url

    workdir = tempfile.mkdtemp(prefix="ck-embed-")
    config = {
        "storage": {"path": os.path.join(workdir, "candles.db")},
        "control": {"socket": os.path.join(workdir, "ctl.sock")},
        "exchanges": {"binance": exchange},
    }
    received: list[StoredCandle] = []
    enough = threading.Event()

    def on_candle(candle: StoredCandle) -> None:  # runs on the storage actor's thread: keep it quick
        received.append(candle)
        if len(received) >= args.candles:
            enough.set()

    system = candlekeeper.start(config, subscribers=[on_candle])  # or later: system.subscribe(on_candle)
    try:
        enough.wait(120)
        health = system.health()
        last = received[-1] if received else None
        print(f"health: {health['status']}; received {len(received)} candles, last: {last}")
    finally:
        system.stop()
        if sim is not None:
            sim.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # an example keeps nothing; your app keeps its db


if __name__ == "__main__":
    main()
