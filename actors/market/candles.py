"""Candle validation: the last line of defence before rows reach the store.

ccxt can hand back garbage without raising (a 200 response with a truncated
JSON body becomes rows of ``None``), so every batch is checked here and a bad
batch is rejected as a whole: storing half of a broken answer would hide the
gap from the refill logic forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import BadResponse

__all__ = [
    "TIMEFRAME_MS",
    "Candle",
    "InvalidCandles",
    "Row",
    "alignment_ms",
    "timeframe_ms",
    "validate",
]

_SECOND = 1_000
_MINUTE = 60 * _SECOND
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR

#: Supported timeframes and their length in milliseconds, shortest first: ccxt's usual ones,
#: and the seconds, 2m, 4m, 10m and 3h OANDA also has (an exchange without one of them refuses it
#: in the config, by ccxt's `timeframes` table or the source's own list). Those up to 1d divide a
#: day, so their candles open on multiples of their length since the epoch (`alignment_ms`). Monthly candles
#: (1M) are not here: a series steps by one fixed length, and months differ in length.
TIMEFRAME_MS: dict[str, int] = {
    "5s": 5 * _SECOND,
    "10s": 10 * _SECOND,
    "15s": 15 * _SECOND,
    "30s": 30 * _SECOND,
    "1m": _MINUTE,
    "2m": 2 * _MINUTE,
    "3m": 3 * _MINUTE,
    "4m": 4 * _MINUTE,
    "5m": 5 * _MINUTE,
    "10m": 10 * _MINUTE,
    "15m": 15 * _MINUTE,
    "30m": 30 * _MINUTE,
    "1h": _HOUR,
    "2h": 2 * _HOUR,
    "3h": 3 * _HOUR,
    "4h": 4 * _HOUR,
    "6h": 6 * _HOUR,
    "8h": 8 * _HOUR,
    "12h": 12 * _HOUR,
    "1d": _DAY,
    "3d": 3 * _DAY,
    "1w": 7 * _DAY,
}

#: (ts, open, high, low, close, volume): one candle of a series, as ccxt returns it.
Candle = tuple[int, float, float, float, float, float]
#: (exchange, symbol, timeframe, ts, open, high, low, close, volume): one row of the candles table.
Row = tuple[str, str, str, int, float, float, float, float, float]
GapRow = tuple[str, str, str, int, int, str]  # a confirmed gap: exchange, symbol, timeframe, from, to, reason


class InvalidCandles(BadResponse):
    """The exchange answered, but the candles in the answer cannot be trusted."""


def timeframe_ms(tf: str) -> int:
    """Length of timeframe ``tf`` in ms; ValueError names the supported ones."""
    try:
        return TIMEFRAME_MS[tf]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown timeframe {tf!r}; expected one of {' '.join(TIMEFRAME_MS)}"
        ) from None


def alignment_ms(timeframe_ms: int) -> int:
    """Boundary that candle open times of this timeframe fall on.

    Up to 1d candles open on multiples of their own length since the epoch.
    Longer ones do not: weekly candles open on Mondays (the epoch was a
    Thursday) and exchanges differ on 3d phases, so only the day is checked.
    """
    return timeframe_ms if timeframe_ms <= _DAY else _DAY


def _short(row: Any) -> str:
    text = repr(row)
    return text if len(text) <= 120 else text[:117] + "..."


_FIELDS = ("open", "high", "low", "close", "volume")


def _bad(index: int, row: Any, why: str) -> InvalidCandles:
    return InvalidCandles(f"row {index} {_short(row)}: {why}")


def validate(rows: Iterable[Any], timeframe_ms: int, latest_ms: int) -> list[Candle]:
    """Check a ccxt OHLCV batch and return it as clean, sorted tuples.

    Each row must be a list/tuple of at least 6 finite numbers (extra columns
    are ignored): an integral, aligned, not-future open time, prices > 0,
    volume >= 0, and high/low enclosing open and close. Exact duplicates are
    dropped; two different rows for the same open time raise, as does any bad
    row (the message names the first one and why).
    """
    if rows is None:
        raise InvalidCandles("response is None instead of a list of candles")
    align = alignment_ms(timeframe_ms)
    out: dict[int, Candle] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise _bad(i, row, f"expected a list of 6 values, got {type(row).__name__}")
        if len(row) < 6:
            raise _bad(i, row, f"expected 6 values, got {len(row)}")
        ts = row[0]
        tt = type(ts)
        if tt is not int:
            if (tt is float and ts.is_integer()) or (isinstance(ts, int) and tt is not bool):
                ts = int(ts)
            else:
                raise _bad(i, row, f"timestamp must be an integer, got {ts!r}")
        if ts % align:
            raise _bad(i, row, f"timestamp {ts} is not aligned to {timeframe_ms} ms")
        if ts > latest_ms:
            raise _bad(i, row, f"timestamp {ts} is in the future (later than {latest_ms})")
        if ts < 0:
            raise _bad(i, row, f"timestamp {ts} is before 1970")
        values = []
        for name, v in zip(_FIELDS, row[1:6], strict=True):
            vt = type(v)
            if vt is not float:
                if vt is bool or not isinstance(v, (int, float)):
                    raise _bad(i, row, f"{name} must be a number, got {v!r}")
                v = float(v)
            if not math.isfinite(v):
                raise _bad(i, row, f"{name} is not finite: {v!r}")
            values.append(v)
        o, h, lo, c, vol = values
        if lo <= 0.0:
            raise _bad(i, row, f"prices must be > 0, low is {lo!r}")
        if vol < 0.0:
            raise _bad(i, row, f"volume is negative: {vol!r}")
        if h < o or h < c:
            raise _bad(i, row, "high is below open or close")
        if lo > o or lo > c:
            raise _bad(i, row, "low is above open or close")
        candle = (ts, o, h, lo, c, vol)
        seen = out.get(ts)
        if seen is None:
            out[ts] = candle
        elif seen != candle:
            raise _bad(i, row, f"timestamp {ts} appears twice with different values")
    return [out[ts] for ts in sorted(out)]
