"""One client WebSocket connection: its topics, its pushes, its keepalive and its faults.

A `Session` runs three coroutines on the server's loop: the receive loop (subscriptions,
pings), the pusher (kline updates every `update_period_s`, finals when candles close) and the
watchdog (server pings, pong timeout, idle close, maximum age). Everything it says is worded
by the dialect; every decision about faults comes from the shared `StreamFaultInjector`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from .dialects import Dialect, Op, Refusal, Request, Resolved, SessionView, Topic
from .faults import StallMode, StreamFault, StreamFaultInjector
from .pacer import KlineCursor
from .stats import Stats

if TYPE_CHECKING:
    from ..history import Candle, CandleHistory
    from .dialects import Rules

log = logging.getLogger(__name__)

_LINGER_RST = struct.pack("ii", 1, 0)
CLOSE_EXPIRED = 1001  # going away: the connection reached its maximum age
CLOSE_DROPPED = 1011  # internal error: a DROP_CLOSE fault
CLOSE_IDLE = 4004  # OKX: "No data received in 30s" (ccxt maps 4004 to NetworkError)
CLOSE_PONG_TIMEOUT = 1008


@dataclass
class ServerContext:
    """What sessions share with their server (read on every use: rules and faults can change
    at run time)."""

    dialect: Dialect
    history: CandleHistory
    now_ms: Callable[[], int]
    injector: StreamFaultInjector
    stats: Stats
    rules: Callable[[], Rules]
    prompt_finals: bool  # wake at candle close (wall clock) rather than only every period
    wake: asyncio.Event  # set to make pushers look at the clock now (after a clock jump)


class Session:
    """See the module docstring. `conn_no` numbers connections from 0 in accept order."""

    def __init__(self, ctx: ServerContext, ws: web.WebSocketResponse, request: web.Request,
                 conn_no: int) -> None:
        self.ctx = ctx
        self.ws = ws
        self.request = request
        self.conn_no = conn_no
        self.view = SessionView(conn_id=f"sim{conn_no:04d}")
        self._cursors: dict[str, KlineCursor] = {}
        self._held: str | None = None  # a REORDERed push waiting for the next one
        self._incoming: deque[float] = deque()
        now = time.monotonic()
        self._opened = now
        self._last_sent = now
        self._ping_outstanding_since: float | None = None
        self._last_server_ping = now
        self._closing = False
        self._new_topics = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        topics, combined = self.ctx.dialect.initial_topics(
            self.request.path, self.request.query, self.ctx.history)
        self.view.combined = combined
        for t in topics:
            self._add_topic(t)
        tasks = [asyncio.ensure_future(self._pusher()), asyncio.ensure_future(self._watchdog())]
        try:
            await self._receive_loop()
        finally:
            self._closing = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self, code: int, reason: str = "") -> None:
        """Close with a close frame (the client sees `code`)."""
        if self._closing:
            return
        self._closing = True
        try:
            await self.ws.close(code=code, message=reason.encode())
        except (ConnectionError, RuntimeError):
            pass

    def reset(self) -> None:
        """Drop the TCP connection with an RST, no close frame."""
        self._closing = True
        transport = self.request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        transport.abort()

    # -------------------------------------------------------------------- receive
    async def _receive_loop(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type is WSMsgType.PING:
                if self._stall() is not StallMode.SILENT:
                    self.ctx.stats.add("pings_answered")
                    await self._send_frame(functools.partial(self.ws.pong, msg.data))
            elif msg.type is WSMsgType.PONG:
                self.ctx.stats.add("pongs_received")
                self._ping_outstanding_since = None
            if self._closing:
                break

    async def _on_text(self, text: str) -> None:
        rules = self.ctx.rules()
        if rules.max_incoming_per_s is not None and self._over_rate(rules.max_incoming_per_s):
            self.ctx.stats.fault(StreamFault.OVER_RATE)
            frames, code = self.ctx.dialect.over_rate(self.view)
            for f in frames:
                await self._send(f)
            if code is not None:
                await self.close(code, "Too many requests")
            return
        if self._stall() is StallMode.SILENT:
            return
        req = self.ctx.dialect.parse(text)
        if req.op is Op.SUBSCRIBE:
            await self._subscribe(req)
        elif req.op is Op.UNSUBSCRIBE:
            await self._unsubscribe(req)
        else:
            if req.op is Op.PING:
                self.ctx.stats.add("pings_answered")
            for f in self.ctx.dialect.reply(req, self.view):
                await self._send(f)

    def _over_rate(self, limit: int) -> bool:
        now = time.monotonic()
        q = self._incoming
        while q and q[0] <= now - 1.0:
            q.popleft()
        q.append(now)
        return len(q) > limit

    async def _subscribe(self, req: Request) -> None:
        ctx, rules = self.ctx, self.ctx.rules()
        ctx.stats.add("subscribe_requests")
        resolved = [ctx.dialect.resolve(a, ctx.history) for a in req.args]
        if rules.max_args_per_request is not None and len(req.args) > rules.max_args_per_request:
            resolved = [Resolved(r.arg, None, Refusal.TOO_MANY_ARGS) for r in resolved]
        accepted: list[Topic] = []
        refused: list[Resolved] = []
        room = (None if rules.max_streams_per_connection is None
                else rules.max_streams_per_connection - len(self.view.topics))
        for r in resolved:
            if r.topic is not None and ctx.injector.refuses(self.conn_no, r.topic.key.symbol_id):
                ctx.stats.fault(StreamFault.REFUSE)
                r = Resolved(r.arg, None, Refusal.INJECTED)
            if r.topic is None:
                refused.append(r)
            elif r.topic.name in self.view.topics or r.topic.name in (t.name for t in accepted):
                accepted.append(r.topic)  # already live: acknowledged, not counted twice
            elif room is not None and room <= 0:
                refused.append(Resolved(r.arg, None, Refusal.TOO_MANY_STREAMS))
            else:
                accepted.append(r.topic)
                room = None if room is None else room - 1
        if refused and ctx.dialect.atomic_subscribe:
            accepted = []
        ctx.stats.add("refused", len(refused))
        new = [t for t in accepted if t.name not in self.view.topics]
        for t in new:
            self._add_topic(t)
        ctx.stats.add("subscribed", len(new))
        for f in ctx.dialect.acks(req, accepted, refused, self.view):
            await self._send(f)
        if new:
            self._new_topics.set()  # first update right away, as the exchanges do

    async def _unsubscribe(self, req: Request) -> None:
        ctx = self.ctx
        gone: list[Topic] = []
        for a in req.args:
            r = ctx.dialect.resolve(a, ctx.history)
            if r.topic is not None and r.topic.name in self.view.topics:
                gone.append(self.view.topics[r.topic.name])
        for t in gone:
            del self.view.topics[t.name]
            self._cursors.pop(t.name, None)
        for f in ctx.dialect.acks(req, gone, [], self.view):
            await self._send(f)

    def _add_topic(self, t: Topic) -> None:
        ms, off = self.ctx.dialect.align(t)
        self.view.topics[t.name] = t
        self._cursors[t.name] = KlineCursor(self.ctx.history, t.key.symbol_id, t.key.interval,
                                            ms, off, self.ctx.now_ms())

    # --------------------------------------------------------------------- pushes
    async def _pusher(self) -> None:
        """One pass per update period (and at each close): every stream's owed pushes, the
        finals of all streams before any update in progress, as an exchange sends a close: its
        finals at the close, the new candles' first updates after them."""
        ctx = self.ctx
        while not self._closing:
            self._new_topics.clear()
            now = ctx.now_ms()
            finals: list[tuple[Topic, Any, Candle, bool]] = []
            updates: list[tuple[Topic, Any, Candle, bool]] = []
            for name, cursor in list(self._cursors.items()):
                topic = self.view.topics.get(name)
                market = ctx.history.market(topic.key.symbol_id) if topic else None
                if topic is None:
                    continue
                for due in cursor.due(now):
                    if market is None:  # Binance: an unknown symbol's stream stays silent
                        continue
                    (finals if due.closed else updates).append((topic, market, due.candle, due.closed))
            for topic, market, candle, closed in finals + updates:
                if closed and ctx.injector.stale(self.conn_no):
                    ctx.stats.fault(StreamFault.STALE_FINAL)
                    candle = candle._replace(volume=f"{float(candle.volume) * 0.9:.8f}")
                await self._push(ctx.dialect.push(topic, market, candle, closed, now, self.view,
                                                  ctx.rules().closed_flag), closed)
                if self._closing:
                    return
            await self._sleep_until_next(now)

    async def _sleep_until_next(self, started_ms: int) -> None:
        """Sleep until the next pass is due: one update period after this pass began (a pass over
        a thousand streams takes a while: counting from its end would stretch the exchange's
        pace), or, with prompt finals, at the next close after it began, at once if the pass
        ran past it (finals go out when the candle closes, not a pass later)."""
        now_ms = self.ctx.now_ms()
        wait = max(0.0, self.ctx.rules().update_period_s - (now_ms - started_ms) / 1000.0)
        if self.ctx.prompt_finals and self._cursors:
            to_close = min(c.next_close_ms(started_ms) for c in self._cursors.values()) - now_ms
            wait = min(wait, max(0.0, to_close / 1000.0) + 0.002)
        await self._wait_wake(wait, self._new_topics)

    async def _wait_wake(self, timeout: float, *events: asyncio.Event) -> None:
        """Sleep `timeout`, or less if the server wakes everyone (clock, rules or faults
        changed) or one of `events` is set."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.ctx.wake, *events)]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _push(self, frame: str, closed: bool) -> None:
        ctx = self.ctx
        if self._stall() is not None:
            ctx.stats.fault(StreamFault.STALL)
            return
        kind = ctx.injector.draw(self.conn_no, closed)
        if kind is not None:
            ctx.stats.fault(kind)
        if kind is StreamFault.DROP_RESET:
            self.reset()
            return
        if kind is StreamFault.DROP_CLOSE:
            await self.close(CLOSE_DROPPED, "simulated drop")
            return
        if kind in (StreamFault.MISS, StreamFault.MISS_FINAL):
            return
        if kind is StreamFault.REORDER and self._held is None:
            self._held = frame
            return
        held, self._held = self._held, None
        ctx.stats.add("finals" if closed else "updates")  # counted before the client sees it
        await self._send(frame)
        if kind is StreamFault.DUPLICATE:
            await self._send(frame)
        if held is not None:
            await self._send(held)

    # ------------------------------------------------------------------- watchdog
    async def _watchdog(self) -> None:
        while not self._closing:
            rules = self.ctx.rules()
            now = time.monotonic()
            silent = self._stall() is StallMode.SILENT
            if rules.max_age_s is not None and now - self._opened >= rules.max_age_s:
                self.ctx.stats.fault(StreamFault.EXPIRE)
                for f in self.ctx.dialect.expiry_notice(self.ctx.now_ms(), self.view):
                    await self._send(f)
                await self.close(CLOSE_EXPIRED, "connection lifetime expired")
                return
            if rules.idle_close_s is not None and now - self._last_sent >= rules.idle_close_s:
                self.ctx.stats.fault(StreamFault.IDLE)
                await self.close(CLOSE_IDLE, "No data received in 30s")
                return
            if (rules.pong_timeout_s is not None and self._ping_outstanding_since is not None
                    and now - self._ping_outstanding_since >= rules.pong_timeout_s):
                self.ctx.stats.fault(StreamFault.PONG_TIMEOUT)
                await self.close(CLOSE_PONG_TIMEOUT, "pong timeout")
                return
            if (rules.server_ping_s is not None and not silent
                    and now - self._last_server_ping >= rules.server_ping_s):
                self._last_server_ping = now
                self.ctx.stats.add("server_pings")
                if self._ping_outstanding_since is None:
                    self._ping_outstanding_since = now
                await self._send_frame(lambda: self.ws.ping(str(self.ctx.now_ms()).encode()))
            await self._wait_wake(self._watch_period(rules))

    @staticmethod
    def _watch_period(rules: Rules) -> float:
        spans = [s for s in (rules.max_age_s, rules.idle_close_s, rules.pong_timeout_s,
                             rules.server_ping_s) if s is not None]
        return min([1.0] + [s / 4.0 for s in spans]) if spans else 1.0

    # -------------------------------------------------------------------- sending
    def _stall(self) -> StallMode | None:
        return self.ctx.injector.faults.stall

    async def _send(self, text: str) -> None:
        await self._send_frame(lambda: self.ws.send_str(text))

    async def _send_frame(self, make: Callable[[], object]) -> None:
        if self._closing or self.ws.closed:
            return
        try:
            await make()  # type: ignore[misc]
            self._last_sent = time.monotonic()
        except (ConnectionError, RuntimeError) as e:  # the client went away mid-send
            log.debug("send on %s failed: %s", self.view.conn_id, e)
            self._closing = True
