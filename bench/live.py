"""Live candles over WebSocket at scale: 10,000 series in one process, streamed vs polled.

    python bench/live.py [--exchanges 10] [--symbols 1000] [--minutes 3] [--rest-minutes 2]
                         [--outage 30] [--rate-limit 100] [--results bench/RESULTS.md | --no-results]

Quick run: `python bench/live.py --exchanges 2 --symbols 50 --minutes 1 --rest-minutes 1 --no-results`.

The simulated exchanges are bench/scale.py's (10 Binance REST simulators, `--rate-limit` requests
a second each, 429 beyond), each with a Binance WebSocket simulator sharing its candles and clock,
pushing each kline stream's candle in progress every 2 s (Binance's documented pace) and its final
at the close; all of them in a helper process (this script with `--serve`), so their CPU is not
counted as the daemon's. The daemon runs in this process as `candlekeeper.start` builds it.

Measured, in this order, in one run:

1. Polling (the REST baseline): the daemon with `live = "rest"` (bench/scale.py's setup) for
   `--rest-minutes` minute closes: close-to-stored lag, candles stored within 2 s of their close,
   daemon CPU in cores, REST requests a minute.
2. Streaming: the same daemon and database with `live = "websocket"` (and `ws_url`), once every
   series takes its candles from the stream, for `--minutes` minute closes: the same figures.
3. A forced disconnect: every stream connection dropped and refused (HTTP 503 at the upgrade)
   for `--outage` seconds, starting 20 s before a close. Meanwhile the series poll over REST. Once
   every exchange has its connection open again (the reconnect, as the simulators count it), how
   long until the store holds every closed candle exactly: when the last candle of the window
   was first stored, the store then compared with the simulators' history (computed here the
   same way); with a timeline of that close's REST requests and writes.

Probes (on this process's own objects, for the per-minute lines): when the stream's loop thread
read each candle's final frame, so a close's lag splits into the final's arrival and the store;
the garbage collector's pauses over 50 ms near each close; writes reaching the storage actor.

REST requests while streaming: those measured over the streaming minutes (an exchange actor's
heartbeat, every 30 s it sends nothing else), and the audit's share, computed: each streamed series
re-reads its recent candles every `AUDIT_INTERVAL_S` (2 h), first 2-4 h after it starts, so no
audit falls in a run of minutes; while audits run (one every few seconds per exchange), the
exchange actors send no heartbeats. The target is checked on the larger of the two.

Lag = time the candle was first stored (a `subscribers` callback on the storage thread) - its
close. Last line on stdout: one JSON object. The live section of bench/RESULTS.md (between
`<!-- live:begin -->` and `<!-- live:end -->`) is replaced unless `--no-results`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import structlog
from results import command_line, replace_section

from candlekeeper.actors.storage import StoredCandle
from candlekeeper.app import config as config_mod
from candlekeeper.app.settings import AUDIT_INTERVAL_S
from candlekeeper.app.system import System
from candlekeeper.simulator.faults import Faults
from candlekeeper.simulator.history import CandleHistory
from candlekeeper.simulator.server import BinanceSimulator, synthetic_symbols
from candlekeeper.simulator.ws import WsSimulator

TF_MS = 60_000
HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- live:begin -->", "<!-- live:end -->"
WITHIN_S = 2.0
UPDATE_PERIOD_S = 2.0  # Binance: "Update Speed: 2000ms" for kline streams

# Targets (the issue): stated once, checked once.
TARGET_WITHIN = 0.99  # share of candles stored within 2 s of their close
TARGET_CORES = 0.5
TARGET_REST_SHARE = 0.01  # REST requests while streaming, of what polling spends
TARGET_GAP_S = 10.0  # gap filled exactly within this of reconnecting


# -- the helper process ---------------------------------------------------------------------


def run_servers(exchanges: int, symbols: int, rate: int | None, start_ms: int) -> None:
    """`--serve`: REST + WebSocket simulators. Prints their URLs as one JSON line, then answers
    `stats`, `outage`, `restore` lines on stdin with one JSON line each; stops on `quit`."""
    logging.basicConfig(level=logging.WARNING)
    names = synthetic_symbols(symbols)
    rests = [BinanceSimulator(names, name=f"sim{i:02d}", seed=i, history_start_ms=start_ms,
                              faults=Faults(rate_limit_per_s=rate) if rate else None).start()
             for i in range(exchanges)]
    wss = [WsSimulator.sharing(r, "binance", serve_markets=False, update_period_s=UPDATE_PERIOD_S,
                               prompt_finals=True).start() for r in rests]
    print(json.dumps({"urls": [r.url for r in rests], "ws": [w.ws_base for w in wss]}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stats":
                snaps = [r.stats() for r in rests]
                ws = [w.stats() for w in wss]
                print(json.dumps({
                    "requests": sum(s.total for s in snaps),
                    "klines": sum(s.by_path.get("/api/v3/klines", 0) for s in snaps),
                    "http_429": sum(s.http_429 for s in snaps),
                    "ws_updates": sum(s.updates for s in ws),
                    "ws_finals": sum(s.finals for s in ws),
                    "ws_connections": sum(s.connections for s in ws),
                    "ws_open": sum(s.open_connections for s in ws),
                }), flush=True)
            elif cmd == "outage":
                for w in wss:
                    w.update_faults(handshake_status=503)
                dropped = sum(w.drop_connections() for w in wss)
                print(json.dumps({"dropped": dropped}), flush=True)
            elif cmd == "restore":
                for w in wss:
                    w.update_faults(handshake_status=None)
                print(json.dumps({"restored": True}), flush=True)
            elif cmd == "quit":
                break
    finally:
        for w in wss:
            w.stop()
        for r in rests:
            r.stop()


class Servers:
    def __init__(self, exchanges: int, symbols: int, rate: int | None, start_ms: int) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--exchanges", str(exchanges),
               "--symbols", str(symbols), "--server-rate", str(rate or 0), "--start-ms", str(start_ms)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process did not start")
        urls = json.loads(line)
        self.urls: list[str] = urls["urls"]
        self.ws: list[str] = urls["ws"]
        self.pid = self.proc.pid
        self._lock = threading.Lock()

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(cmd + "\n")
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


# -- recorders ---------------------------------------------------------------------------------


class Recorder:
    """A `subscribers` callable: when each candle was first stored (wall s)."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[str, str, int], float] = {}
        # per open time: how many series stored it, and when the last did (the bench asks these
        # several times a second while the daemon fills a gap: a scan of every arrival, hundreds
        # of thousands after the backfill, took the daemon's GIL for tens of ms each time)
        self.count: dict[int, int] = {}
        self.last: dict[int, float] = {}

    def __call__(self, c: StoredCandle) -> None:
        key = (c.exchange, c.symbol, c.ts)
        if key not in self.arrivals:
            self.arrivals[key] = self.last[c.ts] = time.time()
            self.count[c.ts] = self.count.get(c.ts, 0) + 1

    def count_between(self, since_ms: int, end_ms: int) -> int:
        return sum(n for ts, n in list(self.count.items()) if since_ms <= ts < end_ms)

    def last_between(self, since_ms: int, end_ms: int) -> float:
        """When the last candle opening in [since_ms, end_ms) was first stored."""
        return max(t for ts, t in list(self.last.items()) if since_ms <= ts < end_ms)

    def lags(self, ts: int) -> list[float]:
        close = (ts + TF_MS) / 1000
        return [t - close for (_, _, cts), t in list(self.arrivals.items()) if cts == ts]


