"""A loopback WebSocket server speaking one exchange's public kline stream dialect.

One `WsSimulator` = one exchange on one port, with its own thread and asyncio loop, so the
client under test (ccxt.pro in its own loop, or the daemon's actors) never shares a loop
with it. It can share the `CandleHistory` and clock of a REST simulator of the same exchange
(`WsSimulator.sharing(rest_sim, "binance")`): a candle closed over WS and over REST is then
the same candle. The socket is bound in the constructor; `start()` begins serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web

from ..history import CandleHistory, align_down
from ..ratelimit import SlidingWindowLimiter, retry_after_header
from ..server import DEFAULT_SYMBOLS, wall_clock_ms
from .dialects import Dialect, Rules
from .dialects import dialect as dialect_named
from .faults import StreamFaultInjector, StreamFaults
from .markets import market_routes
from .session import ServerContext, Session
from .stats import Stats, WsStats

log = logging.getLogger(__name__)


class HasHistory(Protocol):
    """What `WsSimulator.sharing` needs of a REST simulator."""

    history: CandleHistory
    now_ms: Callable[[], int]


class WsSimulator:
    """One simulated exchange's public kline streams on loopback.

    exchange: "binance", "okx" or "bybit" (or a `Dialect`).
    history / now_ms: the candle source and clock; default a fresh `CandleHistory` over
        `symbols` and the wall clock. Pass a REST simulator's to share them (see `sharing`).
    update_period_s: in-progress push period per stream (default: the exchange's own).
    rules: pacing, keepalive and limits; default the exchange's documented ones
        (`dialect.rules`), e.g. `dataclasses.replace(sim.rules, max_age_s=1.0)`.
    faults: initial `StreamFaults`; change them at run time with `set_faults`.
    prompt_finals: wake every stream when its candle closes (default: when `now_ms` is the
        wall clock); with an injected clock call `wake()` after moving it.
    serve_markets: also answer the exchange's REST market-listing route (see `markets`).
    """

    def __init__(self, exchange: str | Dialect, symbols: Sequence[str] = DEFAULT_SYMBOLS, *,
                 history: CandleHistory | None = None,
                 now_ms: Callable[[], int] = wall_clock_ms,
                 history_start_ms: int | None = None, seed: int = 0,
                 gaps: Mapping[str, Iterable[int]] | None = None,
                 host: str = "127.0.0.1", port: int = 0,
                 update_period_s: float | None = None, rules: Rules | None = None,
                 faults: StreamFaults | None = None, prompt_finals: bool | None = None,
                 serve_markets: bool = True) -> None:
        self.dialect: Dialect = (dialect_named(exchange) if isinstance(exchange, str)
                                 else exchange)
        self.name = self.dialect.name
        self.now_ms = now_ms
        if history is None:
            if history_start_ms is None:
                history_start_ms = align_down(now_ms(), "1d") - 86_400_000
            history = CandleHistory(symbols, history_start_ms, seed=seed, gaps=gaps)
        self.history = history
        rules = rules or self.dialect.rules
        if update_period_s is not None:
            rules = dataclasses.replace(rules, update_period_s=update_period_s)
        self._rules = rules
        self._injector = StreamFaultInjector(faults)
        self._stats = Stats()
        self._prompt = now_ms is wall_clock_ms if prompt_finals is None else prompt_finals
        self._serve_markets = serve_markets
        self._sessions: dict[int, Session] = {}
        self._conn_no = 0
        self._handshake_limiter: SlidingWindowLimiter | None = None
        self._limiter_rule: tuple[int, float] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: ServerContext | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._lifecycle = threading.Lock()
        self._stopped = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        self._sock.setblocking(False)
        self.host = host
        self.port: int = self._sock.getsockname()[1]

    @classmethod
    def sharing(cls, rest: HasHistory, exchange: str | Dialect = "binance",
                **kwargs: Any) -> WsSimulator:
        """A stream server over the same candles and clock as the REST simulator `rest` (any
        simulator with `.history` and `.now_ms`, e.g. `BinanceSimulator`)."""
        return cls(exchange, history=rest.history, now_ms=rest.now_ms, **kwargs)

    # ------------------------------------------------------------------ addresses
    @property
    def ws_base(self) -> str:
        """"ws://127.0.0.1:PORT": see `simulator.ws.ccxt_pro.point_at` for ccxt's URLs."""
        return f"ws://{self.host}:{self.port}"

    @property
    def http_base(self) -> str:
        """REST base for the market-listing route, e.g. "http://127.0.0.1:PORT"."""
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> WsSimulator:
        """Begin serving (idempotent). Returns self."""
        with self._lifecycle:
            if self._stopped:
                raise RuntimeError("a stopped WsSimulator cannot be restarted; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"wssim-{self.name}-{self.port}")
                self._thread.start()
                self._ready.wait()
        return self

    def stop(self) -> None:
        """Close every connection (1001), the listener, the loop; join the thread."""
        with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                self._sock.close()
                return
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join()

    def __enter__(self) -> WsSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
            self._ready.set()
            loop.run_forever()
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _startup(self) -> None:
        self._ctx = ServerContext(
            dialect=self.dialect, history=self.history, now_ms=self.now_ms,
            injector=self._injector, stats=self._stats, rules=lambda: self._rules,
            prompt_finals=self._prompt, wake=asyncio.Event())
        app = web.Application()
        for route in self.dialect.ws_routes:
            app.router.add_get(route, self._handle)
        if self._serve_markets:
            app.add_routes(market_routes(self.name, self.history, self.now_ms))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock, shutdown_timeout=0.5).start()

    async def _shutdown(self) -> None:
        sessions = list(self._sessions.values())
        await asyncio.gather(*(s.close(1001, "server shutting down") for s in sessions),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------- serving
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._ctx is not None
        refusal = self._refuse_handshake()
        if refusal is not None:
            return refusal
        ws = web.WebSocketResponse(autoping=False, timeout=2.0, max_msg_size=1 << 20)
        await ws.prepare(request)
        conn_no = self._conn_no
        self._conn_no += 1
        session = Session(self._ctx, ws, request, conn_no)
        self._sessions[conn_no] = session
        self._stats.opened()
        try:
            await session.run()
        finally:
            self._sessions.pop(conn_no, None)
            self._stats.closed()
            if not ws.closed:
                await ws.close()
        return ws

    def _refuse_handshake(self) -> web.Response | None:
        status = self._injector.faults.handshake_status
        if status is not None:
            self._stats.add("handshakes_refused")
            return web.Response(status=status, text="simulated handshake refusal")
        rule = self._rules.max_connections_per_window
        if rule != self._limiter_rule:
            self._limiter_rule = rule
            self._handshake_limiter = SlidingWindowLimiter(*rule) if rule else None
        if self._handshake_limiter is None:
            return None
        wait = self._handshake_limiter.try_acquire(time.monotonic())
        if wait is None:
            return None
        self._stats.add("handshakes_refused")
        return web.Response(status=429, text="Too many connection attempts",
                            headers={"Retry-After": str(retry_after_header(wait))})

    # --------------------------------------------------------------- run-time knobs
    @property
    def faults(self) -> StreamFaults:
        return self._injector.faults

    def set_faults(self, faults: StreamFaults) -> None:
        """Swap the whole fault config (see `StreamFaultInjector.configure`)."""
        self._injector.configure(faults)
        self.wake()

    def update_faults(self, **changes: Any) -> StreamFaults:
        """`set_faults(dataclasses.replace(current, **changes))`; returns the new config."""
        new = dataclasses.replace(self.faults, **changes)
        self.set_faults(new)
        return new

    @property
    def rules(self) -> Rules:
        return self._rules

    def set_rules(self, rules: Rules) -> None:
        """Change pacing, keepalive or limits for every connection, open ones included."""
        self._rules = rules
        self.wake()

    def update_rules(self, **changes: Any) -> Rules:
        new = dataclasses.replace(self._rules, **changes)
        self.set_rules(new)
        return new

    def wake(self) -> None:
        """Make every stream look at the clock now (call after moving an injected clock)."""
        loop, ctx = self._loop, self._ctx
        if loop is None or ctx is None or loop.is_closed():
            return

        def _wake() -> None:
            old, ctx.wake = ctx.wake, asyncio.Event()
            old.set()
        try:
            loop.call_soon_threadsafe(_wake)
        except RuntimeError:  # loop closed meanwhile
            pass

    def drop_connections(self, *, reset: bool = True) -> int:
        """Drop every open connection now: TCP RST (`reset`) or a 1011 close frame.
        Returns how many were dropped."""
        loop = self._loop
        if loop is None:
            return 0

        async def _drop() -> int:
            sessions = list(self._sessions.values())
            for s in sessions:
                if reset:
                    s.reset()
                else:
                    await s.close(1011, "simulated drop")
            return len(sessions)
        return asyncio.run_coroutine_threadsafe(_drop(), loop).result(timeout=10)

    # ---------------------------------------------------------------------- stats
    def stats(self) -> WsStats:
        return self._stats.snapshot()

    def wait_for(self, predicate: Callable[[WsStats], bool], timeout: float = 10.0) -> WsStats:
        """Block until `predicate(self.stats())` holds (from a thread, not the client's
        loop: use `await asyncio.to_thread(sim.wait_for, ...)` there)."""
        return self._stats.wait_for(predicate, timeout)

    def topics(self) -> list[list[str]]:
        """Per open connection (accept order), the exchange names of its live topics."""
        loop = self._loop
        if loop is None:
            return []

        async def _topics() -> list[list[str]]:
            return [list(s.view.topics) for _, s in sorted(self._sessions.items())]
        return asyncio.run_coroutine_threadsafe(_topics(), loop).result(timeout=10)

    # --------------------------------------------------------------------- oracle
    def expected_candles(self, symbol: str, interval: str, start_ms: int,
                         end_ms: int) -> list[tuple[int, float, float, float, float, float]]:
        """Closed candles in [start_ms, end_ms) at the server's now, as ccxt parses them."""
        return self.history.expected_candles(symbol, interval, start_ms, end_ms, self.now_ms())
