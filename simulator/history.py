"""Deterministic candle history: any candle is an O(1) function of (seed, symbol, interval, open time).

Prices follow a smooth multi-scale path ``P(t)`` (a sum of sinusoids whose amplitudes grow
with the square root of their period, so it looks like a random walk) plus per-timestamp hash
noise. A candle's open is ``P(open)`` and its close is ``P(next open)``, so consecutive candles
join up and every interval agrees on opens/closes. Wicks and volume are hash-seeded per candle.
Nothing iterates history, so a server with 1000 symbols answers any window in O(limit).

The candle whose open <= now < close is *in progress*: its close is ``P(now)``, its wicks and
volume grow with the elapsed fraction, so it differs from (and converges to) the final candle.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .catalogue import pair_level, usd_level, volatility

_MASK = (1 << 64) - 1
_DAY_MS = 86_400_000
_MINUTE = 60_000
#: Binance aligns weekly candles to Monday 00:00 UTC; the epoch was a Thursday.
_WEEK_OFFSET_MS = 4 * _DAY_MS

_CLOSED_MEMO_MAX = 50_000  # closed candles remembered per history (a few tens of MB at most)

#: interval name -> (duration ms, alignment offset ms): every interval a dialect serves. 3d and
#: 1M are left out: Binance aligns them to a calendar we do not model (and OANDA's M is a month).
INTERVALS: dict[str, tuple[int, int]] = {
    "1s": (1_000, 0),
    "5s": (5_000, 0),
    "10s": (10_000, 0),
    "15s": (15_000, 0),
    "30s": (30_000, 0),
    "1m": (60_000, 0),
    "2m": (120_000, 0),
    "3m": (180_000, 0),
    "4m": (240_000, 0),
    "5m": (300_000, 0),
    "10m": (600_000, 0),
    "15m": (900_000, 0),
    "30m": (1_800_000, 0),
    "1h": (3_600_000, 0),
    "2h": (7_200_000, 0),
    "3h": (10_800_000, 0),
    "4h": (14_400_000, 0),
    "6h": (21_600_000, 0),
    "8h": (28_800_000, 0),
    "12h": (43_200_000, 0),
    "1d": (_DAY_MS, 0),
    "1w": (7 * _DAY_MS, _WEEK_OFFSET_MS),
}
#: the ones Binance serves (its `interval` names; the others are OANDA's)
BINANCE_INTERVALS: tuple[str, ...] = ("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h",
                                      "12h", "1d", "1w")

# Periods (minutes) of the price path's components; amplitude ~ sqrt(period) like a random walk,
# capped at ~4 days so prices stay near their catalogue level (typically within +-15%).
_PERIODS_MIN = (7.0, 37.0, 181.0, 1009.0, 6121.0, 33_301.0, 140_009.0, 525_949.0)
_AMP_PERIOD_CAP_MIN = 6_000.0
_VOL_PER_SQRT_MIN = 0.0009
_NOISE = 0.0004
_WICK_PER_SQRT_MIN = 0.0006
_TAU = 2.0 * math.pi


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _unit(seed: int, t: int, salt: int) -> float:
    """Deterministic uniform in [0, 1) for (seed, t, salt)."""
    return _mix(seed ^ _mix((t * 0x100000001B3 + salt) & _MASK)) / 18446744073709551616.0


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def symbol_id(symbol: str) -> str:
    """Binance market id of a unified symbol ("BTC/USDT" -> "BTCUSDT"); ids pass through."""
    return symbol.replace("/", "").upper()


def align_down(t_ms: int, interval: str) -> int:
    """Open time of the candle of `interval` that contains `t_ms`."""
    ms, off = INTERVALS[interval]
    return (t_ms - off) // ms * ms + off


def align_up(t_ms: int, interval: str) -> int:
    """First candle open time >= `t_ms`."""
    ms, off = INTERVALS[interval]
    return -((off - t_ms) // ms) * ms + off


class Candle(NamedTuple):
    """One kline in Binance's wire form (prices/volumes as strings with 8 decimals)."""

    open_time: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    close_time: int
    quote_volume: str
    trades: int
    taker_base: str
    taker_quote: str

    def row(self) -> list:
        """The 12-element array Binance returns for /api/v3/klines."""
        return [self.open_time, self.open, self.high, self.low, self.close, self.volume,
                self.close_time, self.quote_volume, self.trades, self.taker_base,
                self.taker_quote, "0"]

    def ohlcv(self) -> tuple[int, float, float, float, float, float]:
        """(ts, o, h, l, c, v) exactly as ccxt's parse_ohlcv returns it."""
        return (self.open_time, float(self.open), float(self.high), float(self.low),
                float(self.close), float(self.volume))