class Finals:
    """When the stream's loop thread first read each candle's final frame (wall s): a probe on
    the stream actor's frame dispatch, so each close's lag splits into the final's arrival
    (received - close) and what the daemon took to store it (stored - received)."""

    def __init__(self) -> None:
        self.received: dict[tuple[str, str, int], float] = {}

    def install(self) -> None:
        from candlekeeper.actors import stream

        original = stream._Dispatch.frame
        received = self.received

        def frame(dispatch: Any, fid: int, symbol: str, timeframe: str, ts: int, closed: bool | None,
                  *rest: Any) -> None:
            if closed:
                received.setdefault((dispatch.name, symbol, ts), time.time())
            original(dispatch, fid, symbol, timeframe, ts, closed, *rest)

        stream._Dispatch.frame = frame  # type: ignore[method-assign]

    def split(self, recorder: Recorder, ts: int) -> dict[str, float | None]:
        close = (ts + TF_MS) / 1000
        arrived, stored = [], []
        for key, t in list(self.received.items()):
            if key[2] != ts:
                continue
            arrived.append(t - close)
            at = recorder.arrivals.get(key)
            if at is not None:
                stored.append(at - t)
        return {"final_p50_s": r3(pct(arrived, 0.5)), "final_max_s": r3(max(arrived) if arrived else None),
                "store_p50_s": r3(pct(stored, 0.5)), "store_max_s": r3(max(stored) if stored else None)}


FINALS = Finals()


