"""Scale benchmark: many series actors (default 10 exchanges x 1,000 symbols) in one process.

    python bench/scale.py [--exchanges 10] [--symbols 1000] [--minutes 3] [--rate-limit 100]
                          [--lookback 30] [--poll-interval 10] [--results bench/RESULTS.md | --no-results]

Quick run: `python bench/scale.py --exchanges 2 --symbols 50 --minutes 1 --no-results`.

The candlekeeper system runs in this process exactly as `candlekeeper.start(config_dict)` builds
it (control socket included); the simulated Binance exchanges run in a helper process (this
script with `--serve`), so their CPU, memory and threads are not counted as the daemon's. Each
simulated exchange admits at most `--rate-limit` requests per sliding second (429 beyond), and
the daemon is configured with the same `rate_limit`.

Measured, in this order:

1. Baseline (helper process, `--baseline N`): N bare `pykka.ThreadingActor`s started one by
   one (each answering an ask), the process RSS and thread count, then stopped one by one.
2. Start: `System.start()` until it returns, and that every series child is `running`.
3. Backfill: until every series has stored the candle that had closed when the run started
   (lookback `--lookback` minutes, one request per series); ideal = (1 + symbols) / rate_limit.
4. Keeping up: for `--minutes` consecutive minute closes after the backfill, each series' lag
   = time its newly closed candle was stored (a `subscribers` callback) - the candle's close;
   the fraction within poll_interval + 10 s (lag figures over the candles stored within 58 s;
   later ones count as missing), and the daemon's CPU per poll over those minutes (psutil, user +
   sys, divided by the klines requests the simulators served). Ideal worst lag under the limit:
   min(1, poll_interval) + symbols / rate_limit (the last series of an exchange in the queue).
5. `health()` asked every `--health-interval` s throughout: latency p50/p99/max while ingesting.
6. RSS (psutil, whole process: the daemon and this script's small recorders) and threads, after
   start, at the end, and the peak; then `System.stop()` time and threads left behind.

Last line on stdout: one JSON object with the figures. The scale section of bench/RESULTS.md
(between `<!-- scale:begin -->` and `<!-- scale:end -->`) is replaced with the results unless
`--no-results` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import psutil
import pykka
import structlog
from results import command_line, replace_section

from candlekeeper.actors.storage import StoredCandle
from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.faults import Faults
from candlekeeper.simulator.server import BinanceSimulator, synthetic_symbols
from candlekeeper.surfaces.control import ControlSurface

TF_MS = 60_000
HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"

# Targets (README of the issue): stated once, checked once.
TARGET_START_S = 60.0
TARGET_RSS_MB = 2048.0
TARGET_HEALTH_P99_S = 1.0
TARGET_STOP_S = 60.0
TARGET_KEEP_UP = 0.99


# -- helper processes ------------------------------------------------------------------------


class _Bare(pykka.ThreadingActor):
    use_daemon_thread = True  # as `supervisors.Child` (non-daemon threads cost O(n) each to start)

    def on_receive(self, message: Any) -> Any:
        return message


def run_baseline(n: int) -> None:
    """`--baseline N`: bare pykka actors started, measured and stopped one by one; prints JSON."""
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    refs = [_Bare.start() for _ in range(n)]
    for ref in refs:
        ref.ask("ping")
    start_s = time.perf_counter() - t0
    rss = proc.memory_info().rss
    threads = proc.num_threads()
    t0 = time.perf_counter()
    for ref in reversed(refs):
        ref.stop(block=True)
    stop_s = time.perf_counter() - t0
    print(json.dumps({"actors": n, "start_s": start_s, "stop_s": stop_s, "rss_mb": rss / 2**20,
                      "rss_growth_mb": (rss - rss0) / 2**20, "threads": threads}), flush=True)


def run_servers(exchanges: int, symbols: int, rate: int | None) -> None:
    """`--serve`: the simulated exchanges. Prints their URLs as one JSON line, then answers
    `stats` lines on stdin with one JSON line each; stops on `quit` or end of input."""
    logging.basicConfig(level=logging.WARNING)
    names = synthetic_symbols(symbols)
    sims = [
        BinanceSimulator(names, name=f"sim{i:02d}", seed=i,
                         faults=Faults(rate_limit_per_s=rate) if rate else None).start()
        for i in range(exchanges)
    ]
    print(json.dumps({"urls": [s.url for s in sims]}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                snaps = [s.stats() for s in sims]
                print(json.dumps({
                    "requests": sum(s.total for s in snaps),
                    "klines": sum(s.by_path.get("/api/v3/klines", 0) for s in snaps),
                    "exchange_info": sum(s.by_path.get("/api/v3/exchangeInfo", 0) for s in snaps),
                    "http_429": sum(s.http_429 for s in snaps),
                    "http_418": sum(s.http_418 for s in snaps),
                    "errors": sum(n for s in snaps for st, n in s.by_status.items() if st is None or st >= 400),
                }), flush=True)
            elif line.strip() == "quit":
                break
    finally:
        for s in sims:
            s.stop()


class Servers:
    def __init__(self, exchanges: int, symbols: int, rate: int | None) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--exchanges", str(exchanges),
               "--symbols", str(symbols), "--server-rate", str(rate or 0)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process did not start")
        self.urls: list[str] = json.loads(line)["urls"]

    def stats(self) -> dict[str, int]:
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
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- in-process recorders -------------------------------------------------------------------


class Recorder:
    """A `subscribers` callable: when each candle from `since_ts` on was first stored (wall s)."""

    def __init__(self, since_ts: int) -> None:
        self.since_ts = since_ts
        self.arrivals: dict[tuple[str, str, int], float] = {}
        self.per_ts: Counter[int] = Counter()
        self.candles = 0

    def __call__(self, c: StoredCandle) -> None:
        self.candles += 1
        if c.ts >= self.since_ts:
            key = (c.exchange, c.symbol, c.ts)
            if key not in self.arrivals:
                self.arrivals[key] = time.time()
                self.per_ts[c.ts] += 1


class LogCounter:
    """structlog processor: counts warnings and errors by event and prints only the first few."""

    def __init__(self, shown: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.shown = shown

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        name = f"{method}:{event_dict.get('event')}"
        self.counts[name] += 1
        if self.counts[name] > self.shown:
            raise structlog.DropEvent
        return event_dict


class Monitor(threading.Thread):
    """Asks `health()` every `interval` s and samples RSS and threads, tagged with the phase."""

    def __init__(self, system: System, interval: float) -> None:
        super().__init__(name="scale-monitor", daemon=True)
        self.system = system
        self.interval = interval
        self.phase = "start"
        self.latencies: dict[str, list[float]] = {}
        self.failures = 0
        self.rss_peak = 0
        self.threads_peak = 0
        self.statuses: Counter[str] = Counter()
        self.worst: Counter[str] = Counter()  # the most series ever seen in each degrading status
        self._halt = threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            phase = self.phase
            t0 = time.perf_counter()
            try:
                report = self.system.health()
                ok = "error" not in report
            except Exception:  # noqa: BLE001 - a timeout is a figure, not a crash
                report, ok = {}, False
            latency = time.perf_counter() - t0
            if ok:
                self.latencies.setdefault(phase, []).append(latency)
                self.statuses = Counter(s["status"] for s in report.get("series", []))
                for status in ("retrying", "quarantined", "invalid", "stopped"):
                    self.worst[status] = max(self.worst[status], self.statuses[status])
            elif phase != "start":
                self.failures += 1
            self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
            self.threads_peak = max(self.threads_peak, self._proc.num_threads())

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- the run ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def baseline(n: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--baseline", str(n)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    n_series = args.exchanges * args.symbols
    window = args.poll_interval + 10.0
    print(f"baseline: {n_series} bare pykka actors in a fresh process ...", flush=True)
    base = baseline(n_series)
    print(f"  start {base['start_s']:.2f} s, RSS {base['rss_mb']:.0f} MB, threads {base['threads']}, "
          f"stop {base['stop_s']:.2f} s", flush=True)

    counter = LogCounter()
    structlog.configure(
        processors=[structlog.processors.add_log_level, counter, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    proc = psutil.Process()
    servers = Servers(args.exchanges, args.symbols, args.rate_limit)
    print(f"{args.exchanges} simulated exchanges x {args.symbols} symbols up", flush=True)
    symbols = synthetic_symbols(args.symbols)
    tmp = tempfile.TemporaryDirectory(prefix="ck-scale-", dir="/tmp")
    cfg = {
        "storage": {"path": os.path.join(tmp.name, "scale.db")},
        "control": {"socket": os.path.join(tmp.name, "ctl.sock")},
        "ingest": {"lookback": f"{args.lookback}m", "poll_interval": args.poll_interval},
        "exchanges": {
            f"sim{i:02d}": {"exchange": "binance", "symbols": symbols, "api_base": url,
                            "rate_limit": args.rate_limit, "timeout": "10s"}
            for i, url in enumerate(servers.urls)
        },
    }
    wall0 = time.time()
    target_ts = (int(wall0 * 1000) // TF_MS) * TF_MS - TF_MS  # the last candle closed at start
    recorder = Recorder(target_ts)
    # what `candlekeeper.start(cfg, subscribers=[recorder])` does, split so the monitor can
    # ask health() while the tree is still starting
    config = config_mod.from_dict(cfg)
    system = System(config, surfaces=[ControlSurface(config.control)], subscribers=[recorder])
    monitor = Monitor(system, args.health_interval)
    gc_rss0 = proc.memory_info().rss
    result: dict[str, Any] = {}
    stopped = False
    try:
        monitor.start()
        t0 = time.perf_counter()
        system.start()
        start_s = time.perf_counter() - t0
        running = 0
        for name in cfg["exchanges"]:
            rows = system._sup(name, "series").which_children().get(timeout=60)
            running += sum(1 for r in rows if r["state"] == "running")
        running_s = time.perf_counter() - t0
        rss_start = proc.memory_info().rss
        threads_start = proc.num_threads()
        print(f"start: {start_s:.2f} s, {running}/{n_series} series running, RSS {rss_start / 2**20:.0f} MB, "
              f"{threads_start} threads", flush=True)
        monitor.phase = "backfill"

        deadline = time.time() + args.backfill_timeout
        while recorder.per_ts[target_ts] < n_series and time.time() < deadline:
            time.sleep(0.1)
        done = [t for (_, _, ts), t in recorder.arrivals.items() if ts == target_ts]
        backfilled = len(done)
        backfill_end = max(done) if done else time.time()
        backfill_s = backfill_end - wall0
        ideal_backfill_s = (1 + args.symbols) / args.rate_limit
        print(f"backfill: {backfilled}/{n_series} series in {backfill_s:.2f} s (ideal {ideal_backfill_s:.2f} s)",
              flush=True)
        monitor.phase = "steady"
        rss_backfilled = proc.memory_info().rss

        first = (int(backfill_end) // 60 + 1) * 60  # the first minute close after the backfill
        boundaries = [first + 60 * k for k in range(args.minutes)]
        minutes_out = []
        snapshots = []  # simulator counters one minute apart, at the same phase of each minute
        for b in boundaries:
            while time.time() < b + 58:  # late arrivals too, so the lag figures are whole
                time.sleep(0.2)
            snapshots.append((servers.stats(), proc.cpu_times(), time.time()))
            ts = (b - 60) * 1000
            lags = [t - b for (_, _, cts), t in recorder.arrivals.items() if cts == ts]
            within = sum(1 for x in lags if x <= window)
            row = {
                "close": dt.datetime.fromtimestamp(b, dt.UTC).strftime("%H:%M:%S"),
                "stored": len(lags),
                "within_window": within,
                "fraction_within": round(within / n_series, 5),
                "lag_p50_s": r3(pct(lags, 0.5)),
                "lag_p99_s": r3(pct(lags, 0.99)),
                "lag_max_s": r3(max(lags) if lags else None),
            }
            minutes_out.append(row)
            print(f"minute closing {row['close']}: {within}/{n_series} within {window:.0f} s "
                  f"({within / n_series:.2%}); lag p50 {row['lag_p50_s']} s, p99 {row['lag_p99_s']} s, "
                  f"max {row['lag_max_s']} s", flush=True)
        stats1 = servers.stats()
        per_minute = cpu_per_poll = cpu_share = None
        if len(snapshots) >= 2:
            (s0, c0, w0), (s1, c1, w1) = snapshots[0], snapshots[-1]
            polls = s1["klines"] - s0["klines"]
            per_minute = polls / (len(snapshots) - 1) / n_series
            cpu = (c1.user + c1.system) - (c0.user + c0.system)
            cpu_per_poll = 1000 * cpu / max(1, polls)
            cpu_share = cpu / (w1 - w0)
        rss_end = proc.memory_info().rss
        threads_end = proc.num_threads()
        monitor.stop()

        t0 = time.perf_counter()
        system.stop()
        stop_s = time.perf_counter() - t0
        stopped = True
        time.sleep(0.5)
        left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        print(f"stop: {stop_s:.2f} s, threads left: {len(left)}", flush=True)

        lat_ingest = monitor.latencies.get("backfill", []) + monitor.latencies.get("steady", [])
        lat_steady = monitor.latencies.get("steady", [])
        worst_fraction = min((m["fraction_within"] for m in minutes_out), default=0.0)
        all_lags = [m["lag_max_s"] for m in minutes_out if m["lag_max_s"] is not None]
        result = {
            "exchanges": args.exchanges,
            "symbols": args.symbols,
            "series": n_series,
            "rate_limit": args.rate_limit,
            "poll_interval_s": args.poll_interval,
            "lookback_min": args.lookback,
            "start_s": r3(start_s),
            "running_s": r3(running_s),
            "series_running": running,
            "baseline_start_s": r3(base["start_s"]),
            "start_over_baseline": r3(start_s / base["start_s"]),
            "backfill_s": r3(backfill_s),
            "backfill_series_done": backfilled,
            "backfill_ideal_s": r3(ideal_backfill_s),
            "backfill_over_ideal": r3(backfill_s / ideal_backfill_s),
            "rss_mb_before": round(gc_rss0 / 2**20, 1),
            "rss_mb_after_start": round(rss_start / 2**20, 1),
            "rss_mb_after_backfill": round(rss_backfilled / 2**20, 1),
            "rss_mb_end": round(rss_end / 2**20, 1),
            "rss_mb_peak": round(max(monitor.rss_peak, rss_end) / 2**20, 1),
            "baseline_rss_mb": round(base["rss_mb"], 1),
            "threads_after_start": threads_start,
            "threads_end": threads_end,
            "threads_peak": max(monitor.threads_peak, threads_end),
            "baseline_threads": base["threads"],
            "health_asks": len(lat_ingest),
            "health_failures": monitor.failures,
            "health_p50_s": r3(pct(lat_ingest, 0.5)),
            "health_p99_s": r3(pct(lat_ingest, 0.99)),
            "health_max_s": r3(max(lat_ingest) if lat_ingest else None),
            "health_steady_p99_s": r3(pct(lat_steady, 0.99)),
            "keep_up_window_s": window,
            "minutes": minutes_out,
            "keep_up_worst_fraction": worst_fraction,
            "ideal_worst_lag_s": r3(min(1.0, args.poll_interval) + args.symbols / args.rate_limit),
            "lag_max_s": max(all_lags) if all_lags else None,
            "poll_requests_per_series_min": r3(per_minute),
            "steady_cpu_ms_per_poll": r3(cpu_per_poll),
            "steady_cpu_cores": r3(cpu_share),
            "http_429": stats1["http_429"],
            "http_418": stats1["http_418"],
            "requests": stats1["requests"],
            "stop_s": r3(stop_s),
            "baseline_stop_s": r3(base["stop_s"]),
            "stop_over_baseline": r3(stop_s / base["stop_s"]),
            "threads_left_after_stop": len(left),
            "series_status_end": dict(monitor.statuses),
            "series_degraded_max": {k: v for k, v in monitor.worst.items() if v},
            "warnings": dict(counter.counts.most_common(10)),
        }
    finally:
        if not stopped:
            monitor.stop()
            system.stop()
        servers.close()
        tmp.cleanup()
    return result


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "start": r["running_s"] < TARGET_START_S and r["series_running"] == r["series"],
        "rss": r["rss_mb_peak"] < TARGET_RSS_MB,
        "health": r["health_p99_s"] is not None and r["health_p99_s"] < TARGET_HEALTH_P99_S,
        "stop": r["stop_s"] < TARGET_STOP_S and r["threads_left_after_stop"] == 0,
        "keep_up": bool(r["minutes"]) and r["keep_up_worst_fraction"] >= TARGET_KEEP_UP,
        "before_next_close": bool(r["minutes"]) and min(m["stored"] for m in r["minutes"]) == r["series"],
    }


def section(r: dict[str, Any], command: str) -> str:
    v = verdicts(r)
    yes = {True: "yes", False: "**no**"}
    n = r["series"]
    mins = "; ".join(
        f"{m['close']}: {m['within_window']:,}/{n:,} within {r['keep_up_window_s']:g} s ({m['fraction_within']:.2%}), "
        f"{m['stored']:,} stored within 58 s, lag p50 {m['lag_p50_s']} s, p99 {m['lag_p99_s']} s, max {m['lag_max_s']} s"
        for m in r["minutes"]
    )
    misses = [k for k, ok in v.items() if not ok]
    if r["http_429"] + r["http_418"]:
        misses.append("no 429/418")
    lines = [
        BEGIN,
        f"## Scale: `{command}` ({dt.date.today().isoformat()})",
        "",
        f"{r['exchanges']} simulated Binance exchanges (one helper process) x {r['symbols']:,} symbols = "
        f"**{n:,} series actors** in one daemon process; `rate_limit = {r['rate_limit']:g}` per exchange "
        f"(the simulators enforce the same limit, 429 beyond it), `poll_interval = {r['poll_interval_s']:g}s`, "
        f"lookback {r['lookback_min']} min (one request per series).",
        "",
        "| figure | result | baseline (same run) | target | met |",
        "|---|---|---|---|---|",
        f"| start: `System.start()` returns with every series `running` | {r['running_s']:.2f} s "
        f"({r['series_running']:,}/{n:,}) | {n:,} bare pykka actors started one by one: {r['baseline_start_s']:.2f} s "
        f"({r['start_over_baseline']:.2f}x) | < {TARGET_START_S:g} s | {yes[v['start']]} |",
        f"| backfill of the lookback, every series | {r['backfill_s']:.2f} s ({r['backfill_series_done']:,}/{n:,}) "
        f"| ideal (1 + symbols) / rate_limit: {r['backfill_ideal_s']:.2f} s ({r['backfill_over_ideal']:.2f}x) | | |",
        f"| RSS, whole daemon process: after start / after backfill / end / peak | {r['rss_mb_after_start']:.0f} / "
        f"{r['rss_mb_after_backfill']:.0f} / {r['rss_mb_end']:.0f} / {r['rss_mb_peak']:.0f} MB | {n:,} bare pykka "
        f"actors (own process): {r['baseline_rss_mb']:.0f} MB | < {TARGET_RSS_MB:g} MB | {yes[v['rss']]} |",
        f"| threads after start / peak | {r['threads_after_start']:,} / {r['threads_peak']:,} | bare: "
        f"{r['baseline_threads']:,} | | |",
        f"| `health()` latency while ingesting, p50 / p99 / max ({r['health_asks']} asks, "
        f"{r['health_failures']} failed) | {r['health_p50_s']} / {r['health_p99_s']} / {r['health_max_s']} s | | "
        f"p99 < {TARGET_HEALTH_P99_S:g} s | {yes[v['health']]} |",
        f"| keeping up with 1m candles: series whose newly closed candle was stored before the next one "
        f"closed (within 58 s), worst minute | {min((m['stored'] for m in r['minutes']), default=0):,}/{n:,} | | "
        f"all | {yes[v['before_next_close']]} |",
        f"| keeping up promptly: series with each new closed candle stored within {r['keep_up_window_s']:g} s "
        f"(poll_interval + 10 s) of its close, worst minute | {r['keep_up_worst_fraction']:.2%} | ideal worst lag "
        f"under the limit, min(1, poll_interval) + symbols / rate_limit: {r['ideal_worst_lag_s']} s; measured max "
        f"{r['lag_max_s']} s | >= {TARGET_KEEP_UP:.0%} | {yes[v['keep_up']]} |",
        f"| klines requests per series per minute while polling | {r['poll_requests_per_series_min']} | ideal 1 | | |",
        f"| daemon CPU (user + sys) per poll while polling; cores used | {r['steady_cpu_ms_per_poll']} ms; "
        f"{r['steady_cpu_cores']} | one core (the GIL) allows 1000 / that polls per second | | |",
        f"| 429 / 418 answers received | {r['http_429']} / {r['http_418']} | | 0 | "
        f"{yes[r['http_429'] + r['http_418'] == 0]} |",
        f"| stop: `System.stop()` | {r['stop_s']:.2f} s, {r['threads_left_after_stop']} threads left | bare pykka "
        f"actors stopped one by one: {r['baseline_stop_s']:.2f} s ({r['stop_over_baseline']:.2f}x) | "
        f"< {TARGET_STOP_S:g} s | {yes[v['stop']]} |",
        "",
        f"Per minute close (lags over the candles stored within 58 s of their close): {mins}.",
        "",
        ("Every target is met." if not misses else f"**Targets missed: {', '.join(misses)}.**"),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=10)
    parser.add_argument("--symbols", type=int, default=1000, help="symbols per exchange")
    parser.add_argument("--minutes", type=int, default=3, help="minute closes measured after the backfill")
    parser.add_argument("--rate-limit", type=int, default=100, help="requests/s per exchange (daemon and simulator)")
    parser.add_argument("--lookback", type=int, default=30, help="minutes of backfill")
    parser.add_argument("--poll-interval", type=float, default=10.0, help="seconds")
    parser.add_argument("--health-interval", type=float, default=1.0, help="seconds between health() asks")
    parser.add_argument("--backfill-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true", help="do not touch bench/RESULTS.md")
    parser.add_argument("--baseline", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server-rate", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline is not None:
        run_baseline(args.baseline)
        return
    if args.serve:
        run_servers(args.exchanges, args.symbols, args.server_rate or None)
        return
    command = command_line("scale.py")
    result = run(args)
    if not args.no_results:
        replace_section(args.results, section(result, command), BEGIN, END)
    result["targets_met"] = verdicts(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
