"""Ingestion benchmark: backfill speed against a rate-limited exchange, and storage throughput.

    python bench/ingest.py --exchange NAME|all [--symbols N] [--candles N] [--results bench/RESULTS.md]
    python bench/ingest.py [--rate 20] [--candles 30000] [--symbols 3] [--rows 300000]

With `--exchange` (binance okx bybit kraken coinbase kucoin oanda, or all): a backfill at the exchange's
own budget against a simulated exchange enforcing its documented limits, time / ideal, rate-limit
answers and exactness (see bench/budget_bench.py); `--results` writes its section of RESULTS.md.

Without it:
1. Backfill: the local exchange admits at most R requests/s (more get 429); the daemon is
   configured to R. Reports time / ideal (requests needed / R) and 429s, and the same backfill
   by a plain loop of ccxt `fetch_ohlcv` with ccxt's own rate limiter, as a user would write it,
   in the same run.
2. Storage: candles/s upserted by `Store.upsert` in the storage actor's batches, and through the
   storage actor itself, against raw `sqlite3.executemany` in one transaction as the ceiling.

Last line on stdout: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import tempfile
import threading
import time
from typing import Any

import budget_bench
import ccxt
import structlog
from results import command_line

from candlekeeper.actors.messages import Write, Written
from candlekeeper.actors.storage import StorageActor
from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.ccxt_client import make_client
from candlekeeper.simulator.faults import Faults
from candlekeeper.simulator.server import BinanceSimulator, synthetic_symbols
from candlekeeper.supervisors.child import Child, Runtime
from candlekeeper.supervisors.supervisor import ChildSpec, start_root

TF = 60_000


def history_start(candles: int) -> int:
    return (int(time.time() * 1000) // TF) * TF - candles * TF


def bench_daemon(rate: int, candles: int, symbols: list[str]) -> dict[str, Any]:
    start = history_start(candles)
    with tempfile.TemporaryDirectory() as d, BinanceSimulator(
        symbols, history_start_ms=start, faults=Faults(rate_limit_per_s=rate)
    ) as sim:
        cfg = config_mod.from_dict(
            {
                "storage": {"path": os.path.join(d, "bench.db")},
                "exchanges": {
                    "sim": {
                        "exchange": "binance",
                        "symbols": symbols,
                        "api_base": sim.url,
                        "rate_limit": rate,
                        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start / 1000)),
                    }
                },
            }
        )
        t0 = time.perf_counter()
        system = System(cfg).start()
        try:
            target = {s: start + (candles - 1) * TF for s in symbols}
            while True:
                series = {s["symbol"]: s for s in system.health()["series"]}
                if all(((series.get(s) or {}).get("last_ts") or 0) >= target[s] for s in symbols):
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
        finally:
            system.stop()
        stats = sim.stats()
        pages = math.ceil(candles / 1000)
        needed = 1 + pages * len(symbols)  # exchangeInfo + the klines pages
        ideal = needed / rate
        return {
            "seconds": elapsed,
            "ideal_seconds": ideal,
            "ratio": elapsed / ideal,
            "requests": stats.total,
            "requests_needed": needed,
            "http_429": stats.http_429,
            "http_418": stats.http_418,
        }


def bench_plain_loop(rate: int, candles: int, symbols: list[str]) -> dict[str, Any]:
    """What a user writes: ccxt with its own rate limiter, a loop, a sleep on errors."""
    start = history_start(candles)
    with BinanceSimulator(symbols, history_start_ms=start, faults=Faults(rate_limit_per_s=rate)) as sim:
        client = make_client("binance", sim.url)
        client.enableRateLimit = True  # ccxt's own limiter, as shipped
        t0 = time.perf_counter()
        client.load_markets()
        rows = 0
        for symbol in symbols:
            since = start
            while True:
                try:
                    page = client.fetch_ohlcv(symbol, "1m", since=since, limit=1000)
                except ccxt.NetworkError:
                    time.sleep(1)
                    continue
                closed = [r for r in page if r[0] + TF <= time.time() * 1000]
                rows += len(closed)
                if len(closed) < 1000:
                    break
                since = closed[-1][0] + TF
        elapsed = time.perf_counter() - t0
        stats = sim.stats()
        return {"seconds": elapsed, "requests": stats.total, "http_429": stats.http_429, "rows": rows}


def make_rows(n: int) -> list[tuple[Any, ...]]:
    t0 = 1_600_000_000_000
    return [("bench", f"S{i % 10}/USDT", "1m", t0 + (i // 10) * TF, 1.0, 2.0, 0.5, 1.5, 10.0) for i in range(n)]


def bench_storage(n: int) -> dict[str, float]:
    rows = make_rows(n)
    batch = 1000
    with tempfile.TemporaryDirectory() as d:
        # ceiling: raw executemany, one transaction, same table
        raw_path = os.path.join(d, "raw.db")
        Store(raw_path).open().close()  # same schema and pragmas
        conn = sqlite3.connect(raw_path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO candles VALUES (?,?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
        raw = n / (time.perf_counter() - t0)
        conn.close()

        store = Store(os.path.join(d, "store.db")).open()
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            store.upsert(rows[i : i + batch])
        upsert = n / (time.perf_counter() - t0)
        store.close()

        actor_rate = bench_storage_actor(os.path.join(d, "actor.db"), rows, batch)
    return {"raw_per_s": raw, "store_per_s": upsert, "actor_per_s": actor_rate}


class _Acker(Child):
    def __init__(self, expected: int, done: threading.Event) -> None:
        super().__init__()
        self.left = expected
        self.done = done

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Written):
            self.left -= 1
            if self.left == 0:
                self.done.set()
        return None


def bench_storage_actor(path: str, rows: list[tuple[Any, ...]], batch: int) -> float:
    """Writes told to the storage actor as series do (one Write per page), until every ack."""
    runtime = Runtime()
    runtime.start()
    done = threading.Event()
    writes = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    ref, _ = start_root(runtime, [ChildSpec("storage", StorageActor, args=(path,)),
                                  ChildSpec("acker", _Acker, args=(len(writes), done))])
    storage = ref.proxy().child_ref("storage").get()
    acker = ref.proxy().child_ref("acker").get()
    try:
        t0 = time.perf_counter()
        for i, chunk in enumerate(writes):
            storage.tell(Write(rows=tuple(chunk), gaps=(), token=i, reply_to=acker))
        done.wait(300)
        return len(rows) / (time.perf_counter() - t0)
    finally:
        ref.stop()
        runtime.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchange", default=None, help="one dialect's budget backfill, or all of them")
    parser.add_argument("--results", default=None, help="with --exchange: write the section into this file")
    parser.add_argument("--page-limit", type=int, default=None, help="with --exchange: the daemon's page_limit")
    parser.add_argument("--rate", type=int, default=20, help="exchange limit and daemon rate_limit, requests/s")
    parser.add_argument("--candles", type=int, default=None, help="candles per symbol to backfill (30000)")
    parser.add_argument("--symbols", type=int, default=None, help="symbols (3)")
    parser.add_argument("--rows", type=int, default=300_000, help="rows for the storage benchmark")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-symbols", default="", help=argparse.SUPPRESS)
    parser.add_argument("--serve-start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-offset", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        budget_bench.serve(args.serve, args.serve_symbols.split(","), args.serve_start, args.serve_offset)
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    if args.exchange:
        exchanges(args)
        return
    args.candles = 30_000 if args.candles is None else args.candles
    symbols = synthetic_symbols(3 if args.symbols is None else args.symbols)

    daemon = bench_daemon(args.rate, args.candles, symbols)
    print(f"daemon backfill: {daemon['seconds']:.2f} s, ideal {daemon['ideal_seconds']:.2f} s "
          f"(ratio {daemon['ratio']:.3f}), {daemon['requests']} requests, 429s: {daemon['http_429']}")
    plain = bench_plain_loop(args.rate, args.candles, symbols)
    print(f"plain ccxt loop: {plain['seconds']:.2f} s, {plain['requests']} requests, 429s: {plain['http_429']}")
    storage = bench_storage(args.rows)
    print(f"storage: raw executemany {storage['raw_per_s']:,.0f}/s, Store.upsert {storage['store_per_s']:,.0f}/s "
          f"({storage['store_per_s'] / storage['raw_per_s']:.0%}), through the actor {storage['actor_per_s']:,.0f}/s "
          f"({storage['actor_per_s'] / storage['raw_per_s']:.0%})")
    print(json.dumps({
        "rate": args.rate,
        "candles_per_symbol": args.candles,
        "symbols": args.symbols,
        "backfill_s": round(daemon["seconds"], 3),
        "backfill_ideal_s": round(daemon["ideal_seconds"], 3),
        "backfill_ratio": round(daemon["ratio"], 3),
        "daemon_429s": daemon["http_429"],
        "daemon_requests": daemon["requests"],
        "plain_loop_s": round(plain["seconds"], 3),
        "plain_loop_429s": plain["http_429"],
        "daemon_over_plain_speedup": round(plain["seconds"] / daemon["seconds"], 2),
        "storage_raw_per_s": round(storage["raw_per_s"]),
        "storage_upsert_per_s": round(storage["store_per_s"]),
        "storage_actor_per_s": round(storage["actor_per_s"]),
        "storage_upsert_over_raw": round(storage["store_per_s"] / storage["raw_per_s"], 3),
        "storage_actor_over_raw": round(storage["actor_per_s"] / storage["raw_per_s"], 3),
    }))


def exchanges(args: argparse.Namespace) -> None:
    names = budget_bench.DIALECTS if args.exchange == "all" else (args.exchange,)
    results = []
    custom = args.symbols or args.candles or args.page_limit
    for name in names:
        for series, candles, page_limit in budget_bench.WORKLOADS[name][:1 if custom else None]:
            r = budget_bench.run(os.path.abspath(__file__), name, args.symbols or series, args.candles or candles,
                                 args.page_limit or page_limit)
            results.append(r)
            print(f"{name} (page {r['page']}): backfill {r['backfill_s']:.2f} s, ideal {r['ideal_s']:.2f} s "
                  f"(ratio {r['ratio']:.3f}), {r['requests']} requests ({r['requests_needed']} needed), "
                  f"rate-limited {r['rate_limited']}, exact {r['exact']}, daemon CPU {r['cpu_s']} s, "
                  f"simulator CPU {r['sim_cpu_s']} s", flush=True)
    if args.results:
        budget_bench.write_section(args.results, results, command_line("ingest.py"))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
