"""The stream actor: one exchange's live candles over WebSocket (ccxt.pro), under its supervisor.

Series join it (`StreamJoin`) and it keeps them subscribed on as few connections as the
exchange allows (`sources.ccxt_stream.Feed`, one ccxt.pro client each, at most
`streams_per_connection` streams). The connections run on the actor's own asyncio loop thread
(`sources.loop.LoopThread`), so its mailbox never waits on a socket; frames are sorted there
(`market.streamed.CloseTracker`: closed candles only, by the exchange's flag or, without one, by
a later candle and the exchange's clock) and told to the actor in small batches.

Closed candles of caught-up series are stored by this actor, one `Write` per burst (all 1m
candles close at the same instant: 1,000 series of an exchange make one write, not 1,000), the
same idempotent write as REST's, so a candle both paths see is stored once. Each series is told
afterwards (`StreamedCandles`), once the close's burst is parsed (`WORD_DELAY_S`) and paced:
waking thousands of series threads at once costs seconds of CPU in lock convoys, and nothing
waits for it, since the candle is already stored; a series that has not heard yet when its
fallback timer fires reads the `StreamLedger` (what the stream took) instead of asking REST.

Each series is told when its subscription is up (its first frame since the stream last
(re)subscribed) and when it is not (`StreamState`); it polls over REST meanwhile. A subscription
that shows nothing within `idle_s` (refused, or a stream the exchange never serves) is asked
again in halves until the culprits are found, then slowly; those series stay on REST.

Resilience: a connection that drops or stalls (no frame for `idle_s`) is reconnected after a
full-jitter backoff (the resilience layer's `RetryPolicy`), and the stream's own
`CircuitBreaker` (it outlives restarts) stops connection attempts after repeated failures until
its probe. New connections are spaced as the exchange requires. Every wait is a timer message.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pykka

from ..resilience.breaker import CircuitBreaker
from ..resilience.retry import RetryConfig
from ..supervisors.child import Address, Child
from ..supervisors.clock import WallClock
from .market.candles import Candle, timeframe_ms
from .market.closing import ServerClock
from .market.errors import describe
from .market.streamed import STREAM_WRITE_PATIENCE_S, CloseTracker, StreamLedger
from .messages import (
    Reset,
    SeriesKey,
    StreamedCandles,
    StreamJoin,
    StreamLeave,
    StreamState,
    StreamStatus,
    Write,
    Written,
)
from .sources.ccxt_stream import Feed, Pair, StreamDown, StreamProfile
from .sources.loop import LoopThread

ClientFactory = Callable[[WallClock, list[str]], Any]  # (wall clock, symbols) -> a tapped ccxt.pro client

FLUSH_S = 0.02  # frames are told to the actor in batches at most this old (a close's burst is one)
COUNT_FLUSH_S = 1.0  # message counts alone are told this often
PLAN_S = 0.2  # joins are gathered this long before new subscriptions go out
NOTIFY_TICK_S = 0.01
# What a write stored is told to its series this long after the write: all 1m candles close at
# the same instant, and at 10,000 series, thousands of series threads woken while the loop
# threads still parse that close's burst of finals take the GIL from them (the finals of the
# last connections wait). Nothing waits for the word: the candle is stored, and a series whose
# fallback timer fires first reads the ledger (`market.streamed.StreamLedger`).
WORD_DELAY_S = 2.0
HELD = 2  # closed candles kept for a series that is not live yet (the last close's, and one more)
WRITE_TIMEOUT_S = STREAM_WRITE_PATIENCE_S  # a write unanswered this long is forgotten (REST has it)
PARK_FIRST_S = 60.0  # a subscription refused on its own is asked again after this, doubling
PARK_MAX_S = 1800.0


@dataclass(frozen=True)
class StreamSettings:
    """What the stream actor needs, built from `[exchanges.NAME]` by `candlekeeper.app.settings`."""

    name: str  # the config's name for the exchange
    client: ClientFactory
    profile: StreamProfile
    timeout: float = 10.0
    retry: RetryConfig = RetryConfig()
    max_reconnect: float = 15.0  # the longest wait between connection attempts (`stream_max_recovery`)
    idle_s: float | None = None  # None: the profile's
    notify_per_s: float = 2000.0  # stream -> series tells a second at most (see the module docstring)
    # the exchange actor's market list (None: each client loads its own, as in tests of the actor alone)
    markets: Callable[[], list[dict[str, Any]] | None] | None = None

    @property
    def idle(self) -> float:
        return self.idle_s if self.idle_s is not None else self.profile.idle_s


# -- messages the actor tells itself -------------------------------------------------------------


@dataclass(frozen=True)
class _Frames:
    """From the loop: closed candles, series seen for the first time since their connection
    (re)subscribed, subscribe requests refused, and how many frames arrived."""

    closed: tuple[tuple[SeriesKey, Candle], ...] = ()
    seen: tuple[tuple[int, int, SeriesKey], ...] = ()  # (feed, epoch, key)
    refused: tuple[tuple[SeriesKey, str], ...] = ()
    asked: tuple[tuple[SeriesKey, float], ...] = ()  # subscribe requests sent, when (the runtime's clock)
    frames: int = 0


@dataclass(frozen=True)
class _FeedEnded:
    fid: int
    epoch: int
    error: BaseException


@dataclass(frozen=True)
class _Connect:
    fid: int


@dataclass(frozen=True)
class _Confirm:
    fid: int
    epoch: int


@dataclass(frozen=True)
class _Retry:
    fid: int
    epoch: int
    keys: tuple[SeriesKey, ...]
    batch: int


class _Plan:
    pass


class _Notify:
    pass


class _Words:
    pass


_PLAN, _NOTIFY, _WORDS = _Plan(), _Notify(), _Words()


# -- the loop side ---------------------------------------------------------------------------------


class _Dispatch:
    """Frames in (on the loop thread), batches out to the actor (see `_Frames`)."""

    def __init__(self, name: str, actor: pykka.ActorRef[Any], clock: ServerClock, wall: WallClock,
                 loop: Any, ledger: StreamLedger) -> None:
        self.name = name
        self.ledger = ledger
        self.actor = actor
        self.clock = clock
        self.wall = wall
        self.loop = loop
        self.wanted: dict[Pair, SeriesKey] = {}  # replaced whole from the actor's thread
        self.trackers: dict[SeriesKey, CloseTracker] = {}
        self.seen: dict[int, tuple[int, set[SeriesKey]]] = {}  # feed -> (epoch, keys seen)
        self._closed: list[tuple[SeriesKey, Candle]] = []
        self._new: list[tuple[int, int, SeriesKey]] = []
        self._refused: list[tuple[SeriesKey, str]] = []
        self._asked: list[tuple[SeriesKey, float]] = []
        self._frames = 0
        self._flush_at: float | None = None

    def begin(self, fid: int, epoch: int) -> None:
        self.seen[fid] = (epoch, set())

    def sink(self, fid: int) -> _FeedSink:
        return _FeedSink(self, fid)

    def frame(self, fid: int, symbol: str, timeframe: str, ts: int, closed: bool | None, event_ms: int | None,
              row: tuple[Any, ...] | None) -> None:
        key = self.wanted.get((symbol, timeframe))
        if key is None:
            return  # a stream nobody wants any more (it goes at the next reconnect)
        self.ledger.saw(key, timeframe, ts, self.wall)
        self._frames += 1
        epoch, seen = self.seen.get(fid, (0, set()))
        urgent = False
        if key not in seen:
            seen.add(key)
            self._new.append((fid, epoch, key))
            urgent = True
        if closed is not False:
            tracker = self.trackers.get(key)
            if tracker is None:
                tracker = self.trackers[key] = CloseTracker(timeframe_ms(timeframe))
            now_ms = self.clock.now_ms(int(self.wall() * 1000))
            candles = tracker.frame(ts, closed, event_ms, row, now_ms, self.clock.margin_ms())
            if candles:
                self._closed.extend((key, c) for c in candles)
                # in hand from now: the ledger says so at once, not when the actor (busy at a
                # close) has taken the batch, or the series' timer would find the stream past
                # the close without its candle and ask REST for it
                self.ledger.took(key, max(c[0] for c in candles))
                urgent = True
        self._schedule(FLUSH_S if urgent else COUNT_FLUSH_S)

    def asked(self, fid: int, pairs: Sequence[Pair], at: float) -> None:
        for pair in pairs:
            key = self.wanted.get(pair)
            if key is not None:
                self._asked.append((key, at))
        self._schedule(FLUSH_S)

    def refused(self, fid: int, pairs: Sequence[Pair], why: str) -> None:
        for pair in pairs:
            key = self.wanted.get(pair)
            if key is not None:
                self._refused.append((key, why))
        self._schedule(FLUSH_S)

    def _schedule(self, delay: float) -> None:
        at = self.loop.time() + delay
        if self._flush_at is not None and self._flush_at <= at:
            return
        self._flush_at = at
        self.loop.call_at(at, self._flush, at)

    def _flush(self, at: float) -> None:
        if self._flush_at != at:
            return  # a sooner flush replaced this one
        self._flush_at = None
        msg = _Frames(tuple(self._closed), tuple(self._new), tuple(self._refused), tuple(self._asked), self._frames)
        self._closed, self._new, self._refused, self._asked, self._frames = [], [], [], [], 0
        try:
            self.actor.tell(msg)
        except pykka.ActorDeadError:
            pass  # stopping


@dataclass
class _FeedSink:
    dispatch: _Dispatch
    fid: int

    def frame(self, symbol: str, timeframe: str, ts: int, closed: bool | None, event_ms: int | None,
              row: tuple[Any, ...] | None) -> None:
        self.dispatch.frame(self.fid, symbol, timeframe, ts, closed, event_ms, row)

    def asked(self, pairs: Sequence[Pair], at: float) -> None:
        self.dispatch.asked(self.fid, pairs, at)

    def refused(self, pairs: Sequence[Pair], why: str) -> None:
        self.dispatch.refused(self.fid, pairs, why)


# -- the actor's bookkeeping -------------------------------------------------------------------------


@dataclass
class _Member:
    """One series that joined."""

    ref: pykka.ActorRef[Any]
    live: bool
    fid: int | None = None
    up: bool = False
    refused: str | None = None
    asked_at: float | None = None  # its last subscribe request went out then (None: not yet, or judged)
    alone: bool = False  # was asked for in a request of its own since it was last up
    parked_for: float = 0.0  # the last retry delay of a subscription silent on its own
    # closed candles parsed while it was not live (backfilling): stored when it joins live, so a
    # series that catches up just after a close is not left waiting for a candle its stream
    # parsed (the ledger says the stream took it) but never wrote
    held: tuple[Candle, ...] = ()


@dataclass
class _Slot:
    """One connection's worth of series."""

    fid: int
    feed: Feed
    keys: list[SeriesKey] = field(default_factory=list)
    state: str = "idle"  # idle, connecting, up, down
    epoch: int = 0
    attempt: int = 0
    confirmed: bool = False  # a frame arrived in this epoch
    future: concurrent.futures.Future[Any] | None = None
    timer: Any = None
    error: str | None = None


