"""Backfill at each exchange's own budget against its documented limit (`bench/ingest.py --exchange`).

The simulated exchange (its own dialect, in a helper process, as a remote exchange would be)
enforces the limits its exchange documents, answering beyond them with that exchange's own
rate-limit reply (`simulator.limits`). The daemon runs with no `rate_limit` and no `page_limit`
configured: the exchange's own budget and page size. Measured: backfill time / ideal, where ideal
is the requests a backfill needs at the exchange's page size over the documented rate (per limit
the requests count against: the slowest one), the rate-limit answers the exchange gave, and
whether the store holds exactly the exchange's candles.

OANDA (`source = "oanda"`) runs on a clock shifted into a trading week (its market closes at
weekends), and its ideal is at the 100 requests a second its best practices ask for, which is its
default budget (the hard limit, 120 a second, is what the simulated OANDA enforces).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

from results import replace_section

from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.faults import FaultKind, Faults
from candlekeeper.simulator.server import ExchangeSimulator, synthetic_symbols
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock

TF = 60_000
DIALECTS = ("binance", "okx", "bybit", "kraken", "coinbase", "kucoin", "oanda")
QUOTE = {"kraken": "USD", "coinbase": "USD", "oanda": "USD"}
OANDA_TOKEN, OANDA_TOKEN_ENV = "bench-token", "CK_BENCH_OANDA_TOKEN"
#: OANDA's own budget (its best practices); the simulated OANDA enforces its hard limit, 120/s
IDEAL_RATE = {"oanda": 100.0}
#: (series, 1m candles a series, page_limit): about 30 s of candle requests at the documented limit.
#: At the exchange's own page size (page_limit None), a page of 1000 candles costs the simulator
#: ~27 ms and the daemon ~12 ms of CPU: on a small machine Binance's 50 and Bybit's 120 pages a
#: second are more than both can make and parse, so those run again with pages of 100, which
#: measure the pacing alone.
WORKLOADS: dict[str, tuple[tuple[int, int, int | None], ...]] = {
    "binance": ((30, 49_500, None), (30, 4_950, 100)),  # 50 pages a series, 50 a second
    "okx": ((10, 8_850, None),),  # 30 pages of 300, 10 a second on history-candles
    "bybit": ((40, 14_500, None), (120, 2_950, 100)),  # 600 pages (5 s); 3600 pages of 100, 120 a second
    "kraken": ((25, 700, None),),  # within its 720-candle reach: one page a series, about 1 a second
    "coinbase": ((10, 8_850, None),),  # 30 pages of 300 (ccxt asks 300), 10 a second
    "kucoin": ((15, 65_000, None), (15, 6_550, 150)),  # 44 pages a series, 22 a second
    # a page of 5000 at 100 a second is half a million candles a second: only pages of 100
    "oanda": ((100, 2_950, 100),),  # 30 pages a series, 100 a second
}
#: what the source's market load requests (ccxt's calls, as the source makes them)
MARKET_PATHS: dict[str, tuple[str, ...]] = {
    "binance": ("/api/v3/exchangeInfo",),
    "okx": ("/api/v5/public/instruments",),
    "bybit": ("/v5/market/instruments-info",),
    "kraken": ("/0/public/AssetPairs",),
    "coinbase": ("/api/v3/brokerage/market/products", "/api/v3/brokerage/market/products"),  # spot, futures
    "kucoin": ("/api/v2/symbols",),
    "oanda": ("/v3/accounts", "/v3/accounts/instruments"),
}


def candle_path(dialect: str, symbol_id: str, since_ms: int, now_ms: int) -> str:
    """The path of the candle request ccxt makes for a page from `since_ms`."""
    if dialect == "okx":  # ccxt's own choice: history-candles beyond the last 1439 bars
        return "/api/v5/market/history-candles" if since_ms < now_ms - 1439 * TF else "/api/v5/market/candles"
    return {"binance": "/api/v3/klines", "bybit": "/v5/market/kline", "kraken": "/0/public/OHLC",
            "coinbase": f"/api/v3/brokerage/market/products/{symbol_id}/candles",
            "kucoin": "/api/v1/market/candles", "oanda": f"/v3/instruments/{symbol_id}/candles"}[dialect]


def trading_week_offset(dialect: str) -> float:
    """Seconds to shift the clock by so that now is a Wednesday noon (UTC) with the history before
    it in the same trading week (OANDA: the forex market closes at weekends); 0 elsewhere."""
    if dialect != "oanda":
        return 0.0
    now = time.time()
    day, week = 86_400, 7 * 86_400
    monday = (now - 4 * day) // week * week + 4 * day  # the epoch was a Thursday
    return monday + 2 * day + 12 * 3_600 - now


# -- the simulated exchange, in its own process ------------------------------------------------


def simulator(dialect: str, symbols: list[str], start_ms: int, offset_s: float) -> ExchangeSimulator:
    """The exchange (its clock shifted by `offset_s`), enforcing its documented limits."""
    return ExchangeSimulator(symbols, dialect=dialect, catalogue=False, history_start_ms=start_ms,
                             now_ms=lambda: int((time.time() + offset_s) * 1000),
                             dialect_options={"token": OANDA_TOKEN} if dialect == "oanda" else None,
                             faults=Faults(documented_limits=True))


def serve(dialect: str, symbols: list[str], start_ms: int, offset_s: float = 0.0) -> None:
    """`--serve`: the exchange, enforcing its documented limits. Prints its URL as one JSON line,
    then answers `stats` lines on stdin with one JSON line; stops at `quit` or end of input."""
    logging.basicConfig(level=logging.WARNING)
    sim = simulator(dialect, symbols, start_ms, offset_s).start()
    print(json.dumps({"url": sim.url}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                s = sim.stats()
                print(json.dumps({
                    "requests": s.total, "by_path": dict(s.by_path),
                    "rate_limited": s.by_fault.get(FaultKind.RATE_LIMIT, 0) + s.by_fault.get(FaultKind.BAN, 0),
                    "errors": sum(n for st, n in s.by_status.items() if st is None or st >= 400),
                    "cpu_s": sum(os.times()[:2]),
                }), flush=True)
            elif line.strip() == "quit":
                break
    finally:
        sim.stop()


class SimProcess:
    def __init__(self, script: str, dialect: str, symbols: list[str], start_ms: int, offset_s: float) -> None:
        cmd = [sys.executable, script, "--serve", dialect, "--serve-symbols", ",".join(symbols),
               "--serve-start", str(start_ms), "--serve-offset", repr(offset_s)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process did not start")
        self.url: str = json.loads(line)["url"]

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the ideal -----------------------------------------------------------------------------------


def needed_requests(oracle: ExchangeSimulator, dialect: str, symbols: list[str], start_ms: int, page: int,
                    now_ms: int) -> list[str]:
    """The paths of the fewest requests a backfill of every series from `start_ms` to `now_ms`
    can make: the market load, then pages of `page` candles (the last one holding the candle in
    progress; within Kraken's reach, one page a series)."""
    paths = list(MARKET_PATHS[dialect])
    first_open = (now_ms // TF) * TF  # the candle in progress
    for symbol in symbols:
        if dialect == "kraken":
            paths.append(candle_path(dialect, "", start_ms, now_ms))
            continue
        rows = (first_open - start_ms) // TF + 1
        for i in range(math.ceil(rows / page)):
            paths.append(candle_path(dialect, oracle.market_id(symbol), start_ms + i * page * TF, now_ms))
    return paths


def ideal_seconds(oracle: ExchangeSimulator, paths: list[str]) -> float:
    """The time `paths` take at the documented limits they count against (the slowest one)."""
    rate = IDEAL_RATE.get(oracle.dialect.name)
    if rate is not None:
        return len(paths) / rate
    units: dict[str, float] = {}
    per_s: dict[str, float] = {}
    for path in paths:
        for limit, cost in oracle.dialect.limits(path):
            units[limit.key] = units.get(limit.key, 0.0) + cost
            per_s[limit.key] = limit.limit / (limit.window_ms / 1000)
    return max(units[k] / per_s[k] for k in units)


# -- the baseline: a plain ccxt loop at the ideal pace ------------------------------------------


async def _plain_pages(dialect: str, url: str, pages: list[tuple[str, int]], page: int, rate: float) -> int:
    """Each (symbol, since) page fetched by a bare ccxt async client: requests leave at the ideal
    pace, one every 1 / rate s, from a few workers sharing one queue; a page answered with a
    rate-limit reply goes back into the queue and takes a later slot (retries never add to the
    pace). Returns how many answers were rate-limit answers."""
    import asyncio

    import ccxt.async_support as accxt

    from candlekeeper.actors.sources.urls import rebase_urls
    from candlekeeper.simulator.ccxt_client import SPOT_ONLY_OPTIONS

    client = getattr(accxt, dialect)({"enableRateLimit": False, "timeout": 30_000,
                                       "options": dict(SPOT_ONLY_OPTIONS.get(dialect, {}))})
    client.urls["api"] = rebase_urls(client.urls["api"], url)
    limited = 0
    try:
        loop = asyncio.get_running_loop()
        client.enableRateLimit = True  # the market load at ccxt's own pace (Kraken's two requests
        await client.load_markets()    # at once count as too many), the pages at the ideal one
        client.enableRateLimit = False
        queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        for p in pages:
            queue.put_nowait(p)
        slot = [loop.time()]

        async def worker() -> None:
            nonlocal limited
            while not queue.empty():
                symbol, since = queue.get_nowait()
                at, slot[0] = slot[0], max(slot[0], loop.time()) + 1.0 / rate
                await asyncio.sleep(max(0.0, at - loop.time()))
                try:
                    await client.fetch_ohlcv(symbol, "1m", since=since, limit=page)
                except (accxt.RateLimitExceeded, accxt.DDoSProtection):
                    limited += 1
                    queue.put_nowait((symbol, since))

        await asyncio.gather(*(worker() for _ in range(min(16, len(pages)))))
    finally:
        await client.close()
    return limited


def plain_ccxt(script: str, dialect: str, symbols: list[str], start_ms: int, page: int, now_ms: int,
               ideal_s: float) -> dict[str, Any] | None:
    """The same candle pages, from a fresh simulated exchange, by the plain loop at the ideal
    pace: how long this machine needs to ask for and parse them with ccxt alone, the baseline
    for the daemon's time (None for OANDA, which ccxt does not speak)."""
    import asyncio

    if dialect == "oanda":
        return None
    first_open = (now_ms // TF) * TF
    pages = [(sym, start_ms + i * page * TF) for sym in symbols
             for i in range(1 if dialect == "kraken" else math.ceil(((first_open - start_ms) // TF + 1) / page))]
    sim = SimProcess(script, dialect, symbols, start_ms, 0.0)
    try:
        t0 = time.perf_counter()
        limited = asyncio.run(_plain_pages(dialect, sim.url, pages, page, len(pages) / ideal_s))
        return {"seconds": round(time.perf_counter() - t0, 3), "requests": len(pages), "rate_limited": limited}
    finally:
        sim.close()


# -- the run ---------------------------------------------------------------------------------------


def stored(db: str, exchange: str, symbol: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT ts, open, high, low, close, volume FROM candles WHERE exchange=? AND symbol=?"
                            " AND timeframe='1m' ORDER BY ts", (exchange, symbol)).fetchall()
    finally:
        conn.close()


def run(script: str, dialect: str, series: int, candles: int, page_limit: int | None = None,
        timeout: float = 900.0) -> dict[str, Any]:
    symbols = synthetic_symbols(series, quote=QUOTE.get(dialect, "USDT"))
    offset = trading_week_offset(dialect)
    clock = ShiftedClock(offset)
    now = clock.ms()
    start_ms = (now // TF) * TF - candles * TF
    oracle = simulator(dialect, symbols, start_ms, offset)
    sim = SimProcess(script, dialect, symbols, start_ms, offset)
    source: dict[str, Any] = {"exchange": dialect}
    if dialect == "oanda":
        os.environ[OANDA_TOKEN_ENV] = OANDA_TOKEN
        source = {"source": "oanda", "token_env": OANDA_TOKEN_ENV}
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg = config_mod.from_dict({
                "storage": {"path": os.path.join(d, "bench.db")},
                "exchanges": {dialect: {
                    **source, "symbols": symbols, "api_base": sim.url, "timeout": "10s",
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start_ms / 1000)),
                    **({"page_limit": page_limit} if page_limit else {}),
                }},
            })
            sim_cpu0 = sim.stats()["cpu_s"]
            cpu0, t0 = os.times(), time.perf_counter()
            t0_ms = clock.ms()
            system = System(cfg, runtime=Runtime(wall=clock)).start()
            try:
                page = min(page_limit or 10**9, system_page_limit(system, dialect))
                target = (t0_ms // TF) * TF - TF  # the last candle closed when it started
                while True:
                    rows = {s["symbol"]: s.get("last_ts") or 0 for s in system.health()["series"]}
                    if all(rows.get(s, 0) >= target for s in symbols):
                        break
                    if time.perf_counter() - t0 > timeout:
                        raise RuntimeError(f"{dialect}: backfill not done in {timeout:g} s")
                    time.sleep(0.05)
                elapsed = time.perf_counter() - t0
                cpu1 = os.times()
                stats = sim.stats()
            finally:
                system.stop()
            exact, rows_stored = check_exact(oracle, cfg.storage.path, dialect, symbols, start_ms)
    finally:
        sim.close()
        oracle.stop()
    needed = needed_requests(oracle, dialect, symbols, start_ms, page, t0_ms)
    ideal = ideal_seconds(oracle, needed)
    candle_ideal = ideal * (len(needed) - len(MARKET_PATHS[dialect])) / len(needed)
    plain = plain_ccxt(script, dialect, symbols, start_ms, page, t0_ms, candle_ideal)
    candle_requests = sum(n for p, n in stats["by_path"].items() if "andle" in p or "kline" in p or "OHLC" in p)
    return {
        "exchange": dialect, "series": series, "candles_per_series": candles, "page": page,
        "page_limit": page_limit,
        "backfill_s": round(elapsed, 3), "ideal_s": round(ideal, 3), "ratio": round(elapsed / ideal, 3),
        "requests": stats["requests"], "requests_needed": len(needed), "candle_requests": candle_requests,
        "rate_limited": stats["rate_limited"], "errors": stats["errors"], "exact": exact, "rows": rows_stored,
        "cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
        "sim_cpu_s": round(stats["cpu_s"] - sim_cpu0, 2),
        "plain_s": None if plain is None else plain["seconds"],
        "vs_plain": None if plain is None else round(elapsed / plain["seconds"], 3),
    }


def system_page_limit(system: System, dialect: str) -> int:
    """The exchange's own maximum page size (its profile): the daemon's default."""
    if dialect == "oanda":
        from candlekeeper.actors.sources.oanda import PROFILE

        return PROFILE.page_limit
    import ccxt

    from candlekeeper.actors.sources.profiles import profile

    return profile(dialect, getattr(ccxt, dialect)()).page_limit


def check_exact(oracle: ExchangeSimulator, db: str, dialect: str, symbols: list[str], start_ms: int) -> tuple[bool, int]:
    """Every series holds exactly the exchange's closed candles from the start to its last row,
    and its last row is at most a minute behind the exchange."""
    total, ok = 0, True
    horizon = (oracle.now_ms() // TF) * TF
    for symbol in symbols:
        rows = stored(db, dialect, symbol)
        total += len(rows)
        if not rows:
            return False, total
        end = rows[-1][0] + TF
        want = [tuple(c) for c in oracle.expected_candles(symbol, "1m", start_ms, end)]
        if rows != want or end < horizon - 2 * TF:
            ok = False
    return ok, total


# -- RESULTS.md ---------------------------------------------------------------------------------

BEGIN, END = "<!-- exchanges:begin -->", "<!-- exchanges:end -->"


def write_section(path: str, results: list[dict[str, Any]], command: str) -> None:
    """Put the results between the section markers of `path` (added at the end the first time)."""
    lines = [
        BEGIN,
        f"## Every exchange at its own budget: `{command}` ({time.strftime('%Y-%m-%d')})",
        "",
        "Each simulated exchange enforces its documented limits (answering its own rate-limit reply",
        "beyond them) in a helper process; the daemon has no `rate_limit` or `page_limit`: the",
        "exchange's own budget and page size. Ideal: the fewest requests a backfill needs at that page",
        "size over the documented rate of the limit they count against.",
        "",
        "The baseline, in the same run: the same candle pages from a fresh simulated exchange by a bare",
        "ccxt async client, sent at the ideal pace (evenly spaced, all in flight at once): how long this",
        "machine takes to ask for and parse them at all, without the daemon.",
        "",
        "| exchange | series x candles | page | backfill / ideal | ratio (target <= 1.1) | plain ccxt loop | "
        "backfill / plain | requests (needed) | rate-limit answers (target 0) | exact | CPU: daemon / simulator |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        met = r["ratio"] <= 1.1 and r["rate_limited"] == 0 and r["exact"]
        ratio = f"{r['ratio']:.3f}" if met else f"**{r['ratio']:.3f}**"
        lines.append(
            f"| {r['exchange']} | {r['series']} x {r['candles_per_series']:,} "
            f"| {r['page']}{' (page_limit)' if r['page_limit'] else ''} "
            f"| {r['backfill_s']:.2f} s / {r['ideal_s']:.2f} s | {ratio} "
            f"| {'-' if r.get('plain_s') is None else format(r['plain_s'], '.2f') + ' s'} "
            f"| {'-' if r.get('vs_plain') is None else format(r['vs_plain'], '.3f')} "
            f"| {r['requests']} ({r['requests_needed']}) "
            f"| {r['rate_limited']} | {'yes' if r['exact'] else '**no**'} | {r['cpu_s']} s / {r['sim_cpu_s']} s |")
    lines.append(END)
    replace_section(path, "\n".join(lines), BEGIN, END)