@dataclass(frozen=True)
class Market:
    """A spot market the simulator lists."""

    symbol: str  # unified, "BTC/USDT"
    id: str  # exchange id, "BTCUSDT"
    base: str
    quote: str
    seed: int
    base_price: float
    price_decimals: int
    base_volume: float  # mean volume of a 1-minute candle
    waves: tuple[tuple[float, float, float], ...]  # (angular freq per minute, phase, amplitude)
    calm: float = 1.0  # volatility relative to a crypto pair (forex moves far less)

    @property
    def tick_size(self) -> str:
        return f"{10.0 ** -self.price_decimals:.8f}"


def _make_market(symbol: str, seed: int) -> Market:
    if symbol.count("/") != 1:
        raise ValueError(f"symbol must look like BASE/QUOTE, got {symbol!r}")
    base, quote = (s.upper() for s in symbol.split("/"))
    if not base or not quote:
        raise ValueError(f"symbol must look like BASE/QUOTE, got {symbol!r}")
    h = _mix(_stable_hash(f"{base}/{quote}") ^ _mix(seed & _MASK))
    price = pair_level(base, quote)
    if price is None:  # unknown asset: log-uniform level in [0.01, 50_000]
        price = 10.0 ** (-2 + 6.7 * ((h & 0xFFFFFFFF) / 4294967296.0))
    decimals = max(0, min(8, 5 - math.floor(math.log10(price))))
    base_usd = usd_level(base) or price * (usd_level(quote) or 1.0)
    volume = 50_000.0 / base_usd * (0.5 + ((h >> 32) & 0xFFFF) / 65536.0)  # ~$50k a minute
    calm = volatility(base, quote)
    waves = tuple((_TAU / period, _TAU * _unit(h, i, 0x5EED),
                   calm * _VOL_PER_SQRT_MIN * math.sqrt(min(period, _AMP_PERIOD_CAP_MIN)))
                  for i, period in enumerate(_PERIODS_MIN))
    return Market(symbol=f"{base}/{quote}", id=base + quote, base=base, quote=quote, seed=h,
                  base_price=price, price_decimals=decimals, base_volume=volume, waves=waves,
                  calm=calm)


def _fmt(x: float, decimals: int) -> str:
    return f"{round(x, decimals):.8f}"


#: Minute open times without trades: a set of open times, or a predicate on the open time.
NoTrade = Iterable[int] | Callable[[int], bool]
#: A market's trading hours: market -> predicate "the market is closed at this minute open", or
#: None for a market that never closes (every crypto exchange).
MarketHours = Callable[["Market"], Callable[[int], bool] | None]


