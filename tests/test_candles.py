"""Candle validation: good batches pass unchanged, any single corruption is caught."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeeper.actors.market.candles import (
    TIMEFRAME_MS,
    InvalidCandles,
    alignment_ms,
    timeframe_ms,
    validate,
)
from candlekeeper.actors.market.closing import close_rows
from candlekeeper.actors.market.errors import BadResponse

TF = 60_000
NOW = 1_700_000_000_000 - 1_700_000_000_000 % TF + 30_000  # mid-candle


def test_timeframes():
    assert timeframe_ms("1m") == 60_000
    assert timeframe_ms("1h") == 3_600_000
    assert timeframe_ms("1w") == 604_800_000
    assert list(TIMEFRAME_MS) == ["5s", "10s", "15s", "30s", "1m", "2m", "3m", "4m", "5m", "10m", "15m", "30m",
                                  "1h", "2h", "3h", "4h", "6h", "8h", "12h", "1d", "3d", "1w"]
    assert list(TIMEFRAME_MS.values()) == sorted(TIMEFRAME_MS.values())
    # up to a day, candles open on multiples of their length: each divides the day
    assert all(86_400_000 % ms == 0 for ms in TIMEFRAME_MS.values() if ms <= 86_400_000)
    assert timeframe_ms("5s") == 5_000 and timeframe_ms("3h") == 10_800_000
    for bad in ("7m", "1s", "1M", "", None):
        with pytest.raises(ValueError, match="unknown timeframe"):
            timeframe_ms(bad)  # type: ignore[arg-type]


def test_invalid_candles_is_a_bad_response():
    assert issubclass(InvalidCandles, BadResponse)


@st.composite
def batches(draw, tf: int = TF) -> tuple[list[list], int]:
    """A shuffled batch of sane ccxt rows, newest one possibly still open."""
    n = draw(st.integers(1, 40))
    last = NOW - NOW % tf
    start = last - draw(st.integers(n - 1, n + 20)) * tf
    times = sorted(draw(st.sets(st.integers(0, (last - start) // tf), min_size=n, max_size=n)))
    price = st.floats(1e-8, 1e6, allow_nan=False, allow_infinity=False)
    rows = []
    for k in times:
        o, c = draw(price), draw(price)
        h = max(o, c) * draw(st.floats(1.0, 1.5))
        lo = min(o, c) * draw(st.floats(0.5, 1.0))
        v = draw(st.one_of(st.floats(0, 1e9), st.integers(0, 10**9)))
        rows.append([start + k * tf, o, h, lo, c, v])
    order = draw(st.permutations(range(len(rows))))
    return [rows[i] for i in order], len(rows)


FAST = settings(max_examples=40, deadline=None)


@FAST
@given(batches())
def test_valid_rows_pass_sorted(batch):
    rows, n = batch
    out = validate(rows, TF, NOW)
    assert len(out) == n
    assert [r[0] for r in out] == sorted(r[0] for r in rows)
    assert all(type(r[0]) is int and all(type(x) is float for x in r[1:]) for r in out)


@FAST
@given(batches())
def test_exact_duplicates_are_dropped(batch):
    rows, n = batch
    out = validate(rows + [list(r) for r in rows[:3]], TF, NOW)
    assert len(out) == n


def _corruptions(row: list, tf: int) -> dict[str, list]:
    ts, o, h, lo, c, v = row
    return {
        "ts None": [None, o, h, lo, c, v],
        "open None": [ts, None, h, lo, c, v],
        "close None": [ts, o, h, lo, c, None][:5] + [None] if False else [ts, o, h, lo, None, v],
        "volume None": [ts, o, h, lo, c, None],
        "open NaN": [ts, math.nan, h, lo, c, v],
        "high inf": [ts, o, math.inf, lo, c, v],
        "volume NaN": [ts, o, h, lo, c, math.nan],
        "bool price": [ts, True, h, lo, c, v],
        "string price": [ts, str(o), h, lo, c, v],
        "high below low": [ts, o, lo * 0.5, lo, c, v],
        "high below open": [ts, o, o * 0.9, min(lo, o * 0.5), c, v],
        "low above close": [ts, o, h, max(o, c) * 1.1, c, v],
        "zero price": [ts, o, h, 0.0, c, v],
        "misaligned": [ts + 1, o, h, lo, c, v],
        "float ts misaligned": [ts + 0.5, o, h, lo, c, v],
        "future": [NOW - NOW % tf + tf, o, h, lo, c, v],
        "negative volume": [ts, o, h, lo, c, -1.0],
        "short row": [ts, o, h, lo, c],
        "not a row": None,
        "dict row": {"ts": ts},
    }


CORRUPTIONS = list(_corruptions([0, 1.0, 2.0, 0.5, 1.5, 3.0], TF))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_raises(kind):
    rows = [[k * TF, 1.0, 2.0, 0.5, 1.5, 3.0] for k in range(5)]
    rows[2] = _corruptions(rows[2], TF)[kind]
    with pytest.raises(InvalidCandles, match=r"^row 2 "):
        validate(rows, TF, NOW)


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(CORRUPTIONS), st.data())
def test_any_single_corruption_raises(batch, kind, data):
    rows, _ = batch
    i = data.draw(st.integers(0, len(rows) - 1))
    bad = _corruptions(rows[i], TF)[kind]
    rows = list(rows)
    rows[i] = bad
    with pytest.raises(InvalidCandles, match=f"^row {i} "):
        validate(rows, TF, NOW)


@FAST
@given(batches(), st.data())
def test_duplicate_ts_with_different_values_raises(batch, data):
    rows, _ = batch
    i = data.draw(st.integers(0, len(rows) - 1))
    twin = list(rows[i])
    twin[5] = float(twin[5]) + 1.0
    with pytest.raises(InvalidCandles, match="twice with different values"):
        validate(rows + [twin], TF, NOW)


def test_messages_name_row_and_reason():
    good = [0, 1.0, 2.0, 0.5, 1.5, 3.0]
    with pytest.raises(InvalidCandles, match=r"^row 1 \[60000, None.*open must be a number"):
        validate([good, [60000, None, None, None, None, None]], TF, NOW)
    with pytest.raises(InvalidCandles, match="not aligned"):
        validate([[1, 1.0, 2.0, 0.5, 1.5, 3.0]], TF, NOW)
    with pytest.raises(InvalidCandles, match="in the future"):
        validate([[NOW - NOW % TF + TF, 1.0, 2.0, 0.5, 1.5, 3.0]], TF, NOW)
    with pytest.raises(InvalidCandles, match="response is None"):
        validate(None, TF, NOW)  # type: ignore[arg-type]


def test_edges_accepted():
    # extra columns ignored, int prices and float-integral ts converted, equal OHLC, zero volume
    out = validate([(120000.0, 5, 5, 5, 5, 0, "extra"), [60000, 1.0, 2.0, 0.5, 1.5, 3.0]], TF, 120000)
    assert out == [(60000, 1.0, 2.0, 0.5, 1.5, 3.0), (120000, 5.0, 5.0, 5.0, 5.0, 0.0)]
    assert validate([], TF, NOW) == []


def test_weekly_candles_open_on_monday():
    week = TIMEFRAME_MS["1w"]
    monday = 1_704_067_200_000  # 2024-01-01, a Monday; not a multiple of a week since 1970
    assert monday % week != 0 and alignment_ms(week) == TIMEFRAME_MS["1d"]
    assert validate([[monday, 1.0, 2.0, 0.5, 1.5, 3.0]], week, monday + week)[0][0] == monday


def _row(ts: int) -> list[float]:
    return [ts, 1.0, 2.0, 0.5, 1.5, 3.0]


def test_closed_by_the_exchange_showing_a_later_candle_or_by_its_clock():
    t = NOW - NOW % TF  # the candle that opened at t is still open at NOW
    rows = [_row(t - 2 * TF), _row(t - TF), _row(t)]
    out = close_rows(rows, TF, NOW, margin_ms=0)
    assert [c[0] for c in out.candles] == [t - 2 * TF, t - TF] and out.horizon_ms == t
    assert out.opens == [t - 2 * TF, t - TF, t]
    # the last row closes only by the clock, and with the margin
    assert len(close_rows(rows, TF, t + TF, margin_ms=0).candles) == 3
    assert len(close_rows(rows, TF, t + TF, margin_ms=1).candles) == 2
    assert close_rows([], TF, NOW, margin_ms=0).horizon_ms == t


def test_weekly_candles_close_on_mondays():
    week, day = 7 * 86_400_000, 86_400_000
    monday = 1_704_067_200_000  # 2024-01-01
    now = monday + week + 3 * day  # Thursday of the next week
    out = close_rows([], week, now, margin_ms=0)
    assert out.horizon_ms == monday + week  # the week that opened on Monday is still open
    rows = [[monday, 1.0, 2.0, 0.5, 1.5, 3.0]]
    assert [c[0] for c in close_rows(rows, week, now, margin_ms=0).candles] == [monday]


def test_a_slow_clock_loses_nothing_and_a_fast_one_stores_nothing_open():
    """Our clock 60 s behind the exchange: its current candle looks like the future, yet every
    candle before it is closed (the exchange shows a later one). Our clock ahead: the newest
    candle is not taken as closed unless the exchange's clock says so."""
    t = NOW - NOW % TF
    rows = [_row(t - 3 * TF), _row(t - 2 * TF), _row(t - TF), _row(t)]
    slow = close_rows(rows, TF, NOW - 60_000, margin_ms=2_000)
    assert [c[0] for c in slow.candles] == [t - 3 * TF, t - 2 * TF, t - TF]
    ahead = close_rows(rows[:-1], TF, t + 500, margin_ms=2_000)  # the exchange's t - TF is 0.5 s from closing
    assert [c[0] for c in ahead.candles] == [t - 3 * TF, t - 2 * TF] and ahead.horizon_ms == t - TF


@FAST
@given(batches())
def test_closed_keeps_exactly_finished_candles(batch):
    rows, _ = batch
    valid = validate(rows, TF, NOW)
    out = close_rows(rows, TF, NOW, margin_ms=0)
    if valid:
        assert out.candles == [c for c in valid[:-1]] + ([valid[-1]] if valid[-1][0] + TF <= NOW else [])