class Pauses:
    """The garbage collector's pauses longer than 50 ms (wall s at its start, seconds, generation):
    a full collection over a 10,000-series heap stops every thread at once."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._began = 0.0

    def install(self) -> None:
        import gc

        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        if took > 0.05:
            self.pauses.append((time.time() - took, took, info["generation"]))

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [p for p in self.pauses if start <= p[0] < end]


PAUSES = Pauses()


class ThreadCpu:
    """CPU seconds by group of threads (series, exchange loops, stream loops, storage, ...) over a
    span, from the kernel's per-thread counters: which part of the daemon used the cores."""

    @staticmethod
    def _group(name: str) -> str:
        parts = name.split("/")
        if "series" in parts or name.startswith("candlekeeper-pool"):
            return "series actors"  # on the runtime's dispatcher (its pool threads)
        if name.endswith("/stream/io"):
            return "stream loops"
        if name.endswith("/exchange/io"):
            return "exchange loops"
        return parts[-1] if name.startswith("root") else name.split("-", maxsplit=1)[0]

    def snapshot(self) -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}

    def between(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        names = {t.native_id: t.name for t in threading.enumerate()}  # once: 10,000 threads
        out: dict[str, float] = {}
        for tid, cpu in after.items():
            group = self._group(names.get(tid, "?"))
            out[group] = out.get(group, 0.0) + cpu - before.get(tid, 0.0)
        return {g: round(c, 2) for g, c in sorted(out.items(), key=lambda kv: -kv[1])[:8] if c >= 0.05}


THREAD_CPU = ThreadCpu()


def samples(metric_name: str) -> Iterator[Any]:
    """The running daemon's samples of one metric (every label set)."""
    for system, _ in RUNNING[-1:]:
        for metric in system.metrics.registry.collect():
            if metric.name == metric_name:
                yield from metric.samples


def fallbacks() -> dict[str, float]:
    """The daemon's `candlekeeper_stream_fallbacks_total` by reason (summed over exchanges)."""
    out: dict[str, float] = {}
    for sample in samples("candlekeeper_stream_fallbacks"):
        if sample.name.endswith("_total"):
            why = sample.labels.get("reason", "?")
            out[why] = out.get(why, 0.0) + sample.value
    return out


class BurstProbe:
    """The daemon's and the simulators' cores, the exchanges' mean request duration and the
    CPU by thread group over a span (the REST burst after the forced disconnect's close): is the
    fallback CPU-bound, or bound by the requests in flight (16 per exchange) and their latency?"""

    def __init__(self, servers: Servers) -> None:
        self.proc, self.sim = psutil.Process(), psutil.Process(servers.pid)
        self.servers = servers
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float, dict[int, float], float, float, int]:
        total, count = 0.0, 0.0
        for sample in samples("candlekeeper_request_duration_seconds"):
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        c, m = self.proc.cpu_times(), self.sim.cpu_times()
        return (time.time(), c.user + c.system, m.user + m.system, THREAD_CPU.snapshot(), total, count,
                self.servers.ask("stats")["klines"])

    def report(self) -> dict[str, Any]:
        (w0, c0, m0, t0, s0, n0, k0), (w1, c1, m1, t1, s1, n1, k1) = self.start, self._snap()
        span = w1 - w0
        return {"span_s": round(span, 1), "daemon_cores": r3((c1 - c0) / span), "simulator_cores": r3((m1 - m0) / span),
                "klines_per_s": round((k1 - k0) / span, 1), "requests": int(n1 - n0),
                "request_mean_s": r3((s1 - s0) / (n1 - n0)) if n1 > n0 else None,
                "cpu_by_threads": THREAD_CPU.between(t0, t1)}