class StreamActor(Child):
    def __init__(self, settings: StreamSettings, breaker: CircuitBreaker, server_clock: ServerClock, *,
                 storage: Address, health: Address | None = None, metrics: Any = None,
                 ledger: StreamLedger | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.ledger = ledger if ledger is not None else StreamLedger()  # what it took, for its series
        self.log = self.log.bind(exchange=settings.name)
        self.breaker = breaker
        self.clock = server_clock
        self.storage = storage
        self.health = health
        self.metrics = metrics
        self.retry = replace(settings.retry, attempts=10**9).policy(rng=self.runtime.rng)
        self.loop: LoopThread | None = None
        self.dispatch: _Dispatch | None = None
        self.members: dict[SeriesKey, _Member] = {}
        self.slots: dict[int, _Slot] = {}
        self._unplanned: set[SeriesKey] = set()
        self._plan_timer: Any = None
        self._writes: dict[int, tuple[float, list[tuple[SeriesKey, list[Candle]]]]] = {}
        self._tokens = 0
        self._outbox: deque[tuple[pykka.ActorRef[Any], Any]] = deque()
        self._notify_timer: Any = None
        self._words: list[tuple[pykka.ActorRef[Any], Any]] = []  # told WORD_DELAY_S after their write
        self._words_timer: Any = None
        self._next_connect_at = 0.0
        self.reconnects = 0
        self.messages = 0
        self.last_error: str | None = None
        self._reported: tuple[Any, ...] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def on_start(self) -> None:
        self.loop = LoopThread(f"{self.path}/io")
        self.dispatch = _Dispatch(self.settings.name, self.actor_ref, self.clock, self.runtime.wall, self.loop.loop,
                                  self.ledger)
        self._report(force=True)

    def on_stop(self) -> None:
        self._close_loop()

    def on_failure(self, *_: Any) -> None:
        self._close_loop()

    def _close_loop(self) -> None:
        loop, self.loop = self.loop, None
        if loop is None:
            return
        feeds = [slot.feed for slot in self.slots.values()]

        async def close_all() -> None:
            for feed in feeds:
                await feed.close()

        loop.stop(close_all, timeout=min(5.0, self.settings.timeout))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Frames):
            self._on_frames(message)
        elif message is _NOTIFY or isinstance(message, _Notify):
            self._notify_timer = None
            self._drain_outbox()
        elif message is _WORDS or isinstance(message, _Words):
            self._words_timer = None
            words, self._words = self._words, []
            for ref, word in words:
                self._tell(ref, word)
        elif isinstance(message, Written):
            self._on_written(message)
        elif isinstance(message, StreamJoin):
            self._join(message)
        elif isinstance(message, StreamLeave):
            self._leave(message)
        elif isinstance(message, _FeedEnded):
            self._on_feed_ended(message)
        elif isinstance(message, _Connect):
            self._connect(message.fid)
        elif isinstance(message, _Confirm):
            self._confirm(message)
        elif isinstance(message, _Retry):
            self._retry(message)
        elif message is _PLAN or isinstance(message, _Plan):
            self._plan_timer = None
            self._plan()
        elif isinstance(message, Reset):
            self.reset()
        else:
            return super().on_receive(message)
        return None

    # -- public API (asked through the proxy) ------------------------------------------------------

    def reset(self) -> dict[str, Any]:
        """Operator reset: close the stream's breaker and reconnect what is down now."""
        self.breaker.reset()
        for slot in self.slots.values():
            if slot.state == "down":
                slot.attempt = 0
                self._connect_later(slot, 0.0)
        self._report(force=True)
        return self.status()

    def status(self) -> dict[str, Any]:
        up = sum(1 for s in self.slots.values() if s.state == "up")
        return {
            "state": self._state_word(),
            "connections": len(self.slots),
            "connections_up": up,
            "streams": len(self.members),
            "streams_up": sum(1 for m in self.members.values() if m.up),
            "refused": sum(1 for m in self.members.values() if m.refused is not None and not m.up),
            "reconnects": self.reconnects,
            "messages": self.messages,
            "breaker": self.breaker.state,
            "last_error": self.last_error,
        }

    # -- members ------------------------------------------------------------------------------------

    def _join(self, msg: StreamJoin) -> None:
        member = self.members.get(msg.key)
        if member is None:
            self.members[msg.key] = _Member(msg.reply_to, msg.live)
            self._unplanned.add(msg.key)
            if self._plan_timer is None:
                self._plan_timer = self.schedule(PLAN_S, _PLAN)
            self._report()
            return
        restarted = member.ref != msg.reply_to
        member.ref, member.live = msg.reply_to, msg.live
        if restarted and member.up:
            self._tell(member.ref, StreamState(msg.key, True, self._now_ms()))
        if msg.live and member.held:
            held, member.held = member.held, ()
            self._write({msg.key: list(held)})

    def _leave(self, msg: StreamLeave) -> None:
        member = self.members.get(msg.key)
        if member is None or member.ref != msg.reply_to:
            return  # a newer incarnation joined meanwhile
        del self.members[msg.key]
        self._unplanned.discard(msg.key)
        if member.fid is not None and self.loop is not None:
            slot = self.slots[member.fid]
            slot.keys.remove(msg.key)
            self.loop.loop.call_soon_threadsafe(slot.feed.drop, [(msg.key.symbol, msg.key.timeframe)])
        self._publish_wanted()
        self._report()

    def _plan(self) -> None:
        """Put new members on connections with room (new connections as needed) and ask."""
        fresh = [k for k in self._unplanned if k in self.members]
        self._unplanned.clear()
        if not fresh or self.loop is None:
            return
        fresh.sort(key=lambda k: (k.symbol, k.timeframe))
        room = self.settings.profile.streams_per_connection
        self._publish_wanted(extra=fresh)
        added: dict[int, list[SeriesKey]] = {}
        for key in fresh:
            slot = next((s for s in self.slots.values() if len(s.keys) < room), None)
            if slot is None:
                slot = self._new_slot()
            slot.keys.append(key)
            self.members[key].fid = slot.fid
            added.setdefault(slot.fid, []).append(key)
        for fid, keys in added.items():
            slot = self.slots[fid]
            pairs = [(k.symbol, k.timeframe) for k in keys]
            self.loop.loop.call_soon_threadsafe(slot.feed.add, pairs)
            if slot.state == "idle":
                slot.state = "down"
                self._connect_later(slot, 0.0)
        self._report()

    def _new_slot(self) -> _Slot:
        assert self.dispatch is not None
        fid = max(self.slots, default=-1) + 1
        symbols = sorted({k.symbol for k in self.members})
        client = self.settings.client(self.runtime.wall, symbols)
        feed = Feed(client, self.settings.profile, self.dispatch.sink(fid), timeout=self.settings.timeout,
                    clock=self.runtime.clock, idle_s=self.settings.idle, markets=self.settings.markets)
        slot = self.slots[fid] = _Slot(fid, feed)
        return slot

    def _publish_wanted(self, extra: Iterable[SeriesKey] = ()) -> None:
        if self.dispatch is None:
            return
        wanted = {(k.symbol, k.timeframe): k for k in [*self.members, *extra]}
        self.dispatch.wanted = wanted  # one reference swap: the loop thread reads it whole

    # -- connections ------------------------------------------------------------------------------

    def _connect_later(self, slot: _Slot, delay: float) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
        slot.timer = self.schedule(delay, _Connect(slot.fid))

    def _connect(self, fid: int) -> None:
        slot = self.slots.get(fid)
        if slot is None or self.loop is None or self.dispatch is None or slot.future is not None:
            return  # gone, stopping, or connected
        slot.timer = None
        if not slot.keys:
            slot.state = "idle"
            return
        if not self.breaker.allow():
            wait = self.breaker.time_until_probe()
            self._connect_later(slot, wait if wait is not None else 1.0)
            self._report()
            return
        now = self.runtime.clock()
        if now < self._next_connect_at:
            self._connect_later(slot, self._next_connect_at - now)
            return
        self._next_connect_at = now + self.settings.profile.connect_spacing_s
        slot.epoch += 1
        slot.state = "connecting"
        slot.confirmed = False
        for key in slot.keys:
            self.members[key].refused = None
            self.members[key].asked_at = None
        epoch, dispatch, feed = slot.epoch, self.dispatch, slot.feed

        async def life() -> None:
            dispatch.begin(fid, epoch)
            await feed.run()

        future = self.loop.submit(life())
        slot.future = future
        ref = self.actor_ref

        def ended(f: concurrent.futures.Future[Any]) -> None:
            try:
                f.result()
                error: BaseException = StreamDown("ended")
            except StreamDown as down:
                error = down.args[0] if down.args and isinstance(down.args[0], BaseException) else down
            except concurrent.futures.CancelledError:
                return  # stopping
            except Exception as exc:  # noqa: BLE001 - told to the actor, which reconnects
                error = exc
            try:
                ref.tell(_FeedEnded(fid, epoch, error))
            except pykka.ActorDeadError:
                pass

        future.add_done_callback(ended)
        self.schedule(self.settings.idle / 2, _Confirm(fid, epoch))
        self.log.info("stream_connecting", connection=fid, streams=len(slot.keys), epoch=epoch)
        self._report()

    def _on_feed_ended(self, msg: _FeedEnded) -> None:
        slot = self.slots.get(msg.fid)
        if slot is None or slot.epoch != msg.epoch:
            return
        slot.future = None
        slot.state = "down"
        why = describe(msg.error)[:300]
        slot.error = self.last_error = why
        self.breaker.record_failure()
        slot.attempt += 1
        decision = self.retry.decide(slot.attempt, msg.error)
        delay = min(getattr(decision, "delay", self.settings.max_reconnect), self.settings.max_reconnect)
        probe = self.breaker.time_until_probe()
        if probe is not None:
            delay = max(delay, probe)
        self.reconnects += 1
        if self.metrics is not None:
            self.metrics.stream_reconnects.labels(self.settings.name).inc()
        now_ms = self._now_ms()
        down = 0
        for key in slot.keys:
            member = self.members[key]
            if member.up:
                down += 1
            member.up = False
            self._tell(member.ref, StreamState(key, False, now_ms, f"stream down: {why}"))
        self.log.warning("stream_down", connection=msg.fid, error=why, streams=len(slot.keys), were_up=down,
                         reconnect_in=round(delay, 2), breaker=self.breaker.state)
        self._connect_later(slot, delay)
        self._report()

    # -- frames and candles ---------------------------------------------------------------------------

    def _on_frames(self, msg: _Frames) -> None:
        self.messages += msg.frames
        if self.metrics is not None and msg.frames:
            self.metrics.stream_messages.labels(self.settings.name).inc(msg.frames)
        for key, at in msg.asked:
            member = self.members.get(key)
            if member is not None and not member.up:
                member.asked_at = at
        for key, why in msg.refused:
            member = self.members.get(key)
            if member is not None:
                member.refused = why
        now_ms = self._now_ms() if msg.seen else 0
        for fid, epoch, key in msg.seen:
            slot = self.slots.get(fid)
            member = self.members.get(key)
            if slot is None or slot.epoch != epoch or slot.future is None or member is None or member.fid != fid:
                continue  # a frame from a connection that has ended since
            if not slot.confirmed:
                slot.confirmed = True
                slot.state = "up"
                slot.attempt = 0
                slot.error = None
                was = self.breaker.state
                self.breaker.record_success()
                self.log.info("stream_up", connection=fid, epoch=epoch)
                if was != "closed":
                    self._kick()
            if not member.up:
                member.up = True
                member.parked_for = 0.0
                member.alone = False
                member.refused = None
                self._tell(member.ref, StreamState(key, True, now_ms))
        if msg.closed:
            self._store(msg.closed)
        self._report()

    def _store(self, closed: Sequence[tuple[SeriesKey, Candle]]) -> None:
        """One write for the closed candles of the caught-up series in this batch."""
        groups: dict[SeriesKey, list[Candle]] = {}
        for key, candle in closed:
            member = self.members.get(key)
            if member is None:
                continue
            if member.live:
                groups.setdefault(key, []).append(candle)
            else:
                member.held = (*member.held, candle)[-HELD:]
        if groups:
            self._write(groups)

    def _write(self, groups: dict[SeriesKey, list[Candle]]) -> None:
        self._tokens += 1
        token = self._tokens
        rows = tuple((k.exchange, k.symbol, k.timeframe, *c) for k, cs in groups.items() for c in cs)
        now = self.runtime.clock()
        for old in [t for t, (at, _) in self._writes.items() if now - at > WRITE_TIMEOUT_S]:
            del self._writes[old]  # lost with a storage crash; REST has it
        self._writes[token] = (now, list(groups.items()))
        if not self.storage.tell(Write(rows=rows, gaps=(), token=token, reply_to=self.actor_ref)):
            self._on_written(Written(token, "", error="storage is restarting"))

    def _on_written(self, ack: Written) -> None:
        entry = self._writes.pop(ack.token, None)
        if entry is None:
            return
        stored = ack.error is None
        now = self.runtime.wall()
        lag = self.metrics.close_to_store.labels(self.settings.name, "stream") if self.metrics is not None else None
        for key, candles in entry[1]:
            member = self.members.get(key)
            if stored and lag is not None:
                tf_s = timeframe_ms(key.timeframe) / 1000
                for c in candles:
                    lag.observe(max(0.0, now - c[0] / 1000 - tf_s))
            if member is not None:
                self._tell_later(member.ref, StreamedCandles(key, tuple(candles), stored=stored,
                                                             generation=ack.generation))
        if not stored:
            self.log.warning("stream_write_failed", error=ack.error, series=len(entry[1]))

    # -- subscriptions that show nothing ----------------------------------------------------------------

    def _confirm(self, msg: _Confirm) -> None:
        """Every `idle / 2` s while a connection lives: its series asked for `idle` s ago or more
        that showed nothing are silent (refused, or never served)."""
        slot = self.slots.get(msg.fid)
        if slot is None or slot.epoch != msg.epoch or slot.future is None:
            return
        self.schedule(self.settings.idle / 2, _Confirm(msg.fid, msg.epoch))
        if not slot.confirmed and not any(self.members[k].refused for k in slot.keys):
            return  # nothing at all yet: the feed ends a dead connection itself
        due = self.runtime.clock() - self.settings.idle
        silent = [k for k in slot.keys
                  if not self.members[k].up and (self.members[k].asked_at or due + 1) <= due]
        if not silent:
            return
        for key in silent:
            self.members[key].asked_at = None  # judged: asked again below, then judged again
        now_ms = self._now_ms()
        for key in silent:
            member = self.members[key]
            why = member.refused or f"no message within {self.settings.idle:g} s of subscribing"
            self._tell(member.ref, StreamState(key, False, now_ms, f"stream subscription: {why}"))
        # Binance and Bybit refuse a whole request for one bad topic: ask again in halves, so the
        # good ones come up within seconds; one silent in a request of its own is parked (asked
        # again after a minute, doubling to half an hour) and its series stays on REST
        alone = [k for k in silent if self.members[k].alone]
        grouped = [k for k in silent if not self.members[k].alone]
        if grouped:
            batch = max(1, math.ceil(min(len(grouped), self.settings.profile.subscribe_batch) / 2))
            self.schedule(1.0, _Retry(msg.fid, msg.epoch, tuple(grouped), batch))
        if alone:
            delay = min(PARK_MAX_S, max(PARK_FIRST_S, 2 * max(self.members[k].parked_for for k in alone)))
            for key in alone:
                self.members[key].parked_for = delay
            self.schedule(delay, _Retry(msg.fid, msg.epoch, tuple(alone), 1))
        self.log.warning("stream_subscriptions_silent", connection=msg.fid, series=len(silent), parked=len(alone),
                         first=[str(k) for k in silent[:5]], reason=self.members[silent[0]].refused)
        self._report()

    def _retry(self, msg: _Retry) -> None:
        slot = self.slots.get(msg.fid)
        if slot is None or slot.epoch != msg.epoch or self.loop is None:
            return
        keys = [k for k in msg.keys if k in self.members and not self.members[k].up and self.members[k].fid == msg.fid]
        if not keys:
            return
        for key in keys:
            self.members[key].refused = None
            self.members[key].alone = msg.batch == 1
        pairs = [(k.symbol, k.timeframe) for k in keys]
        self.loop.loop.call_soon_threadsafe(slot.feed.retry, pairs, msg.batch)

    def _kick(self) -> None:
        """The breaker closed again: connections waiting for its probe go now."""
        for slot in self.slots.values():
            if slot.state == "down":
                self._connect_later(slot, 0.0)

    # -- telling series, paced ------------------------------------------------------------------------

    def _tell(self, ref: pykka.ActorRef[Any], message: Any) -> None:
        """Queue a tell to a series; the queue drains at `notify_per_s`, after this message."""
        self._outbox.append((ref, message))
        if self._notify_timer is None:
            self._notify_timer = _NOTIFY  # a drain is on its way
            self.actor_ref.tell(_NOTIFY)

    def _tell_later(self, ref: pykka.ActorRef[Any], message: Any) -> None:
        """Queue a tell to go out `WORD_DELAY_S` from now (with the others queued meanwhile)."""
        self._words.append((ref, message))
        if self._words_timer is None:
            self._words_timer = self.schedule(WORD_DELAY_S, _WORDS)

    def _drain_outbox(self) -> None:
        budget = max(1, int(self.settings.notify_per_s * NOTIFY_TICK_S))
        outbox = self._outbox
        while outbox and budget > 0:
            ref, message = outbox.popleft()
            budget -= 1
            try:
                ref.tell(message)
            except pykka.ActorDeadError:
                pass  # restarted: the new incarnation joins again
        if outbox:
            self._notify_timer = self.schedule(NOTIFY_TICK_S, _NOTIFY)

    # -- status ----------------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return self.clock.now_ms(int(self.runtime.wall() * 1000))

    def _state_word(self) -> str:
        states = [s.state for s in self.slots.values() if s.keys]
        if not states:
            return "off" if not self.members else "connecting"
        if all(s == "up" for s in states):
            return "up"
        if any(s == "up" for s in states):
            return "partial"
        if any(s == "connecting" for s in states) and self.reconnects == 0:
            return "connecting"
        return "down"

    def _report(self, *, force: bool = False) -> None:
        if self.health is None:
            return
        status = self.status()
        now = (status["state"], status["connections"], status["connections_up"], status["streams"],
               status["streams_up"], status["refused"], status["reconnects"], status["breaker"])
        if now == self._reported and not force:
            return
        self._reported = now
        self.health.tell(StreamStatus(self.settings.name, status["state"],
                                      {k: v for k, v in status.items() if k not in ("state", "messages")}))
