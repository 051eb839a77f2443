"""When is a streamed candle closed? The rule for kline streams, per series, pure.

A stream pushes the candle in progress over and over (Binance every 2 s) and, when it closes,
its final values. Only closed candles are stored:

- by the exchange's own word where the message carries it (Binance kline `x`, OKX `confirm`,
  Bybit `confirm`): a message flagged closed is the closed candle, with its final values;
- otherwise (a stream with no flag) a candle is closed when a later candle has started and its
  close time has passed on the exchange's clock (ours corrected by the offset the exchange actor
  measures: `market.closing.ServerClock`). Its values are those of the last message seen for it,
  so they are taken only when that message was sent at or after the close (where the message
  says when it was sent: Binance `E`, Bybit `timestamp`): a last message from before the close
  may miss the final trades, and that candle is left to REST.

A candle that fails the same validation as REST rows (`market.candles.validate`) is not taken
either. Whatever is not taken from the stream is fetched over REST by the series (it notices the
missing candle when a later one arrives, or when its fallback timer fires).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from .candles import Candle, InvalidCandles, validate


@dataclass
class _Last:
    ts: int
    row: Sequence[Any] | None
    event_ms: int | None


class CloseTracker:
    """One series' stream messages in, its closed candles out (each at most once)."""

    __slots__ = ("_emitted", "_last", "_pending", "tf_ms")

    KEEP = 16  # open times remembered as handed out (a duplicated or reordered final is dropped)

    def __init__(self, tf_ms: int) -> None:
        self.tf_ms = tf_ms
        self._emitted: list[int] = []  # open times handed out, newest last
        self._last: _Last | None = None  # the newest candle seen without a flag
        self._pending: _Last | None = None  # a candle a later one has followed, waiting for the clock

    def frame(self, ts: int, closed: bool | None, event_ms: int | None, row: Sequence[Any] | None,
              now_ms: int, margin_ms: int) -> list[Candle]:
        """One message for the candle opening at `ts`: the candles it proves closed.

        closed: the exchange's flag (None: the message has none); row: the candle as ccxt parsed
        it (needed for a flagged-closed message and for every message without a flag);
        now_ms / margin_ms: the exchange's clock and how far off it may be."""
        if closed is True:
            return self._take(ts, row)
        if closed is False:
            return []
        last = self._last
        if last is not None and ts > last.ts:
            self._pending = last  # a later candle has started: `last` ended with its last message
        if last is None or ts >= last.ts:
            self._last = _Last(ts, row, event_ms)
        pending = self._pending
        if pending is None or now_ms - margin_ms < pending.ts + self.tf_ms:
            return []  # nothing ended, or its close has not passed on the exchange's clock yet
        self._pending = None
        if pending.event_ms is not None and pending.event_ms < pending.ts + self.tf_ms:
            return []  # its last message was sent before the close: maybe not its final values
        return self._take(pending.ts, pending.row)

    def _take(self, ts: int, row: Sequence[Any] | None) -> list[Candle]:
        emitted = self._emitted
        if row is None or ts in emitted or (len(emitted) == self.KEEP and ts < emitted[0]):
            return []  # a duplicate, or a late message for a candle already handed out
        try:
            candles = validate([row], self.tf_ms, ts)
        except InvalidCandles:
            return []
        if not candles or candles[0][0] != ts:
            return []
        emitted.append(ts)
        emitted.sort()
        del emitted[: -self.KEEP]
        return candles


#: A candle the stream took for a series is written within this (or the write is forgotten,
#: and the series' REST fallback has it): how long a series waits for the stream's word.
STREAM_WRITE_PATIENCE_S = 60.0


class StreamLedger:
    """The newest open time of a closed candle an exchange's stream took for each series (from
    the moment its loop thread parsed it closed: its write follows, or is done).

    The stream actor tells each series what it stored after the write, paced (thousands of
    series threads woken at once cost seconds in lock convoys), and the write itself queues
    behind everything else the one storage actor has to do (at start-up, 10,000 backfills). A
    series whose fallback timer fires first would ask REST for a candle the stream holds, and
    write it through the same queue: at 10,000 series those requests and writes are the load
    that delays the next minute further, the spiral that empties the stream (measured: 7,000
    fallbacks in the first minute, each for a candle in hand). The series reads this ledger
    instead, and keeps waiting for the word while the candle is in hand.

    It also keeps how far the stream has read: the newest candle any frame showed for each
    series, and when the stream first showed a candle after each close. Under load the stream
    parses a close's burst of frames seconds late; a series whose stream has not yet shown the
    next candle of any series is behind, not silent, and asking REST would add to the load
    that makes it late (measured: 8,334 `silent` fallbacks in a start-up). A series the stream
    has passed without its candle is silent, and asks REST at once.

    Written on the stream's threads, read on series threads: single dict item operations and
    tuples replaced whole, no lock.
    """

    __slots__ = ("_begun", "_front", "_newest", "_seen")

    def __init__(self) -> None:
        self._newest: dict[Hashable, int] = {}
        self._seen: dict[Hashable, int] = {}  # series -> newest candle any frame showed
        self._front: dict[str, int] = {}  # timeframe -> newest candle any series' frame showed
        # timeframe -> ((candle, wall time the stream first showed it), ...), the last few:
        # replaced whole (read on other threads while the loop thread writes)
        self._begun: dict[str, tuple[tuple[int, float], ...]] = {}

    def took(self, key: Hashable, ts: int) -> None:
        if ts > self._newest.get(key, -1):
            self._newest[key] = ts

    def newest(self, key: Hashable) -> int | None:
        return self._newest.get(key)

    def saw(self, key: Hashable, timeframe: str, ts: int, now: Callable[[], float]) -> None:
        """A frame of candle `ts` (in progress or closed) for a series: called for every frame,
        on the stream's loop thread, so the common case is two dict reads."""
        if ts > self._seen.get(key, -1):
            self._seen[key] = ts
            if ts > self._front.get(timeframe, -1):
                self._front[timeframe] = ts
                self._begun[timeframe] = self._begun.get(timeframe, ())[-(self.KEEP - 1):] + ((ts, now()),)

    def seen(self, key: Hashable) -> int | None:
        """The newest candle the stream has shown any frame of for this series."""
        return self._seen.get(key)

    def passed_at(self, timeframe: str, ts: int) -> float | None:
        """When the stream first showed a candle after `ts` of any series of this timeframe
        (None: not yet, as far as the last few candles tell)."""
        after = [at for t, at in self._begun.get(timeframe, ()) if t > ts]
        return min(after) if after else None

    KEEP = 4
