"""Which kline pushes a stream owes at a given instant.

A `KlineCursor` remembers the candle in progress when it last looked (or when the stream
was subscribed). Asked at `now`, it owes the closed (final) update of every candle that closed
since, then an in-progress update of the current candle. Candles that do not exist (before
history starts, or a gap) are skipped. Values come
from `CandleHistory`, so a candle's final push equals the REST simulator's closed candle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..history import INTERVALS, Candle, CandleHistory

#: After a clock jump, at most this many finals are owed per stream (older ones are lost,
#: as they would be on a real feed that fell that far behind).
MAX_CATCH_UP = 1000


@dataclass(frozen=True)
class Due:
    """One owed push: the candle as seen at `now`, and whether it is closed."""

    candle: Candle
    closed: bool


def align_down(t_ms: int, ms: int, off: int) -> int:
    return (t_ms - off) // ms * ms + off


class KlineCursor:
    """Push bookkeeping of one (connection, topic); see the module docstring."""

    def __init__(self, history: CandleHistory, symbol_id: str, interval: str, ms: int,
                 off: int, now_ms: int) -> None:
        self._history = history
        self._symbol = symbol_id
        self._interval = interval
        self._ms = ms
        self._off = off
        self._native = off == INTERVALS[interval][1]  # aligned as CandleHistory aligns
        # the candle in progress when subscribed: its final is owed even if no update of it
        # was pushed before it closed
        self._current = align_down(now_ms, ms, off)

    def next_close_ms(self, now_ms: int) -> int:
        """When the candle in progress at `now_ms` closes."""
        return align_down(now_ms, self._ms, self._off) + self._ms

    def due(self, now_ms: int) -> list[Due]:
        """Pushes owed at `now_ms`, oldest first; advances the cursor."""
        cur = align_down(now_ms, self._ms, self._off)
        out = [Due(c, True) for c in self._finals(cur, now_ms)]
        if self._exists(cur):
            out.append(Due(self._history.candle(self._symbol, self._interval, cur, now_ms),
                           False))
        self._current = max(self._current, cur)
        return out

    def _finals(self, cur: int, now_ms: int) -> Iterator[Candle]:
        if self._current >= cur:
            return
        t = max(self._current, cur - MAX_CATCH_UP * self._ms)
        while t < cur:
            if self._exists(t):
                yield self._history.candle(self._symbol, self._interval, t, now_ms)
            t += self._ms

    def _exists(self, open_ms: int) -> bool:
        # history.exists checks alignment for the interval; exchanges with other alignments
        # (OKX's Hong Kong days) are checked at 1-minute granularity: start and gaps still hold
        if self._native:
            return self._history.exists(self._symbol, self._interval, open_ms)
        return (open_ms + self._ms > self._history.history_start_ms
                and self._history.exists(self._symbol, "1m", max(
                    open_ms, self._history.first_open("1m"))))
