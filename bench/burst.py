"""The REST burst at a close, 10,000 series polling: series actors on threads vs on the dispatcher.

    python bench/burst.py [--exchanges 10] [--symbols 1000] [--closes 2] [--results bench/RESULTS.md | --no-results]

At each minute's close every caught-up series asks its exchange for the candle that just closed:
10,000 requests at once, the same burst a stream outage puts on the REST fallback (bench/live.py's
forced disconnect). Measured here: from the close until every series' candle is stored, the
lag's median, the daemon's CPU per request (and how much of it the kernel's), its threads, and
how long `health()` takes to answer, quiet and during the burst.

Two daemons in one run, one after the other, same simulators (bench/live.py's: 10 Binance REST
simulators, `rate_limit = 100` each, so 1,000 requests a second is the ceiling, in a helper
process), same database: first the series each on its own thread (the baseline, `SeriesActor.pooled
= False`), then on the runtime's dispatcher (the default). The ratio of the two is the figure; the
machine is shared, so absolute times move from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from typing import Any

import psutil
from live import Recorder, Servers, config, next_close, pct, quiet_logs, r3, start_system, stop_system, wait_until
from results import command_line, replace_section

from candlekeeper.actors.series import SeriesActor

TF_MS = 60_000
HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- burst:begin -->", "<!-- burst:end -->"


def one_daemon(args: argparse.Namespace, servers: Servers, db: str, sock: str, pooled: bool) -> dict[str, Any]:
    SeriesActor.pooled = pooled
    n = args.exchanges * args.symbols
    recorder = Recorder()
    t0 = time.time()
    system = start_system(config(args, servers, db, sock, "rest"), recorder)
    try:
        # caught up: every series stored the candle in progress at the start once it closed (the
        # recorder sees this daemon's writes only; the second daemon resumes the first one's store)
        target = (int(t0 * 1000) // TF_MS) * TF_MS
        while recorder.count.get(target, 0) < n and time.time() - t0 < args.backfill_timeout:
            time.sleep(0.5)
        proc = psutil.Process()
        closes = []
        quiet: list[float] = []  # health() latency 45-50 s after a close, its burst over
        busy: list[float] = []  # during the burst: an ask a second (bench/scale.py's pace)
        for _ in range(args.closes):
            close = next_close(time.time() + 2)
            wait_until(close - 0.5)
            c0, k0 = proc.cpu_times(), servers.ask("stats")["klines"]
            ts = int(close * 1000) - TF_MS
            asked = close
            while recorder.count.get(ts, 0) < n and time.time() - close < 180:
                if time.time() >= asked:
                    busy.append(health_latency(system))
                    asked = time.time() + 1.0
                time.sleep(0.1)
            all_in = time.time() - close
            c1, k1 = proc.cpu_times(), servers.ask("stats")["klines"]
            cpu = (c1.user + c1.system) - (c0.user + c0.system)
            lags = recorder.lags(ts)
            row = {"stored": len(lags), "all_stored_s": round(all_in, 2), "lag_p50_s": r3(pct(lags, 0.5)),
                   "requests": k1 - k0, "cpu_ms_per_request": round(1000 * cpu / max(1, k1 - k0), 2),
                   "kernel_share": round((c1.system - c0.system) / max(cpu, 1e-9), 3),
                   "cores": round(cpu / (all_in + 0.5), 3)}
            print(f"[{'pooled' if pooled else 'threads'}] {row}", flush=True)
            closes.append(row)
            if time.time() < close + 45:
                wait_until(close + 45)
                while time.time() < close + 50:
                    quiet.append(health_latency(system))
                    time.sleep(0.5)
        return {"pooled": pooled, "threads": threading.active_count(),
                "health_quiet_p50_s": r3(pct(quiet, 0.5)), "health_quiet_max_s": r3(max(quiet, default=None)),
                "health_busy_p50_s": r3(pct(busy, 0.5)), "health_busy_max_s": r3(max(busy, default=None)),
                "health_asks": len(quiet) + len(busy),
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20), "closes": closes}
    finally:
        stop_system(system)


def health_latency(system: Any) -> float:
    t0 = time.perf_counter()
    system.health()
    return time.perf_counter() - t0


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def section(r: dict[str, Any], command: str) -> str:
    t, p = r["threads"], r["pooled"]

    def fig(key: str, digits: int = 2) -> tuple[str, str, str]:
        a, b = mean(t["closes"], key), mean(p["closes"], key)
        return f"{a:.{digits}f}", f"{b:.{digits}f}", f"{a / b:.2f}x" if b else "-"

    lines = [
        BEGIN,
        f"## REST burst at a close, series on threads vs on the dispatcher: `{command}` ({time.strftime('%Y-%m-%d')})",
        "",
        f"{r['exchanges']} simulated Binance exchanges x {r['symbols']:,} symbols = **{r['series']:,} series** polling "
        f"over REST in one daemon, `rate_limit = 100` per exchange (1,000 requests/s in all, enforced by the "
        f"simulators in a helper process). At each close every series asks for the candle that closed: the burst a "
        f"stream outage puts on the REST fallback. Both daemons in one run, same simulators and database; "
        f"figures are the mean of {len(p['closes'])} closes each.",
        "",
        "| figure | series on threads (baseline) | series on the dispatcher | baseline / dispatcher |",
        "|---|---|---|---|",
        "| close to every series' candle stored, s | {} | {} | {} |".format(*fig("all_stored_s")),
        "| lag p50, s | {} | {} | {} |".format(*fig("lag_p50_s")),
        "| daemon CPU per request, ms | {} | {} | {} |".format(*fig("cpu_ms_per_request")),
        "| of which in the kernel | {} | {} | |".format(*fig("kernel_share", 3)[:2]),
        "| daemon cores during the burst | {} | {} | |".format(*fig("cores", 3)[:2]),
        f"| `health()` latency 45-50 s after a close (its burst over), p50 / max, s | {t['health_quiet_p50_s']} / "
        f"{t['health_quiet_max_s']} | {p['health_quiet_p50_s']} / {p['health_quiet_max_s']} | |",
        f"| `health()` latency during the burst (an ask a second), p50 / max, s | {t['health_busy_p50_s']} / "
        f"{t['health_busy_max_s']} | {p['health_busy_p50_s']} / {p['health_busy_max_s']} | |",
        f"| threads in the daemon | {t['threads']:,} | {p['threads']:,} | |",
        f"| RSS after the run, MB | {t['rss_mb']:,} | {p['rss_mb']:,} | |",
        "",
        "Per close: threads " + "; ".join(f"{c['all_stored_s']} s, {c['cpu_ms_per_request']} ms/request"
                                          for c in t["closes"])
        + "; dispatcher " + "; ".join(f"{c['all_stored_s']} s, {c['cpu_ms_per_request']} ms/request" for c in p["closes"])
        + ". The RSS of the second daemon includes what the first left in this process.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=10)
    parser.add_argument("--symbols", type=int, default=1000, help="symbols per exchange")
    parser.add_argument("--closes", type=int, default=2, help="closes measured per daemon")
    parser.add_argument("--backfill-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args()
    args.rate_limit, args.lookback, args.poll_interval = 100, 3, 10.0
    quiet_logs()
    start_ms = (int(time.time() * 1000) // 86_400_000) * 86_400_000 - 86_400_000
    servers = Servers(args.exchanges, args.symbols, args.rate_limit, start_ms)
    tmp = tempfile.TemporaryDirectory(prefix="ck-burst-", dir="/tmp")
    try:
        db, sock = os.path.join(tmp.name, "burst.db"), os.path.join(tmp.name, "ctl.sock")
        result: dict[str, Any] = {"exchanges": args.exchanges, "symbols": args.symbols,
                                  "series": args.exchanges * args.symbols}
        result["threads"] = one_daemon(args, servers, db, sock, pooled=False)
        result["pooled"] = one_daemon(args, servers, db, sock, pooled=True)
    finally:
        SeriesActor.pooled = True
        servers.close()
        tmp.cleanup()
    if not args.no_results:
        replace_section(args.results, section(result, command_line("burst.py")), BEGIN, END,
                        after="<!-- live:end -->")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