class _Minutes:
    """One symbol's no-trade minutes, as a set (fast counting) or a predicate."""

    def __init__(self, spec: NoTrade) -> None:
        if callable(spec):
            self.pred: Callable[[int], bool] | None = spec
            self.set: frozenset[int] = frozenset()
        else:
            self.pred = None
            self.set = frozenset(int(t) for t in spec)

    def empty(self, minute_open: int) -> bool:
        return self.pred(minute_open) if self.pred is not None else minute_open in self.set

    def all_empty(self, start: int, end: int) -> bool:
        """True if every minute opening in [start, end) has no trades (and there is one)."""
        first = start - start % _MINUTE
        n = -(-(end - first) // _MINUTE)
        if n <= 0:
            return False
        if self.pred is None and len(self.set) < n:
            return False
        return all(self.empty(first + i * _MINUTE) for i in range(n))


def _either(a: Callable[[int], bool], b: Callable[[int], bool]) -> Callable[[int], bool]:
    return lambda t: a(t) or b(t)


class CandleHistory:
    """The deterministic candle source behind one simulated exchange.

    `history_start_ms`: the first candle of every interval is the one containing this instant;
    nothing exists before it. `gaps`: per symbol (unified or id), open times the exchange
    genuinely has no candle for (any interval whose candle opens there omits it).
    `listed_at`: per symbol, the listing instant; like `history_start_ms` but per symbol (the
    later of the two wins). `no_trade`: per symbol, 1-minute open times without trades; a
    candle of any interval is *empty* when every elapsed minute in it is one. Whether an empty
    candle is omitted or served flat (O=H=L=C=previous close, volume 0) is the caller's choice
    (`omit_empty`), because exchanges differ. `market_hours`: per market, the minutes the market
    is closed (forex weekends); a candle whose every elapsed minute is closed does not exist on
    any exchange (never served flat), and closed minutes count as quiet for `no_trade`.
    """

    def __init__(self, symbols: Iterable[str], history_start_ms: int, *, seed: int = 0,
                 gaps: Mapping[str, Iterable[int]] | None = None,
                 listed_at: Mapping[str, int] | None = None,
                 no_trade: Mapping[str, NoTrade] | None = None,
                 market_hours: MarketHours | None = None) -> None:
        self.history_start_ms = int(history_start_ms)
        self.seed = seed
        self._market_hours = market_hours
        self._markets: dict[str, Market] = {}
        # closed candles never change (P(t) is a pure function): tests re-read the same history
        # many times a second while they wait for a store to be exact
        self._closed_memo: dict[tuple[str, int, int], Candle] = {}
        self.version = 0  # counts the changes to what the history holds (markets, listing times)
        for s in symbols:
            m = _make_market(s, seed)
            if m.id in self._markets:
                raise ValueError(f"duplicate market id {m.id} (from {s!r})")
            self._markets[m.id] = m
        self._gaps: dict[str, frozenset[int]] = {}
        for key, times in (gaps or {}).items():
            self._gaps[self._known_id(key, "gap")] = frozenset(int(t) for t in times)
        self._listed_at: dict[str, int] = {}
        for key, t in (listed_at or {}).items():
            self._listed_at[self._known_id(key, "listing time")] = int(t)
        self._no_trade: dict[str, _Minutes] = {}
        for key, spec in (no_trade or {}).items():
            self._no_trade[self._known_id(key, "no-trade minutes")] = _Minutes(spec)
        self._closed: dict[str, _Minutes] = {}
        for m in self._markets.values():
            self._add_hours(m)

    def _add_hours(self, m: Market) -> None:
        """Register `m`'s trading hours: closed minutes are also quiet ones (copy-on-write)."""
        closed = self._market_hours(m) if self._market_hours is not None else None
        if closed is None:
            return
        self._closed = {**self._closed, m.id: _Minutes(closed)}
        quiet = self._no_trade.get(m.id)
        combined = _Minutes(closed) if quiet is None else _Minutes(_either(closed, quiet.empty))
        self._no_trade = {**self._no_trade, m.id: combined}

    def _known_id(self, key: str, what: str) -> str:
        mid = symbol_id(key)
        if mid not in self._markets:
            raise ValueError(f"{what} for unknown symbol {key!r}")
        return mid

    # ----------------------------------------------------------------- markets
    @property
    def markets(self) -> list[Market]:
        """Known markets in configuration order."""
        return list(self._markets.values())

    def market(self, symbol: str) -> Market | None:
        """Market by unified symbol or Binance-style id, or None."""
        return self._markets.get(symbol_id(symbol))

    def add_market(self, symbol: str) -> Market:
        """Make `symbol` known (idempotent). Copy-on-write: readers never see a half update."""
        m = self.market(symbol)
        if m is not None:
            return m
        m = _make_market(symbol, self.seed)
        self._add_hours(m)
        self._markets = {**self._markets, m.id: m}
        self.version += 1
        return m

    def set_listed_at(self, symbol: str, listed_at_ms: int | None) -> None:
        """Change (or clear, with None) when `symbol` started trading."""
        mid = self._known_id(symbol, "listing time")
        listed = dict(self._listed_at)
        if listed_at_ms is None:
            listed.pop(mid, None)
        else:
            listed[mid] = int(listed_at_ms)
        self._listed_at = listed
        self.version += 1

    def listed_at(self, symbol: str) -> int | None:
        return self._listed_at.get(symbol_id(symbol))

    # ------------------------------------------------------------------ prices
    def _log_price(self, m: Market, t: int) -> float:
        minutes = t / 60_000.0
        s = 0.0
        for freq, phase, amp in m.waves:
            s += amp * math.sin(freq * minutes + phase)
        return s + m.calm * _NOISE * (2.0 * _unit(m.seed, t, 1) - 1.0)

    def price(self, symbol: str, t_ms: int) -> float:
        """The (unrounded) price path at `t_ms`."""
        m = self._require(symbol)
        return m.base_price * math.exp(self._log_price(m, t_ms))

    def _require(self, symbol: str) -> Market:
        m = self.market(symbol)
        if m is None:
            raise KeyError(symbol)
        return m

    # ----------------------------------------------------------------- candles
    def start_ms(self, symbol: str | None = None) -> int:
        """First instant with trades: history start, or the symbol's listing if later."""
        if symbol is None:
            return self.history_start_ms
        listed = self._listed_at.get(symbol_id(symbol))
        return self.history_start_ms if listed is None else max(self.history_start_ms, listed)

    def first_open(self, interval: str, symbol: str | None = None) -> int:
        """Open time of the oldest candle of `interval` (of `symbol`, if given)."""
        return align_down(self.start_ms(symbol), interval)

    def exists(self, symbol: str, interval: str, open_ms: int) -> bool:
        """True if the exchange has a candle opening at `open_ms` (ignores 'now' and no-trade
        minutes)."""
        m = self._require(symbol)
        return (open_ms >= self.first_open(interval, m.id)
                and align_down(open_ms, interval) == open_ms
                and open_ms not in self._gaps.get(m.id, ()))

    def is_empty(self, symbol: str, interval: str, open_ms: int, now_ms: int) -> bool:
        """True if no trade happened in the candle (so far, for the one in progress)."""
        m = self._require(symbol)
        return self._is_empty(m, INTERVALS[interval][0], open_ms, now_ms)

    def is_closed(self, symbol: str, interval: str, open_ms: int, now_ms: int) -> bool:
        """True if the market was closed throughout the candle (so far, for the one in
        progress): no exchange has such a candle."""
        m = self._require(symbol)
        return m.id in self._closed and self._is_closed(m, INTERVALS[interval][0], open_ms, now_ms)

    def _is_closed(self, m: Market, ms: int, open_ms: int, now_ms: int) -> bool:
        hours = self._closed[m.id]
        if ms < _MINUTE:
            return hours.empty(open_ms - open_ms % _MINUTE)
        return hours.all_empty(open_ms, min(open_ms + ms, max(now_ms, open_ms + 1)))

    def _is_empty(self, m: Market, ms: int, open_ms: int, now_ms: int) -> bool:
        minutes = self._no_trade.get(m.id)
        if minutes is None:
            return False
        if ms < _MINUTE:
            return minutes.empty(open_ms - open_ms % _MINUTE)
        return minutes.all_empty(open_ms, min(open_ms + ms, max(now_ms, open_ms + 1)))

    def candle(self, symbol: str, interval: str, open_ms: int, now_ms: int) -> Candle:
        """The candle opening at `open_ms` as seen at `now_ms` (in progress if not yet closed).

        Does not check existence or no-trade minutes; callers use `select`/`klines`. Raises
        ValueError for a candle that has not opened yet.
        """
        if now_ms < open_ms:
            raise ValueError("candle has not opened yet")
        return self._candle(self._require(symbol), INTERVALS[interval][0], open_ms, now_ms, {})

    def _flat(self, m: Market, ms: int, open_ms: int, prices: dict[int, float]) -> Candle:
        """A candle without trades as filling exchanges send it: the last traded price (the
        close before the run of quiet minutes it belongs to), no volume."""
        minutes = self._no_trade[m.id]
        first = self.start_ms(m.id)
        t = open_ms - open_ms % _MINUTE
        while t - _MINUTE >= first and minutes.empty(t - _MINUTE):
            t -= _MINUTE
        p = prices.get(t)
        if p is None:
            p = prices[t] = m.base_price * math.exp(self._log_price(m, t))
        px = f"{round(p, m.price_decimals):.8f}"
        zero = "0.00000000"
        return Candle(open_time=open_ms, open=px, high=px, low=px, close=px, volume=zero,
                      close_time=open_ms + ms - 1, quote_volume=zero, trades=0,
                      taker_base=zero, taker_quote=zero)

    def _candle(self, m: Market, ms: int, open_ms: int, now_ms: int,
                prices: dict[int, float]) -> Candle:
        """`prices` memoises P(t) within one page: a candle's close is the next one's open."""
        end = open_ms + ms
        closed = now_ms >= end
        if closed:
            key = (m.id, ms, open_ms)
            hit = self._closed_memo.get(key)
            if hit is None:
                if len(self._closed_memo) >= _CLOSED_MEMO_MAX:
                    self._closed_memo.clear()  # bounded: a long simulation keeps the recent ones
                hit = self._closed_memo[key] = self._make_candle(m, ms, open_ms, now_ms, prices)
            return hit
        return self._make_candle(m, ms, open_ms, now_ms, prices)

    def _make_candle(self, m: Market, ms: int, open_ms: int, now_ms: int,
                     prices: dict[int, float]) -> Candle:
        end = open_ms + ms
        closed = now_ms >= end
        frac = 1.0 if closed else (now_ms - open_ms) / ms
        o = prices.get(open_ms)
        if o is None:
            o = prices[open_ms] = m.base_price * math.exp(self._log_price(m, open_ms))
        c_t = end if closed else now_ms
        c = prices.get(c_t)
        if c is None:
            c = prices[c_t] = m.base_price * math.exp(self._log_price(m, c_t))
        minutes = ms / 60_000.0
        wick = m.calm * _WICK_PER_SQRT_MIN * math.sqrt(minutes) * frac
        bits = _mix(m.seed ^ _mix((open_ms * 0x100000001B3 + ms) & _MASK))  # interval-specific
        u_hi = (bits & 0xFFFF) / 65536.0
        u_lo = ((bits >> 16) & 0xFFFF) / 65536.0
        u_vol = ((bits >> 32) & 0xFFFF) / 65536.0
        u_tak = (bits >> 48) / 65536.0
        d = m.price_decimals
        o_r, c_r = round(o, d), round(c, d)
        h_r = max(round(max(o, c) * (1.0 + wick * u_hi), d), o_r, c_r)
        l_r = min(round(min(o, c) * (1.0 - wick * u_lo), d), o_r, c_r)
        full_vol = round(m.base_volume * minutes * (0.25 + 1.5 * u_vol), 4)
        # in progress: strictly below the final volume, so a stored in-progress candle is always wrong
        vol = full_vol if closed else max(0.0, min(round(full_vol * frac, 4), round(full_vol - 0.0001, 4)))
        avg = (o_r + h_r + l_r + c_r) / 4.0
        taker = 0.3 + 0.4 * u_tak
        trades = int(vol / m.base_volume * 40.0 * (0.5 + u_tak)) + (1 if vol > 0 else 0)
        return Candle(
            open_time=open_ms,
            open=f"{o_r:.8f}", high=f"{h_r:.8f}", low=f"{l_r:.8f}", close=f"{c_r:.8f}",
            volume=f"{vol:.8f}",
            close_time=end - 1,
            quote_volume=_fmt(vol * avg, 8),
            trades=trades,
            taker_base=_fmt(vol * taker, 8),
            taker_quote=_fmt(vol * taker * avg, 8),
        )

    def _at(self, m: Market, ms: int, t: int, now_ms: int, prices: dict[int, float],
            gaps: frozenset[int] | tuple, omit_empty: bool) -> Candle | None:
        """The candle opening at `t` as served, or None if the exchange leaves it out."""
        if t in gaps:
            return None
        if m.id in self._closed and self._is_closed(m, ms, t, now_ms):
            return None
        if m.id in self._no_trade and self._is_empty(m, ms, t, now_ms):
            return None if omit_empty else self._flat(m, ms, t, prices)
        return self._candle(m, ms, t, now_ms, prices)

    def select(self, symbol: str, interval: str, now_ms: int, *, lo: int | None = None,
               hi: int | None = None, limit: int = 500, newest: bool = False,
               omit_empty: bool = False, closed_only: bool = False) -> list[Candle]:
        """Up to `limit` candles with open time in [lo, hi] (inclusive, either may be None),
        ascending. `newest` keeps the newest ones when more qualify (else the oldest).

        The in-progress candle qualifies unless `closed_only`. Nothing before the symbol's
        first candle or after now. Gaps and (with `omit_empty`) empty candles are skipped
        without shortening the page.
        """
        m = self._require(symbol)
        ms, _ = INTERVALS[interval]
        first = self.first_open(interval, m.id)
        last = align_down(now_ms, interval) - (ms if closed_only else 0)
        if hi is not None:
            last = min(last, align_down(hi, interval))
        start = first if lo is None else max(first, align_up(lo, interval))
        out: list[Candle] = []
        if limit <= 0 or last < start:
            return out
        gaps = self._gaps.get(m.id, ())
        prices: dict[int, float] = {}
        if not newest:
            t = start
            while t <= last and len(out) < limit:
                c = self._at(m, ms, t, now_ms, prices, gaps, omit_empty)
                if c is not None:
                    out.append(c)
                t += ms
            return out
        t = last
        while t >= start and len(out) < limit:
            c = self._at(m, ms, t, now_ms, prices, gaps, omit_empty)
            if c is not None:
                out.append(c)
            t -= ms
        out.reverse()
        return out

    def klines(self, symbol: str, interval: str, now_ms: int, *, start_ms: int | None = None,
               end_ms: int | None = None, limit: int = 500,
               omit_empty: bool = False) -> list[Candle]:
        """Candles as Binance's /api/v3/klines selects them.

        With `start_ms`: the first `limit` candles with open >= start (and <= end), ascending.
        Without: the last `limit` candles with open <= end (default now), i.e. ending with
        the in-progress candle. Gaps are skipped without shortening the page.
        """
        return self.select(symbol, interval, now_ms, lo=start_ms, hi=end_ms, limit=limit,
                           newest=start_ms is None, omit_empty=omit_empty)

    def expected_candles(self, symbol: str, interval: str, start_ms: int, end_ms: int,
                         now_ms: int, *, omit_empty: bool = False,
                         reachable_from_ms: int | None = None,
                         row: Callable[[Market, Candle], tuple[int, float, float, float, float, float]]
                         | None = None,
                         ) -> list[tuple[int, float, float, float, float, float]]:
        """Every *closed* candle (at `now_ms`) with open time in [start_ms, end_ms), as ccxt
        parses it: (ts, open, high, low, close, volume). What a correct store must hold.

        `omit_empty` leaves out candles without trades (exchanges that omit them);
        `reachable_from_ms` leaves out older candles (exchanges with limited reach); `row`
        shapes each candle as the exchange's client returns it (default `Candle.ohlcv`)."""
        m = self._require(symbol)
        ms, _ = INTERVALS[interval]
        gaps = self._gaps.get(m.id, ())
        lo = max(start_ms, reachable_from_ms) if reachable_from_ms is not None else start_ms
        t = max(self.first_open(interval, m.id), align_up(lo, interval))
        out = []
        prices: dict[int, float] = {}
        while t < end_ms and t + ms <= now_ms:
            c = self._at(m, ms, t, now_ms, prices, gaps, omit_empty)
            if c is not None:
                out.append(c.ohlcv() if row is None else row(m, c))
            t += ms
        return out
