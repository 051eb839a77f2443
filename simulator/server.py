"""A loopback HTTP server speaking Binance's public spot REST dialect, with injectable faults.

One `BinanceSimulator` = one exchange on one port; nothing is global, so soaks run several
side by side. Thread per connection (HTTP/1.1 keep-alive, as ccxt's requests session uses),
so a stalled request never blocks the others. `stop()` wakes every thread (stalls included),
resets open connections and joins them all.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import binance
from .binance import Reply
from .faults import FaultInjector, FaultKind, Faults, OutageMode, PoisonKind
from .history import CandleHistory, align_down
from .stats import RequestHook, Stats, StatsSnapshot

log = logging.getLogger(__name__)

DEFAULT_SYMBOLS: tuple[str, ...] = ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "ETH/BTC")
_LINGER_RST = struct.pack("ii", 1, 0)


def wall_clock_ms() -> int:
    """Real time in ms: what ccxt and Binance both use."""
    return time.time_ns() // 1_000_000


def synthetic_symbols(n: int, quote: str = "USDT") -> list[str]:
    """`n` distinct unified symbols for benchmarks: the defaults first, then S0001/USDT..."""
    out = [s for s in DEFAULT_SYMBOLS if s.endswith("/" + quote)][:n]
    i = 1
    while len(out) < n:
        out.append(f"S{i:04d}/{quote}")
        i += 1
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real thing behind a CDN
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms stalls
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout_s  # type: ignore[misc]  # per connection, as the stdlib allows
        super().setup()

    def do_GET(self) -> None:
        self.server.sim._serve(self)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header from the exchange's own clock (`now_ms`), not the host's."""
        if timestamp is None:
            timestamp = self.server.sim.now_ms() / 1000
        return email.utils.formatdate(timestamp, usegmt=True)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections (to reset them) and its connection
    threads (daemonic, so a forgotten simulator never blocks exit, yet joined by `join_all`:
    the stdlib only joins non-daemon ones)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: BinanceSimulator, idle_timeout_s: float):
        self.sim = sim
        self.idle_timeout_s = idle_timeout_s
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._abort: set[socket.socket] = set()
        self._workers: set[threading.Thread] = set()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self._work, args=(request, client_address), daemon=True,
                             name=f"sim-{self.sim.name}-{self.sim.port}-conn")
        with self._conn_lock:
            self._conns.add(request)
            self._workers.add(t)
        t.start()

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._workers.discard(threading.current_thread())

    def join_all(self) -> None:
        """Join every connection thread (call after `reset_all` so none is blocked)."""
        with self._conn_lock:
            workers = list(self._workers)
        for t in workers:
            t.join()

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._conns.discard(request)
            abort = request in self._abort
            self._abort.discard(request)
        if abort:  # RST: skip the FIN that shutdown(SHUT_WR) would send first
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # client went away: routine
            log.debug("connection %s ended with an error", client_address, exc_info=True)
        else:  # a simulator bug: the client saw a dropped connection, make it visible
            log.exception("simulator %s failed serving %s", self.sim.name, client_address)

    def mark_abort(self, conn: socket.socket) -> None:
        """Make the eventual close of `conn` a TCP RST."""
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        with self._conn_lock:
            self._abort.add(conn)

    def reset_all(self) -> None:
        """RST every open connection and wake threads blocked reading them."""
        with self._conn_lock:
            conns = list(self._conns)
        for c in conns:
            self.mark_abort(c)
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class BinanceSimulator:
    """One simulated Binance spot exchange on loopback.

    symbols: unified symbols ("BTC/USDT") to list.
    port: 0 lets the OS choose; read `.url` / `.port` after construction.
    history_start_ms: first candle instant (default: start of yesterday, UTC).
    now_ms: the exchange's clock (default wall clock); inject a fake one to fast-forward.
    seed: varies prices between exchanges that list the same symbol.
    gaps: symbol -> open times the exchange genuinely has no candle for.
    faults: initial fault config (see `Faults`); change it later with `set_faults`.
    on_request: request hook, see `stats.RequestHook`.
    The socket is bound in the constructor; `start()` begins serving.
    """

    def __init__(self, symbols: Sequence[str] = DEFAULT_SYMBOLS, *, host: str = "127.0.0.1",
                 port: int = 0, history_start_ms: int | None = None,
                 now_ms: Callable[[], int] = wall_clock_ms, seed: int = 0,
                 gaps: Mapping[str, Iterable[int]] | None = None, faults: Faults | None = None,
                 on_request: RequestHook | None = None, name: str = "binance",
                 idle_timeout_s: float = 300.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.now_ms = now_ms
        if history_start_ms is None:
            history_start_ms = align_down(now_ms(), "1d") - 86_400_000
        self.history = CandleHistory(symbols, history_start_ms, seed=seed, gaps=gaps)
        self._info = binance.ExchangeInfo(self.history)
        self._injector = FaultInjector(faults, monotonic=monotonic)
        self._stats = Stats()
        if on_request is not None:
            self._stats.add_hook(on_request)
        self._weight_lock = threading.Lock()
        self._weight_minute = -1
        self._weight_used = 0
        self._stopping = threading.Event()
        self._lifecycle = threading.RLock()
        self._serve_thread: threading.Thread | None = None
        self._listening = False
        self._started = False
        self._httpd = _Server((host, port), self, idle_timeout_s)
        self._listening = True
        self.host = host
        self.port: int = self._httpd.server_address[1]

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Base URL to give ccxt as `api_base`, e.g. "http://127.0.0.1:54321"."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> BinanceSimulator:
        """Begin serving (idempotent). Returns self for chaining."""
        with self._lifecycle:
            if self._stopping.is_set():
                raise RuntimeError("a stopped simulator cannot be restarted; make a new one")
            self._started = True
            if self._injector.faults.outage is OutageMode.REFUSE:
                self._close_listener()
            elif self._serve_thread is None:
                self._start_serving()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, wake stalls, join all threads."""
        with self._lifecycle:
            if self._stopping.is_set():
                return
            self._stopping.set()
            self._stop_serving()
            self._close_listener()
            self._httpd.reset_all()
            self._httpd.server_close()
            self._httpd.join_all()

    def __enter__(self) -> BinanceSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_serving(self) -> None:
        t = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"sim-{self.name}-{self.port}", daemon=True)
        self._serve_thread = t
        t.start()

    def _stop_serving(self) -> None:
        if self._serve_thread is not None:
            self._httpd.shutdown()
            self._serve_thread.join()
            self._serve_thread = None

    def _close_listener(self) -> None:
        self._stop_serving()
        if self._listening:
            self._httpd.socket.close()
            self._listening = False

    def _reopen_listener(self) -> None:
        """Rebind the same port after a REFUSE outage (retrying briefly if the OS lags)."""
        deadline = time.monotonic() + 2.0
        while True:
            sock = socket.socket(self._httpd.address_family, self._httpd.socket_type)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(self._httpd.request_queue_size)
                break
            except OSError as e:
                sock.close()
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self._httpd.socket = sock
        self._listening = True
        if self._started:
            self._start_serving()

    # --------------------------------------------------------------------- faults
    @property
    def faults(self) -> Faults:
        return self._injector.faults

    def set_faults(self, faults: Faults) -> None:
        """Swap the whole fault config at run time (see `FaultInjector.configure`)."""
        with self._lifecycle:
            old = self._injector.configure(faults)
            if self._stopping.is_set():
                return
            was_refusing = old.outage is OutageMode.REFUSE
            refusing = faults.outage is OutageMode.REFUSE
            if refusing and not was_refusing:
                self._close_listener()
                self._httpd.reset_all()
            elif was_refusing and not refusing:
                self._reopen_listener()
            elif faults.outage is OutageMode.RESET and old.outage is not OutageMode.RESET:
                self._httpd.reset_all()

    def update_faults(self, **changes: object) -> Faults:
        """`set_faults(dataclasses.replace(current, **changes))`; returns the new config."""
        new = replace(self.faults, **changes)  # type: ignore[arg-type]
        self.set_faults(new)
        return new

    def set_outage(self, mode: OutageMode | None = OutageMode.REFUSE) -> None:
        """Start (mode) or end (None) a full outage."""
        self.update_faults(outage=mode)

    def poison(self, symbol: str, kind: PoisonKind = PoisonKind.INVERTED) -> None:
        """Make `symbol`'s klines garbage of the given kind; other symbols stay fine."""
        poisoned = dict(self.faults.poisoned)
        poisoned[symbol.replace("/", "").upper()] = kind
        self.update_faults(poisoned=poisoned)

    def unpoison(self, symbol: str) -> None:
        poisoned = dict(self.faults.poisoned)
        poisoned.pop(symbol.replace("/", "").upper(), None)
        self.update_faults(poisoned=poisoned)

    def set_rate_limit(self, per_second: int | None) -> None:
        """Server-side limit: at most `per_second` requests per sliding second."""
        self.update_faults(rate_limit_per_s=per_second)

    # ---------------------------------------------------------------------- stats
    def stats(self) -> StatsSnapshot:
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    def add_request_hook(self, hook: RequestHook) -> None:
        self._stats.add_hook(hook)

    def remove_request_hook(self, hook: RequestHook) -> None:
        self._stats.remove_hook(hook)

    # -------------------------------------------------------------------- oracle
    def expected_candles(self, symbol: str, interval: str, start_ms: int,
                         end_ms: int) -> list[tuple[int, float, float, float, float, float]]:
        """Closed candles with open time in [start_ms, end_ms) at the server's now, exactly as
        ccxt returns them: what a correct store holds."""
        return self.history.expected_candles(symbol, interval, start_ms, end_ms, self.now_ms())

    # ------------------------------------------------------------------- serving
    def _serve(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        path = split.path
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        decision = self._injector.decide(path)
        if decision is None:
            self._respond(h, path, params, self._route(path, params), None)
            return
        kind = decision.kind
        if kind in (FaultKind.RESET, FaultKind.OUTAGE) and decision.status is None:
            self._stats.record(path, params, None, kind)
            self._reset(h)
        elif kind is FaultKind.STALL:
            self._stats.record(path, params, None, kind)
            self._stopping.wait(self.faults.stall_s)
            h.close_connection = True
        elif kind in (FaultKind.TRUNCATED, FaultKind.SHORT_READ):
            reply = self._route(path, params)
            self._respond(h, path, params, reply, kind)
        elif kind in (FaultKind.HTTP_429, FaultKind.RATE_LIMIT):
            self._respond(h, path, params, binance.too_many_requests(decision.retry_after_s or 1),
                          kind)
        elif kind in (FaultKind.HTTP_418, FaultKind.BAN):
            retry = decision.retry_after_s or 1
            self._respond(h, path, params,
                          binance.banned(retry, self.now_ms() + retry * 1000), kind)
        else:  # 5xx (random or outage)
            self._respond(h, path, params, binance.server_error(decision.status or 503), kind)

    def _route(self, path: str, params: Mapping[str, str]) -> Reply:
        if path == binance.PATH_KLINES:
            sym = params.get("symbol", "")
            poison = self._injector.poison_for(sym)
            return binance.klines(self.history, params, self.now_ms(), poison)
        if path == binance.PATH_EXCHANGE_INFO:
            return self._info.reply(params, self.now_ms())
        if path == binance.PATH_TIME:
            return binance.server_time(self.now_ms())
        if path == binance.PATH_PING:
            return binance.ping()
        return binance.not_found()

    def _used_weight(self, path: str) -> int:
        minute = self.now_ms() // 60_000
        with self._weight_lock:
            if minute != self._weight_minute:
                self._weight_minute = minute
                self._weight_used = 0
            self._weight_used += binance.WEIGHTS.get(path, 1)
            return self._weight_used

    def _respond(self, h: _Handler, path: str, params: Mapping[str, str], reply: Reply,
                 fault: FaultKind | None) -> None:
        poisoned = (fault is None and path == binance.PATH_KLINES
                    and self._injector.poison_for(params.get("symbol", "")) is not None)
        if poisoned:
            fault = FaultKind.POISON
        self._stats.record(path, params, reply.status, fault)
        body = reply.body
        length = len(body)
        if fault is FaultKind.TRUNCATED:
            body = body[: len(body) // 2]
            length = len(body)
        elif fault is FaultKind.SHORT_READ:
            body = body[: len(body) // 2]
        weight = str(self._used_weight(path))
        try:
            h.send_response(reply.status)
            h.send_header("Content-Type", reply.content_type)
            h.send_header("Content-Length", str(length))
            h.send_header("x-mbx-used-weight", weight)
            h.send_header("x-mbx-used-weight-1m", weight)
            for k, v in reply.headers.items():
                h.send_header(k, v)
            if fault is FaultKind.SHORT_READ:
                h.send_header("Connection", "close")
                h.close_connection = True
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()
        except OSError:
            h.close_connection = True  # client went away (e.g. timed out); nothing to do

    def _reset(self, h: _Handler) -> None:
        h.close_connection = True
        self._httpd.mark_abort(h.connection)
