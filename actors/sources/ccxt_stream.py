"""Kline streams over ccxt.pro, for the stream actor: the closed-flag tap, what each exchange
allows on a connection, and one connection's life (`Feed`).

ccxt.pro parses a kline to `[ts, o, h, l, c, v]` and drops the exchange's closed flag (Binance
`k.x`, OKX `confirm`, Bybit `confirm`). `KlineTap` subclasses the exchange's ccxt.pro class and
overrides `handle_ohlcv`, the method ccxt calls with every raw kline frame: it reads the flag
(and the frame's send time, where it has one) with ccxt's own helpers, lets ccxt parse the frame
as usual, and hands a copy of ccxt's row to a sink. A copy, because ccxt's cache updates rows in
place and a late (out of order) in-progress frame would overwrite a closed one there.

What it adds to ccxt.pro, each because the real client made it necessary (see
simulator/ws/README.md for the verified behaviours of ccxt.pro 4.5.90):

- In-progress frames of a flagged stream are not parsed at all (the flag says they are not
  closed): at 10,000 series that is 5,000 frames a second, and nothing in them is stored.
- Errors reach only pending watches, and ccxt.pro never reconnects or resubscribes by itself:
  a `Feed` keeps one future of its own pending on its connection (rejected on any drop), and
  watches a stalled feed (no frame for `idle_s`) itself, since a stalled feed hangs a watch
  forever while ccxt's keepalive stays happy.
- Subscriptions go out in batches the exchange accepts (Bybit spot: 10 topics a request) on
  connections of at most the streams it allows (Binance: 1024); ccxt's throttle paces them
  (Binance: 5 incoming messages a second).
- A subscription is confirmed by data, not by the ack: the first frame for a series. A refused
  subscription (or a stream the exchange accepts and never serves, as Binance does for an
  unknown symbol) is found that way whatever the dialect, and retried in smaller batches
  (Binance and Bybit refuse a whole request for one bad topic). ccxt keeps a refused
  subscription recorded (Binance, OKX), so a retry first forgets it (`forget`).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import ccxt
import ccxt.pro

from ...supervisors.clock import WallClock
from ..market.errors import describe
from .profiles import client_options, market_types
from .tls import share_tls_context
from .urls import rebase_urls

Pair = tuple[str, str]  # (unified symbol, timeframe)

SENTINEL = "candlekeeper:connection"  # the hash of the future a Feed keeps pending on its connection
TICK_S = 0.5  # how often a connection's watchdog looks at the clock
OHLCV_KEPT = 4  # candles ccxt keeps per stream (see `pro_client`)


# -- what each exchange allows ---------------------------------------------------------------


@dataclass(frozen=True)
class StreamProfile:
    """One exchange's kline streams, from its documentation (and ours where it says nothing).

    streams_per_connection: most streams on one connection (Binance: 1024).
    subscribe_batch: most topics in one subscribe request (Bybit spot: 10; Binance documents
        none: ours, 200; OKX caps a request at 64 KB of arguments: ours, 100).
    connect_spacing_s: at least this long between two new connections (Binance: 300 attempts
        per 5 minutes; OKX: 3 a second; Bybit: 500 per 5 minutes).
    subscribe_spacing_s: at least this long between two subscribe requests on a connection
        (Binance: 5 incoming messages a second, pongs included; ccxt's own throttle waits as
        long, so a request goes out when the feed says it does).
    update_period_s: how often the exchange pushes a candle in progress (Binance: 2 s; OKX:
        0.5 s; Bybit: 1 to 60 s).
    idle_s: no frame at all on a connection for this long: it is stalled, reconnect. Also how
        long a new subscription may take to show its first frame before it counts as refused.
    hash_format: how ccxt.pro 4.5.90 records one (symbol, timeframe) subscription on a
        connection (`Client.subscriptions`), so a refused one can be forgotten and asked again;
        None: unknown (a refused stream waits for the next reconnect).
    """

    streams_per_connection: int = 1000
    subscribe_batch: int = 100
    connect_spacing_s: float = 1.0
    subscribe_spacing_s: float = 0.1
    update_period_s: float = 2.0
    idle_s: float = 60.0
    hash_format: str | None = None


PROFILES: dict[str, StreamProfile] = {
    "binance": StreamProfile(streams_per_connection=1024, subscribe_batch=200, connect_spacing_s=1.0,
                             subscribe_spacing_s=0.25, update_period_s=2.0, idle_s=10.0,
                             hash_format="ohlcv::{symbol}::{timeframe}"),
    "okx": StreamProfile(streams_per_connection=1000, subscribe_batch=100, connect_spacing_s=0.34,
                         update_period_s=0.5, idle_s=10.0, hash_format="multi:candle{interval}:{symbol}"),
    "bybit": StreamProfile(streams_per_connection=1000, subscribe_batch=10, connect_spacing_s=0.6,
                           update_period_s=1.0, idle_s=70.0, hash_format="ohlcv::{symbol}::{timeframe}"),
}


def stream_profile(exchange_id: str) -> StreamProfile:
    return PROFILES.get(exchange_id, StreamProfile())


def supports(exchange_id: str) -> bool:
    """Whether the daemon can stream `exchange_id`'s candles: ccxt.pro watches them, and the
    closed flag can be read from its frames (a `KlineTap` for it exists)."""
    cls = getattr(ccxt.pro, exchange_id, None)
    if cls is None or exchange_id not in TAPS:
        return False
    return bool(cls().has.get("watchOHLCV"))


def rebase_ws_urls(urls: Any, ws_url: str) -> Any:
    """A copy of ccxt's WebSocket URL table (`urls['api']['ws']`) with the scheme and host of
    every ws(s) URL replaced by `ws_url`'s ("ws://127.0.0.1:8765"), paths kept (a path in
    `ws_url`, a proxy's prefix, is put before each). Placeholders such as Bybit's
    `stream.{hostname}` are in the host, so they go too."""
    base = urlsplit(ws_url)
    if base.scheme not in ("ws", "wss") or not base.netloc:
        raise ValueError(f"ws_url must look like ws(s)://host[:port], got {ws_url!r}")
    prefix = base.path.rstrip("/")

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            parts = urlsplit(value)
            if parts.scheme not in ("ws", "wss") or not parts.netloc:
                return value
            return urlunsplit((base.scheme, base.netloc, prefix + parts.path, parts.query, parts.fragment))
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(urls)


# -- the closed flag -------------------------------------------------------------------------


class FrameSink(Protocol):
    def frame(self, symbol: str, timeframe: str, ts: int, closed: bool | None, event_ms: int | None,
              row: tuple[Any, ...] | None) -> None:
        """One kline frame: the candle opening at `ts`, the exchange's closed flag (None: the
        frame has none), when the exchange sent it (None: it does not say), and ccxt's parsed
        row (None for an in-progress frame of a flagged stream: not parsed)."""


class FeedSink(FrameSink, Protocol):
    def asked(self, pairs: Sequence[Pair], at: float) -> None:
        """A subscribe request for `pairs` went out at `at` (the feed's clock)."""

    def refused(self, pairs: Sequence[Pair], why: str) -> None:
        """A subscribe request for `pairs` was answered with an error (`why`)."""


Raw = tuple[str, str, int, "bool | None", "int | None"]  # symbol, timeframe, ts, closed, event_ms


class KlineTap:
    """Mixin, put before the ccxt.pro exchange class (`tapped`): each kline frame's flag to
    `kline_sink`. Subclasses implement `raw_klines` with ccxt's own helpers, so symbols and
    timeframes are ccxt's. `parse_all`: parse in-progress frames too (tests read ccxt's cache)."""

    kline_sink: FrameSink | None = None
    parse_all = False

    def handle_ohlcv(self, client: Any, message: Any) -> None:
        try:
            raw = self.raw_klines(client, message)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            raw = None  # not a frame we can read: ccxt's own handling, nothing stored from it
        if raw is None or self.parse_all or any(closed is not False for _, _, _, closed, _ in raw):
            super().handle_ohlcv(client, message)  # type: ignore[misc]
            if raw is None:
                return
            rows = self._rows(raw)
        else:
            rows = [None] * len(raw)
        sink = self.kline_sink
        if sink is None:
            return
        for (symbol, timeframe, ts, closed, event_ms), row in zip(raw, rows, strict=True):
            sink.frame(symbol, timeframe, ts, closed, event_ms, row)

    def _rows(self, raw: Sequence[Raw]) -> list[tuple[Any, ...] | None]:
        out: list[tuple[Any, ...] | None] = []
        ohlcvs = self.ohlcvs  # type: ignore[attr-defined]
        for symbol, timeframe, ts, _, _ in raw:
            stored = ohlcvs.get(symbol, {}).get(timeframe)
            row = stored.hashmap.get(ts) if stored is not None else None
            out.append(tuple(row) if row is not None else None)
        return out

    def raw_klines(self, client: Any, message: Any) -> list[Raw]:
        raise NotImplementedError

    def _names(self, key: tuple[Any, ...], resolve: Callable[[], tuple[str, str]]) -> tuple[str, str]:
        """(symbol, timeframe) of an exchange's (market id, interval...), resolved once."""
        cache = self.__dict__.setdefault("_tap_names", {})
        names = cache.get(key)
        if names is None:
            names = cache[key] = resolve()
        return names


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


class BinanceKlineTap(KlineTap):
    """Binance kline events: closed flag `k.x`, sent at `E`."""

    def handle_message(self, client: Any, message: Any) -> Any:
        # ccxt's dispatcher builds a table of twenty handlers per frame: a kline goes straight on
        if type(message) is dict and message.get("e") == "kline":
            return self.handle_ohlcv(client, message)
        return super().handle_message(client, message)  # type: ignore[misc]

    def raw_klines(self, client: Any, message: Any) -> list[Raw]:
        ex: Any = self
        k = message["k"]
        market_id, interval = k.get("s") or k.get("ps"), k["i"]

        def resolve() -> tuple[str, str]:
            market_type = "spot" if ex.is_spot_url(client) else "contract"
            return ex.safe_symbol(market_id, None, None, market_type), ex.find_timeframe(interval)

        symbol, timeframe = self._names((client.url, market_id, interval), resolve)
        event = message.get("E")
        return [(symbol, timeframe, int(k["t"]), _flag(k.get("x")), int(event) if event is not None else None)]


class OkxKlineTap(KlineTap):
    """OKX candle events: closed flag is the 9th column `confirm` ("1" = closed)."""

    def raw_klines(self, client: Any, message: Any) -> list[Raw]:
        ex: Any = self
        arg = message["arg"]
        channel, inst = arg["channel"], arg["instId"]

        def resolve() -> tuple[str, str]:
            return ex.safe_market(inst)["symbol"], ex.find_timeframe(channel.replace("candle", ""))

        symbol, timeframe = self._names((channel, inst), resolve)
        out: list[Raw] = []
        for row in message.get("data") or []:
            confirm = row[8] if len(row) > 8 else None
            out.append((symbol, timeframe, int(row[0]), None if confirm is None else confirm == "1", None))
        return out


class BybitKlineTap(KlineTap):
    """Bybit kline events: closed flag `confirm`, sent at `timestamp`."""

    def raw_klines(self, client: Any, message: Any) -> list[Raw]:
        ex: Any = self
        topic = message["topic"]

        def resolve() -> tuple[str, str]:
            parts = topic.split(".")
            market_type = "spot" if client.url.find("spot") > -1 else "contract"
            return ex.safe_market(parts[-1], None, None, market_type)["symbol"], ex.find_timeframe(parts[1])

        symbol, timeframe = self._names((client.url, topic), resolve)
        out: list[Raw] = []
        for d in message.get("data") or []:
            event = d.get("timestamp")
            out.append((symbol, timeframe, int(d["start"]), _flag(d.get("confirm")),
                        int(event) if event is not None else None))
        return out


TAPS: dict[str, type[KlineTap]] = {"binance": BinanceKlineTap, "okx": OkxKlineTap, "bybit": BybitKlineTap}
_TAPPED: dict[tuple[str, type], type] = {}


def tapped(exchange_id: str, tap: type[KlineTap] | None = None) -> type:
    """The ccxt.pro class of `exchange_id` with its `KlineTap` (or a subclass `tap`) mixed in."""
    mixin = tap or TAPS[exchange_id]
    key = (exchange_id, mixin)
    cls = _TAPPED.get(key)
    if cls is None:
        cls = _TAPPED[key] = type(f"{exchange_id}_tapped", (mixin, getattr(ccxt.pro, exchange_id)), {})
    return cls


def pro_client(exchange_id: str, *, symbols: Iterable[str], timeout: float, wall: WallClock | None = None,
               api_base: str | None = None, ws_url: str | None = None, tap: type[KlineTap] | None = None,
               throttle: bool = True) -> Any:
    """A tapped ccxt.pro client: markets of the types `symbols` need only (one REST request per
    type), REST on `api_base`, streams on `ws_url`, ccxt's clock the runtime's (`wall`)."""
    cls = tapped(exchange_id, tap)
    options = copy.deepcopy(client_options(exchange_id, market_types(exchange_id, list(symbols))))
    options["adjustForTimeDifference"] = False
    # ccxt keeps the last `OHLCVLimit` candles of every stream (1000 by default): at 10,000
    # series that grows to ten million rows over a day, for nothing (the tap reads only the row
    # a frame just wrote, and the store keeps the candles)
    options["OHLCVLimit"] = OHLCV_KEPT
    # No permessage-deflate offer (ccxt makes one by default). Inflating each frame hands the
    # GIL back and waits to take it again: at 10,000 series, with thousands of threads wanting
    # it, most of a stream loop's time went there (a sampling probe put 75 % of its busy samples
    # in aiohttp's `decompress_sync`), so the close's finals were read late. Kline frames are
    # small; the bandwidth saved is not worth the latency.
    options["ws"] = {**options.get("ws", {}), "compress": 0}
    ex = cls({"enableRateLimit": throttle, "timeout": int(timeout * 1000), "options": options})
    share_tls_context(ex)
    ws = ex.urls["api"].get("ws")
    if api_base:
        ex.urls["api"] = rebase_urls(ex.urls["api"], api_base)
        ex.urls["api"]["ws"] = ws
    if ws_url:
        ex.urls["api"]["ws"] = rebase_ws_urls(ws, ws_url)
    if wall is not None:
        ex.milliseconds = lambda: int(wall() * 1000)
        ex.seconds = lambda: int(wall())
    ex.timeout_on_exit = 0
    return ex


def forget(ex: Any, profile: StreamProfile, pairs: Iterable[Pair]) -> None:
    """Drop ccxt's record of these subscriptions on every connection of `ex`, so watching them
    again sends a new subscribe request (ccxt keeps a refused one recorded and would send none)."""
    if profile.hash_format is None:
        return
    hashes = [profile.hash_format.format(symbol=s, timeframe=tf, interval=ex.timeframes.get(tf, tf))
              for s, tf in pairs]
    for client in list((getattr(ex, "clients", None) or {}).values()):
        for h in hashes:
            client.subscriptions.pop(h, None)


class StreamDown(Exception):
    """A connection ended: `error` is why (a ccxt error, or `StreamIdle`)."""


class StreamIdle(ccxt.NetworkError):
    """No frame for a while on an open connection: a stalled feed."""


def _network(error: BaseException) -> bool:
    return isinstance(error, ccxt.NetworkError | OSError | asyncio.TimeoutError)


# -- one connection --------------------------------------------------------------------------


class Feed:
    """One ccxt.pro client and the one connection it keeps for its series (runs on one event loop).

    `run()` is one connection's life: load markets (once per client), subscribe every pair in
    batches, then watch the connection until it drops, stalls or is closed; it always ends by
    raising `StreamDown`. The caller decides when to call it again (backoff, breaker). Frames go
    to `sink` as they arrive; so does each subscribe request, when it goes out and if it is
    answered with an error. Requests wait in a queue and go out `subscribe_spacing_s` apart
    (pairs asked for meanwhile join the request being formed, up to `subscribe_batch`), so a
    request's time is known and a pair is judged silent only from when it was asked.
    """

    def __init__(self, client: Any, profile: StreamProfile, sink: FeedSink, *, timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, idle_s: float | None = None,
                 markets: Callable[[], list[dict[str, Any]] | None] | None = None) -> None:
        self.client = client
        self.markets = markets
        self.profile = profile
        self.timeout = timeout
        self.idle_s = idle_s if idle_s is not None else profile.idle_s
        self.pairs: list[Pair] = []
        self._wanted: set[Pair] = set()
        self._queue: deque[tuple[list[Pair], int]] = deque()  # (pairs, topics per request) to ask
        self._queued = asyncio.Event()
        self.frames = 0
        self.last_frame = 0.0
        self._sink = sink
        self._clock = clock
        self._running = False
        self._run_frames = 0  # frames on this connection
        self._run_refused = 0  # subscribe requests refused on this connection
        client.kline_sink = self

    # -- frames (called by the tap, on the loop) ------------------------------------------------

    def frame(self, symbol: str, timeframe: str, ts: int, closed: bool | None, event_ms: int | None,
              row: tuple[Any, ...] | None) -> None:
        self.frames += 1
        self._run_frames += 1
        self.last_frame = self._clock()
        self._sink.frame(symbol, timeframe, ts, closed, event_ms, row)

    # -- the connection ---------------------------------------------------------------------------

    async def run(self) -> None:
        """One connection's life (see the class docstring); raises `StreamDown`."""
        self._running = True
        try:
            await self._run()
        except StreamDown:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise StreamDown(exc) from exc
        finally:
            self._running = False
            await self._close_connections()

    async def _run(self) -> None:
        ex = self.client
        if ex.markets is None and self.markets is not None:
            # the exchange actor's list: it loads it under its breaker and rate budget; none yet
            # (it is failing, or not started): no connection now, the backoff asks again
            listed = self.markets()
            if not listed:
                raise StreamDown(ccxt.ExchangeNotAvailable(f"{ex.id}: waiting for the exchange's market list"))
            ex.set_markets(listed)
        if ex.markets is None:
            try:
                await asyncio.wait_for(ex.load_markets(), self.timeout)
            except TimeoutError:
                why = f"{ex.id}: markets not loaded within {self.timeout:g} s"
                raise StreamDown(ccxt.RequestTimeout(why)) from None
        if not self.pairs:
            raise StreamDown(ccxt.BadRequest("no series to stream"))
        dial = max((ex.ws_dial_delay(url) for url in list(getattr(ex, "ws_dial_backoff", None) or {})), default=0.0)
        self.last_frame = self._clock() + dial
        self._run_frames = self._run_refused = 0
        self._queue.clear()
        self.subscribe(self.pairs)
        asker = asyncio.ensure_future(self._ask_loop())
        try:
            await self._watch_connection()
        finally:
            asker.cancel()

    async def _watch_connection(self) -> None:
        ex = self.client
        ws = await self._connection()
        sentinel = ws.future(SENTINEL)
        while True:
            await asyncio.wait({sentinel}, timeout=TICK_S)
            if sentinel.done():
                error = sentinel.exception() if not sentinel.cancelled() else ccxt.NetworkError("connection closed")
                if error is None or _network(error):
                    raise StreamDown(error or ccxt.NetworkError("connection closed"))
                # OKX answers a refused topic with an error event that names no request: ccxt
                # rejects every pending future on the connection with it. The connection is fine.
                sentinel = ws.future(SENTINEL)
            if ws not in (ex.clients or {}).values():
                raise StreamDown(ws.error or ccxt.NetworkError("connection closed"))
            if self._stalled():
                raise StreamDown(StreamIdle(f"{ex.id}: no message for {self.idle_s:g} s on an open connection"))

    def _stalled(self) -> bool:
        """No frame for `idle_s`; before the first frame, `idle_s` plus a request's time, unless
        subscriptions were refused (the caller asks again in smaller requests: a connection
        whose every stream was refused has nothing to say, and is not stalled)."""
        quiet = self._clock() - self.last_frame
        if self._run_frames:
            return quiet > self.idle_s
        return self._run_refused == 0 and quiet > self.idle_s + self.timeout

    async def _connection(self) -> Any:
        """The ccxt connection object the first subscribe created (it exists once that call has
        run to its first await)."""
        for _ in range(1000):
            clients = self.client.clients or {}
            if clients:
                return next(iter(clients.values()))
            await asyncio.sleep(0.001)
        raise StreamDown(ccxt.NetworkError(f"{self.client.id}: no connection was opened"))

    def subscribe(self, pairs: Sequence[Pair], batch: int | None = None) -> None:
        """Queue `pairs` to be asked for, `batch` topics a request (default: as many as the
        exchange takes; such pairs join the last queued default request)."""
        if not pairs:
            return
        size = max(1, batch or self.profile.subscribe_batch)
        if size == self.profile.subscribe_batch and self._queue and self._queue[-1][1] == size:
            self._queue[-1][0].extend(pairs)
        else:
            self._queue.append((list(pairs), size))
        self._queued.set()

    async def _ask_loop(self) -> None:
        """Send the queued requests, one every `subscribe_spacing_s` (the first opens the
        connection); each answer is consumed by `_answered`."""
        while True:
            if not self._queue:
                self._queued.clear()
                await self._queued.wait()
                continue
            pairs, size = self._queue[0]
            chunk, rest = pairs[:size], pairs[size:]
            if rest:
                self._queue[0] = (rest, size)
            else:
                self._queue.popleft()
            task = asyncio.ensure_future(self._watch(chunk))
            task.add_done_callback(functools.partial(self._answered, chunk=chunk))
            self._sink.asked(chunk, self._clock())
            await asyncio.sleep(self.profile.subscribe_spacing_s)

    async def _watch(self, chunk: list[Pair]) -> Any:
        ex = self.client
        if ex.has.get("watchOHLCVForSymbols"):
            return await ex.watch_ohlcv_for_symbols([[s, tf] for s, tf in chunk])
        return await asyncio.gather(*(ex.watch_ohlcv(s, tf) for s, tf in chunk))

    def _answered(self, task: asyncio.Future[Any], *, chunk: list[Pair]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not _network(error):
            self._run_refused += 1
            self._sink.refused(chunk, describe(error)[:200])

    def retry(self, pairs: Sequence[Pair], batch: int) -> None:
        """Ask again for pairs that showed nothing (refused, or silent), `batch` a request."""
        if not self._running:
            return  # the next connection asks for every pair anyway
        forget(self.client, self.profile, pairs)
        self.subscribe(pairs, batch)

    def add(self, pairs: Sequence[Pair]) -> None:
        """More pairs for this connection: asked now when it is open, else at the next one."""
        fresh = [p for p in pairs if p not in self._wanted]
        self._wanted.update(fresh)
        self.pairs.extend(fresh)
        if self._running and fresh:
            self.subscribe(fresh)

    def drop(self, pairs: Sequence[Pair]) -> None:
        """Pairs nobody wants any more: not asked for at the next connection."""
        gone = set(pairs)
        self._wanted -= gone
        self.pairs = [p for p in self.pairs if p not in gone]

    async def _close_connections(self) -> None:
        """Close this client's connections (not the client: its markets serve the next one)."""
        ex = self.client
        clients = list((ex.clients or {}).items())
        for url, ws in clients:
            try:
                await asyncio.wait_for(ws.close(), 2.0)
            except Exception:  # noqa: BLE001 - closing is best effort; the object is dropped anyway
                pass
            if (ex.clients or {}).get(url) is ws:
                del ex.clients[url]

    async def close(self) -> None:
        """Release everything (the client is not used again)."""
        try:
            await asyncio.wait_for(self.client.close(), 3.0)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
