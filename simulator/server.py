"""A loopback HTTP server speaking one exchange's public REST dialect, with injectable faults.

One `ExchangeSimulator` = one exchange (one dialect) on one port; nothing is global, so soaks
run several side by side. `BinanceSimulator` is the Binance one with the old defaults. Thread
per connection (`transport`, HTTP/1.1 keep-alive as ccxt's requests session uses), so a
stalled request never blocks the others. `stop()` wakes every thread (stalls and trickles
included), resets open connections and joins them all. What a request means and how a failure
looks is the dialect's business (`dialects`); whether it fails is the injector's (`faults`).
"""

from __future__ import annotations

import email.utils
import errno
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .catalogue import default_markets
from .dialects import Ctx, Dialect, make_dialect
from .faults import FaultInjector, FaultKind, Faults, OutageMode, PoisonKind
from .history import INTERVALS, CandleHistory, Market, NoTrade, align_down, align_up
from .reply import Reply
from .stats import RequestHook, Stats, StatsSnapshot
from .transport import Handler, Server
from .venue import Venue

DEFAULT_SYMBOLS: tuple[str, ...] = ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "ETH/BTC")


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


class ExchangeSimulator:
    """One simulated exchange on loopback, speaking `dialect`'s public REST API.

    symbols: unified symbols ("BTC/USDT") to list (always listed, whatever `catalogue`).
    dialect: "binance", "okx", "bybit", "kraken", "coinbase", "kucoin" or "oanda".
    dialect_options: keyword arguments of the dialect's constructor (OANDA: `token`, the
        Bearer token it accepts; `account_id`; `complete_lag_ms`).
    catalogue: also list the dialect's ~40 default markets (`simulator.catalogue`).
    port: 0 lets the OS choose; read `.url` / `.port` after construction.
    history_start_ms: first candle instant (default: start of yesterday, UTC).
    now_ms: the wall clock (default real time); inject a fake one to fast-forward. The
        exchange's own clock is this plus `Faults.clock_skew_ms` (see `now_ms()`).
    seed: varies prices between exchanges that list the same symbol.
    gaps: symbol -> open times the exchange genuinely has no candle for (all dialects).
    listed_at: symbol -> listing instant; nothing trades before it.
    no_trade: symbol -> 1-minute open times (set or predicate) without trades; the dialect
        omits such candles or serves them flat (`empty_candles` overrides: "omit"/"fill").
    unlisted: known symbols missing from the market list until `list_symbol`.
    page_caps: endpoint name -> rows per page, overriding the dialect's (e.g. OKX
        {"history-candles": 100}).
    fail_listing: shorthand for `Faults.fail_listing` (e.g. {"option": 500}).
    faults: initial fault config (see `Faults`); change it later with `set_faults`.
    on_request: request hook, see `stats.RequestHook`.
    The socket is bound in the constructor; `start()` begins serving.
    """

    def __init__(self, symbols: Sequence[str] | None = None, *, dialect: str = "binance",
                 catalogue: bool = True, host: str = "127.0.0.1", port: int = 0,
                 history_start_ms: int | None = None,
                 now_ms: Callable[[], int] = wall_clock_ms, seed: int = 0,
                 gaps: Mapping[str, Iterable[int]] | None = None,
                 listed_at: Mapping[str, int] | None = None,
                 no_trade: Mapping[str, NoTrade] | None = None,
                 unlisted: Iterable[str] = (), empty_candles: str | None = None,
                 page_caps: Mapping[str, int] | None = None,
                 fail_listing: Mapping[str, int] | None = None,
                 faults: Faults | None = None, on_request: RequestHook | None = None,
                 name: str | None = None, idle_timeout_s: float = 300.0,
                 monotonic: Callable[[], float] = time.monotonic,
                 dialect_options: Mapping[str, Any] | None = None) -> None:
        self.dialect: Dialect = make_dialect(dialect, **(dialect_options or {}))
        self.name = name or dialect
        self._clock = now_ms
        faults = faults or Faults()
        if fail_listing:
            faults = replace(faults, fail_listing={**faults.fail_listing, **fail_listing})
        self._injector = FaultInjector(faults, monotonic=monotonic)
        if history_start_ms is None:
            history_start_ms = align_down(self.now_ms(), "1d") - 86_400_000
        unlisted = list(unlisted)
        wanted = list(symbols or ()) + [s for s in unlisted if s not in (symbols or ())]
        if catalogue:
            wanted = default_markets(dialect, wanted)
        self.history = CandleHistory(wanted, history_start_ms, seed=seed, gaps=gaps,
                                     listed_at=listed_at, no_trade=no_trade,
                                     market_hours=self.dialect.market_hours)
        self.venue = Venue(self.history, self.dialect.market_id, self.dialect.aliases,
                           hidden=unlisted)
        if empty_candles not in (None, "omit", "fill"):
            raise ValueError('empty_candles must be None, "omit" or "fill"')
        self._omit_empty = (self.dialect.omit_empty if empty_candles is None
                            else empty_candles == "omit")
        self._caps = {**self.dialect.page_caps, **(page_caps or {})}
        self._expected_memo: dict[tuple[Any, ...], tuple[tuple[int, float, float, float, float, float], ...]] = {}
        self._stats = Stats()
        if on_request is not None:
            self._stats.add_hook(on_request)
        self._stopping = threading.Event()
        self._lifecycle = threading.RLock()
        self._serve_thread: threading.Thread | None = None
        self._listening = False
        self._started = False
        self._httpd = Server((host, port), self, idle_timeout_s)
        self._listening = True
        self.host = host
        self.port: int = self._httpd.server_address[1]

    def now_ms(self) -> int:
        """The exchange's clock: the wall clock plus the configured skew."""
        return self._clock() + self._injector.faults.clock_skew_ms

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Base URL to give ccxt as `api_base`, e.g. "http://127.0.0.1:54321"."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> ExchangeSimulator:
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

    def __enter__(self) -> ExchangeSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_serving(self) -> None:
        t = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01},
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
        """Make `symbol`'s candles garbage of the given kind; other symbols stay fine.
        `symbol` is unified ("BTC/USDT") or the dialect's id ("XXBTZUSD")."""
        poisoned = dict(self.faults.poisoned)
        poisoned[symbol.replace("/", "").upper()] = kind
        self.update_faults(poisoned=poisoned)

    def unpoison(self, symbol: str) -> None:
        poisoned = dict(self.faults.poisoned)
        poisoned.pop(symbol.replace("/", "").upper(), None)
        self.update_faults(poisoned=poisoned)

    def enforce_documented_limits(self, on: bool = True) -> None:
        """Answer requests beyond the exchange's documented limits (`Dialect.limits`, shared by
        every client of this server) with the dialect's rate-limit reply."""
        self.update_faults(documented_limits=on)

    def ban(self, seconds: float) -> None:
        """Ban every client for `seconds` from now: each request gets the dialect's ban answer
        (Binance: 418 with Retry-After) until then."""
        self._injector.ban(seconds)

    def set_rate_limit(self, per_second: int | None) -> None:
        """Server-side limit: at most `per_second` requests per sliding second."""
        self.update_faults(rate_limit_per_s=per_second)

    def set_clock_skew(self, skew_ms: int) -> None:
        """Run the exchange's clock `skew_ms` ahead (+) or behind (-) the wall clock."""
        self.update_faults(clock_skew_ms=int(skew_ms))

    # ------------------------------------------------------------------- markets
    def list_symbol(self, symbol: str, listed_at_ms: int | None = None) -> None:
        """List `symbol` from now on (a new symbol, or one given as `unlisted`).

        `listed_at_ms`: when it started trading (no candle before the one containing it).
        Default: its configured listing time if it has one, else (for a symbol the
        exchange never knew) the exchange's now."""
        if listed_at_ms is None and self.history.market(symbol) is None:
            listed_at_ms = self.now_ms()
        self.venue.list_symbol(symbol, listed_at_ms)

    def markets(self) -> list[str]:
        """Unified symbols of the spot markets listed right now."""
        return [m.symbol for m in self.venue.markets()]

    def market_id(self, symbol: str) -> str:
        """The dialect's id of `symbol` ("BTC/USDT" -> "BTC-USDT" on OKX)."""
        m = self.history.market(symbol)
        if m is None:
            raise KeyError(symbol)
        return self.dialect.market_id(m)

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
    def expected_candles(self, symbol: str, interval: str, start_ms: int, end_ms: int, *,
                         reach_at_ms: int | None = None, price: str | None = None,
                         ) -> list[tuple[int, float, float, float, float, float]]:
        """What a correct store holds: closed candles (at the exchange's now) with open time in
        [start_ms, end_ms), exactly as ccxt returns them, with this dialect's rules applied
        (no-trade candles left out where the exchange omits them, nothing before listing,
        nothing while the market is closed).

        Candles beyond the exchange's reach cannot be fetched and are left out: by default
        the reach at the exchange's now; pass `reach_at_ms` (e.g. when the store began
        polling) to use the reach at that instant instead (see `reachable_from`). `price`:
        the price component, where the dialect has several (OANDA: "M" default, "B", "A")."""
        now = self.now_ms()
        reach = self.reachable_from(symbol, interval, now if reach_at_ms is None else reach_at_ms)
        # the candles that open before `end_ms` and have closed by now: those opening before
        # `until` on the interval's grid. Closed candles never change, so the same question
        # (tests ask it many times a second while they wait) has the same answer until the
        # history changes (a listing, a market)
        until = align_up(min(end_ms, now - INTERVALS[interval][0] + 1), interval)
        key = (symbol, interval, start_ms, until, reach, price, self._omit_empty, self.history.version)
        hit = self._expected_memo.get(key)
        if hit is None:
            dialect = self.dialect
            hit = tuple(self.history.expected_candles(symbol, interval, start_ms, until, now,
                                                      omit_empty=self._omit_empty,
                                                      reachable_from_ms=reach,
                                                      row=lambda m, c: dialect.ohlcv(m, c, price)))
            if len(self._expected_memo) >= 256:
                self._expected_memo.clear()
            self._expected_memo[key] = hit
        return list(hit)

    def reachable_from(self, symbol: str, interval: str, at_ms: int | None = None) -> int:
        """Open time of the oldest candle of `symbol` a client can fetch at `at_ms` (default
        the exchange's now): the listing/history start, or later where the exchange's
        history is short (Kraken: the last 720 candles)."""
        at = self.now_ms() if at_ms is None else at_ms
        return self.dialect.reachable_from(self.venue, symbol, interval, at)

    # ------------------------------------------------------------------- serving
    def _ctx(self, headers: Mapping[str, str] | None = None) -> Ctx:
        return Ctx(venue=self.venue, now_ms=self.now_ms(), poison=self._poison_of,
                   caps=self._caps, omit_empty=self._omit_empty, headers=headers or {})

    def _poison_of(self, m: Market) -> PoisonKind | None:
        """Poison keyed by unified symbol ("BTC/USDT") or by the dialect's id ("BTC-USDT")."""
        kind = self._injector.poison_for(m.id)
        if kind is None and self._injector.faults.poisoned:
            kind = self._injector.poison_for(self.dialect.market_id(m))
        return kind

    def _date_header(self) -> str | None:
        if not self.faults.date_header:
            return None
        return email.utils.formatdate(self.now_ms() / 1000, usegmt=True)

    def _serve(self, h: Handler) -> None:
        split = urlsplit(h.path)
        path = split.path
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        ctx = self._ctx({k.lower(): v for k, v in h.headers.items()})
        charges = self.dialect.limits(path)
        meters = self.dialect.meters
        decision = self._injector.decide(path, lambda: meters.try_charge(charges, ctx.now_ms))
        if not self.faults.documented_limits:
            meters.charge(charges, ctx.now_ms)  # counted all the same: the headers tell it
        if decision is None:
            listing = self.dialect.listing_kind(path, params)
            status = self.faults.fail_listing.get(listing) if listing is not None else None
            if status is not None:
                self._respond(h, path, ctx, params, self.dialect.failing_listing(status, ctx),
                              FaultKind.LISTING)
            else:
                self._respond(h, path, ctx, params, self._route(path, params, ctx), None)
            return
        kind = decision.kind
        if kind in (FaultKind.RESET, FaultKind.OUTAGE) and decision.status is None:
            self._stats.record(path, params, None, kind)
            self._reset(h)
        elif kind is FaultKind.STALL:
            self._stats.record(path, params, None, kind)
            self._stopping.wait(self.faults.stall_s)
            h.close_connection = True
        elif kind in (FaultKind.TRUNCATED, FaultKind.SHORT_READ, FaultKind.TRICKLE):
            self._respond(h, path, ctx, params, self._route(path, params, ctx), kind)
        elif kind in (FaultKind.HTTP_429, FaultKind.RATE_LIMIT):
            self._respond(h, path, ctx, params,
                          self.dialect.rate_limited(decision.retry_after_s or 1, ctx), kind)
        elif kind in (FaultKind.HTTP_418, FaultKind.BAN):
            retry = decision.retry_after_s or 1
            self._respond(h, path, ctx, params,
                          self.dialect.banned(retry, ctx.now_ms + retry * 1000, ctx), kind)
        else:  # 5xx (random or outage)
            self._respond(h, path, ctx, params,
                          self.dialect.server_error(decision.status or 503, ctx), kind)

    def _route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        return self.dialect.route(path, params, ctx)

    def _respond(self, h: Handler, path: str, ctx: Ctx, params: Mapping[str, str],
                 reply: Reply, fault: FaultKind | None) -> None:
        if fault is None and reply.poisoned:
            fault = FaultKind.POISON
        self._stats.record(path, params, reply.status, fault)
        body = reply.body
        length = len(body)
        if fault is FaultKind.TRUNCATED:
            body = body[: len(body) // 2]
            length = len(body)
        elif fault is FaultKind.SHORT_READ:
            body = body[: len(body) // 2]
        try:
            h.send_response(reply.status)
            h.send_header("Content-Type", reply.content_type)
            h.send_header("Content-Length", str(length))
            headers = {k.lower(): (k, v) for k, v in self.dialect.headers(path, ctx).items()}
            headers.update({k.lower(): (k, v) for k, v in reply.headers.items()})
            for k, v in headers.values():
                h.send_header(k, v)
            if fault is FaultKind.SHORT_READ:
                h.send_header("Connection", "close")
                h.close_connection = True
            h.end_headers()
            if fault is FaultKind.TRICKLE:
                self._trickle(h, body)
            else:
                h.wfile.write(body)
            h.wfile.flush()
        except OSError:
            h.close_connection = True  # client went away (e.g. timed out); nothing to do

    def _trickle(self, h: Handler, body: bytes) -> None:
        """Send `body` at `trickle_bytes_per_s`: every single read gets data soon enough, the
        whole response takes len/rate seconds. `stop()` cuts it short."""
        h.wfile.flush()
        rate = self.faults.trickle_bytes_per_s
        step = max(1, int(rate / 50))  # at most ~50 writes per second
        for i in range(0, len(body), step):
            if i and self._stopping.wait(step / rate):
                h.close_connection = True
                return
            h.wfile.write(body[i:i + step])
            h.wfile.flush()

    def _reset(self, h: Handler) -> None:
        h.close_connection = True
        self._httpd.mark_abort(h.connection)


class BinanceSimulator(ExchangeSimulator):
    """The Binance dialect with the original defaults: only `symbols` are listed (no
    catalogue) and they default to `DEFAULT_SYMBOLS`."""

    def __init__(self, symbols: Sequence[str] = DEFAULT_SYMBOLS, *, catalogue: bool = False,
                 name: str = "binance", **kwargs: Any) -> None:
        super().__init__(symbols, dialect="binance", catalogue=catalogue, name=name, **kwargs)
