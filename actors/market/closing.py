"""When is a candle closed? By the exchange's word, or by the exchange's clock, never by ours alone.

A candle is closed when the exchange itself shows a later candle in the same answer, or when its
close time has passed on the exchange's clock (ours, corrected by the offset measured from the
exchange's own answers), with a margin for how well that offset is known. Our clock may be wrong
either way: 5 s ahead and the in-progress candle would be stored as closed (with numbers that
later change); 60 s behind and the exchange's current candle looks like it is from the future.
Neither rejects an answer: a candle that is not known closed is simply not stored yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .candles import Candle, validate

NO_MEASUREMENT_MARGIN_MS = 2_000  # no server time at all: the old documented skew margin
DATE_MARGIN_MS = 1_000  # a Date header is the server's time truncated to the second
FAR_FUTURE_MS = 300_000  # rows opening this far past the exchange's now are garbage, not candles
WEEK_MS = 7 * 86_400_000
WEEK_PHASE_MS = 4 * 86_400_000  # 1970-01-01 was a Thursday: weeks open 4 days after a multiple


class ServerClock:
    """The exchange's clock as an offset from ours, measured from its answers.

    A precise source (the exchange's server-time endpoint, in ms) is preferred to `Date` headers
    (whole seconds). The offset is None until something was measured."""

    def __init__(self) -> None:
        self.offset_ms: float | None = None
        self._precise = False
        self._uncertainty_ms = float(NO_MEASUREMENT_MARGIN_MS)

    def measure(self, server_ms: int, local_mid_ms: float, *, precise: bool, rtt_ms: float = 0.0) -> None:
        """`server_ms` was the exchange's time when ours was `local_mid_ms` (mid-request)."""
        if precise:
            self.offset_ms = server_ms - local_mid_ms
            self._precise = True
            self._uncertainty_ms = min(1_000.0, rtt_ms / 2 + 100.0)
        elif not self._precise:
            # the Date header truncates: the server's time was in [server_ms, server_ms + 1000)
            self.offset_ms = server_ms + 500 - local_mid_ms
            self._uncertainty_ms = float(DATE_MARGIN_MS)

    def now_ms(self, local_ms: int) -> int:
        """The exchange's time when ours is `local_ms`, as best known."""
        return int(local_ms + (self.offset_ms or 0.0))

    def margin_ms(self) -> int:
        """How far off `now_ms` may be."""
        return int(self._uncertainty_ms)


@dataclass(frozen=True)
class Closed:
    """An answer's rows, sorted out: `candles` closed (oldest first), `opens` the open time of
    every valid row it returned (closed or not), `horizon_ms` the open time of the first candle
    not known closed, `now_ms` the exchange's time used."""

    candles: list[Candle]
    opens: list[int]
    horizon_ms: int
    now_ms: int


def close_rows(rows: Sequence[Any], tf_ms: int, now_ms: int, *, margin_ms: int) -> Closed:
    """Validate an answer's rows and keep the closed ones (see the module docstring)."""
    candles = validate(rows, tf_ms, now_ms + FAR_FUTURE_MS + tf_ms)
    # candles longer than a day do not open on multiples of their length since 1970 (weeks open on
    # Mondays): take their phase from the answer, or a week's from the calendar
    phase = candles[-1][0] % tf_ms if candles else (WEEK_PHASE_MS if tf_ms == WEEK_MS else 0)
    by_clock = (now_ms - margin_ms - phase) // tf_ms * tf_ms + phase  # first open time the clock does not close
    if not candles:
        return Closed([], [], by_clock, now_ms)
    last = candles[-1][0]
    if last + tf_ms <= now_ms - margin_ms:
        return Closed(candles, [c[0] for c in candles], max(last + tf_ms, by_clock), now_ms)
    # every row but the last is closed: the exchange shows a later one
    return Closed(candles[:-1], [c[0] for c in candles], last, now_ms)