class StoreProbe:
    """When writes holding a watched candle reached the storage actor, and how long each of its
    flushes took (a probe on the actor, for the forced disconnect's timeline)."""

    def __init__(self) -> None:
        self.watch: int | None = None
        self.arrived: list[float] = []
        self.flushes: list[tuple[float, int, float]] = []  # (wall s at start, writes, seconds)
        self.handled: list[tuple[float, str, float]] = []  # every message: (wall s, type, seconds)
        # the watched candle on its way: REST answers holding it, at the exchange actor and at
        # their series, and the series' writes of it (wall s each)
        self.stages: dict[str, list[float]] = {}

    def stage_counts(self, since: float, step: float = 2.0) -> list[tuple[float, dict[str, int]]]:
        out: dict[int, dict[str, int]] = {}
        for name, times in self.stages.items():
            for t in times:
                row = out.setdefault(int((t - since) // step), {})
                row[name] = row.get(name, 0) + 1
        return [(i * step, row) for i, row in sorted(out.items())]

    def mailbox(self, since: float, step: float = 5.0) -> list[tuple[float, float, dict[str, int]]]:
        """Per `step` seconds from `since`: the storage actor's busy seconds and messages by type."""
        buckets: dict[int, tuple[float, dict[str, int]]] = {}
        for at, kind, took in self.handled:
            i = int((at - since) // step)
            busy, kinds = buckets.get(i, (0.0, {}))
            kinds[kind] = kinds.get(kind, 0) + 1
            buckets[i] = (busy + took, kinds)
        return [(i * step, round(busy, 2), kinds) for i, (busy, kinds) in sorted(buckets.items())]

    def install(self) -> None:
        from candlekeeper.actors import storage
        from candlekeeper.actors.messages import Write

        on_receive, flush = storage.StorageActor.on_receive, storage.StorageActor._flush
        probe = self

        def receive(actor: Any, message: Any) -> Any:
            if probe.watch is None:
                return on_receive(actor, message)
            if isinstance(message, Write) and any(r[3] == probe.watch for r in message.rows):
                probe.arrived.append(time.time())
            began = time.time()
            try:
                return on_receive(actor, message)
            finally:
                probe.handled.append((began, type(message).__name__, time.time() - began))

        def timed_flush(actor: Any) -> None:
            n, began = len(actor._pending), time.time()
            flush(actor)
            took = time.time() - began
            if probe.watch is not None or took > 0.3:
                probe.flushes.append((began, n, took))

        from candlekeeper.actors import exchange, series

        stages = self.stages
        on_done, on_result, write = exchange.ExchangeActor._on_done, series.SeriesActor._on_result, \
            series.SeriesActor._write

        def has_watched(candles: Any) -> bool:
            return probe.watch is not None and any(c[0] == probe.watch for c in candles or ())

        def done(actor: Any, d: Any) -> None:
            if d.kind == "ohlcv" and d.result is not None and has_watched(d.result.candles):
                stages.setdefault("answered", []).append(time.time())
            on_done(actor, d)

        def result(actor: Any, res: Any) -> None:
            if has_watched(res.candles):
                stages.setdefault("series_took" if res.req_id == actor._waiting_for else "series_dropped",
                                  []).append(time.time())
            on_result(actor, res)

        def wrote(actor: Any, rows: Any, *rest: Any) -> None:
            if has_watched(rows):
                stages.setdefault("series_wrote", []).append(time.time())
            write(actor, rows, *rest)

        exchange.ExchangeActor._on_done = done  # type: ignore[method-assign]
        series.SeriesActor._on_result = result  # type: ignore[method-assign]
        series.SeriesActor._write = wrote  # type: ignore[method-assign]
        storage.StorageActor.on_receive = receive  # type: ignore[method-assign]
        storage.StorageActor._flush = timed_flush  # type: ignore[method-assign]


STORE_PROBE = StoreProbe()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def quiet_logs() -> None:
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


# -- the phases ----------------------------------------------------------------------------------


def config(args: argparse.Namespace, servers: Servers, db: str, sock: str, live: str) -> dict[str, Any]:
    symbols = synthetic_symbols(args.symbols)
    exchanges = {}
    for i, url in enumerate(servers.urls):
        ex: dict[str, Any] = {"exchange": "binance", "symbols": symbols, "api_base": url,
                              "rate_limit": args.rate_limit, "timeout": "10s", "live": live}
        if live == "websocket":
            ex["ws_url"] = servers.ws[i]
        exchanges[f"sim{i:02d}"] = ex
    return {"storage": {"path": db}, "control": {"socket": sock},
            "ingest": {"lookback": f"{args.lookback}m", "poll_interval": args.poll_interval},
            "exchanges": exchanges}


def next_close(after: float) -> float:
    return (int(after) // 60 + 1) * 60


def wait_until(at: float) -> None:
    while time.time() < at:
        time.sleep(min(0.2, max(0.0, at - time.time())))


def measure_minutes(recorder: Recorder, servers: Servers, n_series: int, minutes: int, start: float,
                    label: str) -> dict[str, Any]:
    """`minutes` closes from the first after `start`: lags of each close's candle (each looked
    at 58 s after its close), CPU and REST requests between the first and the last look."""
    proc, sim = psutil.Process(), psutil.Process(servers.pid)
    first = next_close(start)
    rows, all_lags = [], []
    snaps = []
    for k in range(minutes):
        close = first + 60 * k
        if k == 0:  # where the cores went around the first close: 10 s before it and 10 s after
            wait_until(close - 10)
            before = THREAD_CPU.snapshot()
            wait_until(close)
            at_close = THREAD_CPU.snapshot()
            wait_until(close + 10)
            after = THREAD_CPU.snapshot()
            print(f"[{label}] CPU s by threads, the 10 s before the first close: {THREAD_CPU.between(before, at_close)};"
                  f" the 10 s after: {THREAD_CPU.between(at_close, after)}; stream fallbacks so far, by reason: "
                  f"{fallbacks()}", flush=True)
        wait_until(close + 58)
        snaps.append((servers.ask("stats"), proc.cpu_times(), time.time(), sim.cpu_times()))
        lags = recorder.lags(int(close * 1000) - TF_MS)
        all_lags.extend(lags)
        within = sum(1 for x in lags if x <= WITHIN_S)
        row = {"close": dt.datetime.fromtimestamp(close, dt.UTC).strftime("%H:%M:%S"), "stored": len(lags),
               "within_2s": within, "share_within_2s": round(within / n_series, 5),
               "lag_p50_s": r3(pct(lags, 0.5)), "lag_p99_s": r3(pct(lags, 0.99)),
               "lag_max_s": r3(max(lags) if lags else None)}
        row.update(FINALS.split(recorder, int(close * 1000) - TF_MS))
        row["gc_pauses"] = [(round(at - close, 2), round(took, 3), gen) for at, took, gen in PAUSES.between(close - 5, close + 10)]
        row["slow_flushes"] = [(round(at - close, 2), n, round(took, 2)) for at, n, took in STORE_PROBE.flushes
                               if close - 5 <= at < close + 10 and took > 0.3]
        rows.append(row)
        print(f"[{label}] close {row['close']}: {within}/{n_series} within {WITHIN_S:g} s "
              f"({within / n_series:.2%}), stored {len(lags)}; lag p50 {row['lag_p50_s']} s, p99 {row['lag_p99_s']} s, "
              f"max {row['lag_max_s']} s; final frame read p50 {row['final_p50_s']} s, max {row['final_max_s']} s "
              f"after the close, stored p50 {row['store_p50_s']} s, max {row['store_max_s']} s after that; "
              f"gc pauses (s from the close, s, generation): {row['gc_pauses']}; store flushes over 0.3 s (s from "
              f"the close, writes, s): {row['slow_flushes']}", flush=True)
    out: dict[str, Any] = {"minutes": rows, "lag_p50_s": r3(pct(all_lags, 0.5)), "lag_p99_s": r3(pct(all_lags, 0.99)),
                           "lag_max_s": r3(max(all_lags) if all_lags else None),
                           "share_within_2s": round(sum(1 for x in all_lags if x <= WITHIN_S) / max(1, n_series * minutes), 5),
                           "stored": len(all_lags), "expected": n_series * minutes}
    if len(snaps) >= 2:
        (s0, c0, w0, m0), (s1, c1, w1, m1) = snaps[0], snaps[-1]
        span = w1 - w0
        out["cores"] = r3(((c1.user + c1.system) - (c0.user + c0.system)) / span)
        # the simulators' process shares this machine's two cores: when it is busy, finals go late
        out["simulator_cores"] = r3(((m1.user + m1.system) - (m0.user + m0.system)) / span)
        out["rest_requests_per_min"] = round((s1["requests"] - s0["requests"]) * 60 / span, 1)
        out["klines_per_min"] = round((s1["klines"] - s0["klines"]) * 60 / span, 1)
        out["ws_frames_per_s"] = round((s1["ws_updates"] + s1["ws_finals"] - s0["ws_updates"] - s0["ws_finals"]) / span, 1)
        out["http_429"] = s1["http_429"] - s0["http_429"]
    return out


def start_system(cfg: dict[str, Any], recorder: Recorder) -> System:
    """The system as the daemon runs it: its control socket, and its heap keeper (full garbage
    collections at quiet instants, `candlekeeper.supervisors.heap`)."""
    from candlekeeper.supervisors.heap import HeapKeeper
    from candlekeeper.surfaces.control import ControlSurface

    config = config_mod.from_dict(cfg)
    system = System(config, surfaces=[ControlSurface(config.control)], subscribers=[recorder]).start()
    RUNNING.append((system, HeapKeeper(system.runtime.scheduler, system.runtime.wall).start()))
    return system


RUNNING: list[tuple[System, Any]] = []  # each system started and its heap keeper (`stop_system`, `fallbacks`)


def stop_system(system: System) -> None:
    for entry in [e for e in RUNNING if e[0] is system]:
        entry[1].stop()
        RUNNING.remove(entry)
    system.stop()


HEALTH_TIMEOUTS: list[float] = []  # when a `health` answer took longer than 10 s (reported)


def health_of(system: System) -> dict[str, Any]:
    """The daemon's health, waited for up to 2 minutes (one ask: asking again after a timeout
    would queue a second 10,000-series report behind the first); an answer slower than 10 s
    (what `System.health` waits) is counted and reported, never the end of the run."""
    asked = time.time()
    report: dict[str, Any] = system.health_address.proxy().health().get(timeout=120)
    if time.time() - asked > 10:
        HEALTH_TIMEOUTS.append(asked)
        print(f"health answered after {time.time() - asked:.1f} s", flush=True)
    return report


def all_sources(system: System) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in health_of(system)["series"]:
        counts[str(s.get("source"))] = counts.get(str(s.get("source")), 0) + 1
    return counts


def exact_since(db: str, histories: dict[str, CandleHistory], symbols: list[str], since_ms: int,
                end_ms: int) -> tuple[int, int]:
    """(series whose candles in [since_ms, end_ms) are stored exactly, series in all)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT exchange, symbol, ts, open, high, low, close, volume FROM candles"
            " WHERE timeframe='1m' AND ts >= ? AND ts < ? ORDER BY exchange, symbol, ts", (since_ms, end_ms)).fetchall()
    finally:
        conn.close()
    got: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for ex, sym, *candle in rows:
        got.setdefault((ex, sym), []).append(tuple(candle))
    ok = 0
    for ex, history in histories.items():
        for sym in symbols:
            want = [tuple(c) for c in history.expected_candles(sym, "1m", since_ms, end_ms, end_ms + 1)]
            ok += got.get((ex, sym), []) == want
    return ok, len(histories) * len(symbols)


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_logs()
    FINALS.install()
    PAUSES.install()
    STORE_PROBE.install()
    n_series = args.exchanges * args.symbols
    start_ms = (int(time.time() * 1000) // 86_400_000) * 86_400_000 - 86_400_000
    servers = Servers(args.exchanges, args.symbols, args.rate_limit, start_ms)
    print(f"{args.exchanges} simulated Binance exchanges (REST + WebSocket) x {args.symbols} symbols up", flush=True)
    symbols = synthetic_symbols(args.symbols)
    histories = {f"sim{i:02d}": CandleHistory(symbols, start_ms, seed=i) for i in range(args.exchanges)}
    tmp = tempfile.TemporaryDirectory(prefix="ck-live-", dir="/tmp")
    db, sock = os.path.join(tmp.name, "live.db"), os.path.join(tmp.name, "ctl.sock")
    result: dict[str, Any] = {"exchanges": args.exchanges, "symbols": args.symbols, "series": n_series,
                              "rate_limit": args.rate_limit, "poll_interval_s": args.poll_interval,
                              "update_period_s": UPDATE_PERIOD_S, "outage_s": args.outage,
                              "audit_per_min": round(n_series * 60 / AUDIT_INTERVAL_S, 1)}
    system: System | None = None
    try:
        if args.rest_minutes:
            recorder = Recorder()
            system = start_system(config(args, servers, db, sock, "rest"), recorder)
            t0 = time.time()
            target = (int(t0 * 1000) // TF_MS) * TF_MS - TF_MS
            while recorder.count.get(target, 0) < n_series:
                if time.time() - t0 > args.backfill_timeout:
                    break
                time.sleep(0.2)
            print(f"[polling] backfilled in {time.time() - t0:.1f} s", flush=True)
            result["polling"] = measure_minutes(recorder, servers, n_series, args.rest_minutes, time.time(), "polling")
            stop_system(system)
            system = None

        recorder = Recorder()
        t0 = time.time()
        system = start_system(config(args, servers, db, sock, "websocket"), recorder)
        result["stream_start_s"] = round(time.time() - t0, 2)
        while all_sources(system).get("stream", 0) < n_series and time.time() - t0 < args.backfill_timeout:
            time.sleep(3.0)  # a 10,000-series report is work for the daemon: not too often
        result["stream_all_on_stream_s"] = round(time.time() - t0, 2)
        print(f"[stream] every series on the stream after {result['stream_all_on_stream_s']} s: {all_sources(system)}",
              flush=True)
        result["streaming"] = measure_minutes(recorder, servers, n_series, args.minutes, time.time(), "stream")

        # -- the forced disconnect ------------------------------------------------------------
        close = next_close(time.time() + 25)
        wait_until(close - 20)
        outage_at = time.time()
        # (s from the close, klines served, writes of the close's candle at the store, stored)
        timeline: list[tuple[float, int, int, int]] = []
        sampling = threading.Event()
        STORE_PROBE.watch = int(close * 1000) - TF_MS

        def sample() -> None:
            ts = int(close * 1000) - TF_MS
            while not sampling.wait(1.0):
                klines = servers.ask("stats")["klines"]
                timeline.append((round(time.time() - close, 1), klines, len(STORE_PROBE.arrived),
                                 recorder.count.get(ts, 0)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        dropped = servers.ask("outage")["dropped"]
        print(f"[outage] {dropped} connections dropped, upgrades refused for {args.outage:g} s", flush=True)
        time.sleep(1.0)
        sources_down = all_sources(system)
        wait_until(close)
        burst = BurstProbe(servers)  # the REST fallback burst after the close, until the store is exact
        wait_until(outage_at + args.outage)
        servers.ask("restore")
        restored_at = time.time()
        # the simulators say when every connection is open again (asking the daemon's health every
        # half second would load the daemon while it fills the gap)
        while servers.ask("stats")["ws_open"] < len(servers.ws) and time.time() - restored_at < 300:
            time.sleep(0.2)
        reconnected_at = time.time()
        print(f"[outage] streams up again {reconnected_at - restored_at:.1f} s after the exchanges took connections",
              flush=True)
        since_ms = int(outage_at * 1000) // TF_MS * TF_MS - 2 * TF_MS
        exact_at = None
        exact = (0, n_series)
        while time.time() - reconnected_at < 120:
            end_ms = int(time.time() * 1000) // TF_MS * TF_MS
            # cheap first: every candle of the window stored (the subscriber saw each); then the
            # store compared with the simulators' history, a read of seconds in this process,
            # which shares the daemon's GIL: once it can pass, not over and over while the
            # daemon fills the gap. The store became exact when the last of them was stored.
            if recorder.count_between(since_ms, end_ms) < n_series * ((end_ms - since_ms) // TF_MS):
                time.sleep(0.2)
                continue
            exact = exact_since(db, histories, symbols, since_ms, end_ms)
            if exact[0] == exact[1]:
                exact_at = recorder.last_between(since_ms, end_ms)
                break
            time.sleep(0.5)
        print(f"[outage] from the close to the store exact: {burst.report()}", flush=True)
        while all_sources(system).get("stream", 0) < n_series and time.time() - reconnected_at < 180:
            time.sleep(2.0)
        back_s = time.time() - reconnected_at
        sampling.set()
        sampler.join()
        STORE_PROBE.watch = None
        print(f"[outage] timeline (s from the close, klines served, writes at the store, stored): {timeline}",
              flush=True)
        slow = [(round(at - close, 1), n, round(took, 2)) for at, n, took in STORE_PROBE.flushes if took > 0.5 and at >= outage_at]
        print(f"[outage] store flushes over 0.5 s (s from the close, writes, s): {slow}", flush=True)
        print(f"[outage] the watched candle per 2 s (s from the close, counts): {STORE_PROBE.stage_counts(close)}",
              flush=True)
        print(f"[outage] the storage actor per 5 s (s from the close, busy s, messages): {STORE_PROBE.mailbox(close)}",
              flush=True)
        during = recorder.lags(int(close * 1000) - TF_MS)
        result["outage"] = {
            "dropped_connections": dropped,
            "series_on_rest_1s_after": sources_down.get("rest", 0),
            "candle_closed_during_outage": {"stored": len(during), "lag_p50_s": r3(pct(during, 0.5)),
                                            "lag_max_s": r3(max(during) if during else None)},
            "reconnect_after_restore_s": round(reconnected_at - restored_at, 2),
            "exact_after_reconnect_s": None if exact_at is None else round(max(0.0, exact_at - reconnected_at), 2),
            "series_exact": exact[0],
            "all_back_on_stream_s": round(back_s, 2),
        }
        print(f"[outage] store exact {result['outage']['exact_after_reconnect_s']} s after reconnecting "
              f"({exact[0]}/{exact[1]} series)", flush=True)
        health = health_of(system)
        result["stream_reconnects"] = sum((e.get("stream") or {}).get("reconnects", 0) for e in health["exchanges"])
        result["sources_end"] = all_sources(system)
        result["health_timeouts"] = len(HEALTH_TIMEOUTS)
        t0 = time.perf_counter()
        stop_system(system)
        result["stop_s"] = round(time.perf_counter() - t0, 2)
        system = None
    finally:
        if system is not None:
            stop_system(system)
        servers.close()
        tmp.cleanup()
    return result


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    s = r["streaming"]
    polling = (r.get("polling") or {}).get("rest_requests_per_min") or r["series"]
    streaming_rest = max(s.get("rest_requests_per_min") or 0.0, r["audit_per_min"])
    out = {
        "within_2s": s["share_within_2s"] >= TARGET_WITHIN,
        "cores": s.get("cores") is not None and s["cores"] <= TARGET_CORES,
        "rest_share": s.get("rest_requests_per_min") is not None and streaming_rest <= TARGET_REST_SHARE * polling,
        "gap": r["outage"]["exact_after_reconnect_s"] is not None
        and r["outage"]["exact_after_reconnect_s"] <= TARGET_GAP_S,
    }
    return out


def section(r: dict[str, Any], command: str) -> str:
    v = verdicts(r)
    yes = {True: "yes", False: "**no**"}
    s, p, o = r["streaming"], r.get("polling") or {}, r["outage"]
    n = r["series"]
    polling_rate = p.get("rest_requests_per_min")
    streaming_rest = max(s.get("rest_requests_per_min") or 0.0, r["audit_per_min"])
    share = (streaming_rest / polling_rate) if polling_rate else None

    def lag(x: dict[str, Any]) -> str:
        return f"{x.get('lag_p50_s')} / {x.get('lag_p99_s')} / {x.get('lag_max_s')} s" if x else "-"

    def within(x: dict[str, Any]) -> str:
        return f"{x['share_within_2s']:.2%}" if x else "-"

    misses = [k for k, ok in v.items() if not ok]
    per_minute = "; ".join(
        f"{m['close']}: {m['within_2s']:,}/{n:,} within 2 s, lag p50 {m['lag_p50_s']} s, max {m['lag_max_s']} s"
        f" (final frame read p50 {m.get('final_p50_s')} s, max {m.get('final_max_s')} s after the close; stored "
        f"p50 {m.get('store_p50_s')} s, max {m.get('store_max_s')} s after that; garbage collector pauses over "
        f"50 ms within 2 s of the close: {[g for g in m.get('gc_pauses', []) if 0 <= g[0] <= 2] or 'none'})"
        for m in s["minutes"])
    lines = [
        BEGIN,
        f"## Live candles over WebSocket: `{command}` ({dt.date.today().isoformat()})",
        "",
        f"bench/scale.py's exchanges: {r['exchanges']} simulated Binance exchanges x {r['symbols']:,} symbols = "
        f"**{n:,} series** in one daemon process, `rate_limit = {r['rate_limit']:g}` per exchange (enforced by the "
        f"simulators), `poll_interval = {r['poll_interval_s']:g}s`; each exchange also streams klines over a "
        f"Binance WebSocket simulator sharing its candles, pushing each stream's candle in progress every "
        f"{r['update_period_s']:g} s and its final at the close (all simulators in one helper process). Polling and "
        f"streaming measured in the same run, one after the other, same database.",
        "",
        "| figure | streaming | polling (same run) | target | met |",
        "|---|---|---|---|---|",
        f"| close-to-stored lag p50 / p99 / max | {lag(s)} | {lag(p)} | | |",
        f"| candles stored within 2 s of their close | {within(s)} ({s['stored']:,} of {s['expected']:,}) | "
        f"{within(p)} | >= {TARGET_WITHIN:.0%} | {yes[v['within_2s']]} |",
        f"| daemon CPU, cores (user + sys over the measured minutes) | {s.get('cores')} | {p.get('cores', '-')} | "
        f"<= {TARGET_CORES:g} | {yes[v['cores']]} |",
        f"| simulators' CPU, cores (their helper process, same minutes) | {s.get('simulator_cores', '-')} | "
        f"{p.get('simulator_cores', '-')} | | |",
        f"| REST requests per minute | measured {s.get('rest_requests_per_min')} (klines {s.get('klines_per_min')}); "
        f"with the audit, computed: {r['audit_per_min']} (every series every {AUDIT_INTERVAL_S / 3600:g} h) | "
        f"{polling_rate} (klines {p.get('klines_per_min')}) | <= {TARGET_REST_SHARE:.0%} of polling"
        f"{f' ({share:.2%})' if share is not None else ''} | {yes[v['rest_share']]} |",
        f"| stream frames received per second | {s.get('ws_frames_per_s')} | | | |",
        f"| forced disconnect: {o['dropped_connections']} connections dropped, upgrades refused for {r['outage_s']:g} s "
        f"from 20 s before a close; series on REST 1 s later | {o['series_on_rest_1s_after']:,}/{n:,} | | | |",
        f"| the candle that closed during it, stored (by REST) lag p50 / max | "
        f"{o['candle_closed_during_outage']['lag_p50_s']} / {o['candle_closed_during_outage']['lag_max_s']} s "
        f"({o['candle_closed_during_outage']['stored']:,} stored) | | | |",
        f"| reconnected (every connection open again, as the simulators count) after the exchanges took "
        f"connections again | "
        f"{o['reconnect_after_restore_s']} s | | | |",
        f"| store exact (every series, from 2 min before the outage) after reconnecting | "
        f"{o['exact_after_reconnect_s']} s ({o['series_exact']:,}/{n:,} series) | | <= {TARGET_GAP_S:g} s | "
        f"{yes[v['gap']]} |",
        f"| every series back on the stream after reconnecting (its first message since) | "
        f"{o['all_back_on_stream_s']} s | | | |",
        "",
        f"Per minute, streaming: {per_minute}. Every series on the stream {r['stream_all_on_stream_s']} s after "
        f"`System.start()`; stream reconnects over the run: {r['stream_reconnects']}; sources at the end: "
        f"{r['sources_end']}; stop {r['stop_s']} s; `health` answers slower than 10 s: "
        f"{r.get('health_timeouts', 0)}.",
        "",
        ("Every target is met." if not misses else f"**Targets missed: {', '.join(misses)}.**"),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=10)
    parser.add_argument("--symbols", type=int, default=1000, help="symbols per exchange")
    parser.add_argument("--minutes", type=int, default=3, help="minute closes measured while streaming")
    parser.add_argument("--rest-minutes", type=int, default=2, help="minute closes measured while polling (0: skip)")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds of forced disconnect")
    parser.add_argument("--rate-limit", type=int, default=100, help="requests/s per exchange (daemon and simulator)")
    parser.add_argument("--lookback", type=int, default=30, help="minutes of backfill")
    parser.add_argument("--poll-interval", type=float, default=10.0, help="seconds")
    parser.add_argument("--backfill-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true", help="do not touch bench/RESULTS.md")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server-rate", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-ms", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_servers(args.exchanges, args.symbols, args.server_rate or None, args.start_ms)
        return
    command = command_line("live.py")
    result = run(args)
    if not args.no_results:
        replace_section(args.results, section(result, command), BEGIN, END, after="<!-- scale-notes:end -->")
    result["targets_met"] = verdicts(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
