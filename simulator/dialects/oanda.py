"""OANDA v20 REST, the part a candle reader uses: accounts, an account's instruments, candles.

No ccxt client speaks OANDA: `candlekeeper.actors.sources.oanda.OandaSource` does (aiohttp).
What it calls: GET /v3/accounts (the token's accounts; also the heartbeat), then
GET /v3/accounts/{id}/instruments (the market list), and
GET /v3/instruments/{EUR_USD}/candles?granularity&price&from&count&includeFirst
&alignmentTimezone=UTC&dailyAlignment=0&weeklyAlignment=Monday, with
`Accept-Datetime-Format: UNIX`.

Semantics (OANDA's docs, where they say; "modelled" where they do not):
- Every request needs `Authorization: Bearer <token>`: without one, or with a token the
  simulator was not given, 401 {"errorMessage": "Insufficient authorization to perform
  request."}; another account's instruments are 403 "The provided request was forbidden.".
- Candles: `count` 1..5000 (default 500); `from`+`count`: the first `count` candles from the
  one covering `from` (`includeFirst=false` skips that one); `to`+`count`: the last `count`
  up to `to`; `from`+`to`: every candle with open in [from, to] (modelled inclusive; more
  than 5000 is a 400); all three at once is a 400 (the docs say not to). `from`/`to` as UNIX
  seconds or RFC3339. A `to` in the future is a 400 "Time is in the future" (observed); so is
  a `from` in the future (modelled by analogy).
- Only intervals with ticks have candles ("no ticks, no record"): minutes without trades and
  the whole time the market is closed are left out. The in-progress candle is served with
  `complete: false` (and stays so for `complete_lag_ms` after its close: OANDA completes a
  candle late at times). `volume` is the tick count.
- `price`: any of M (mid), B (bid), A (ask), e.g. "BA"; bid/ask are mid -/+ a fixed half
  spread (~0.6 bp, at least one unit of the instrument's display precision).
- Alignment: candles of H2 and longer are aligned by `dailyAlignment` in `alignmentTimezone`
  (default 17 America/New_York) and weekly ones by `weeklyAlignment` (default Friday); the
  simulator serves only the UTC alignment the daemon asks for (UTC, 0, Monday: candles open on
  multiples of their length since the epoch, weeks on Monday) and refuses others with a 400
  that says so. Every granularity of fixed length is served (S5 ... W); M (a calendar month)
  is not modelled (400).
- Market hours (modelled; holidays not): currencies and CFDs closed from Friday 17:00 to
  Sunday 17:00 New York time; metals (XAU, XAG, XPT, XPD) from Friday 17:00 to Sunday 18:00
  and daily 17:00-18:00 Monday to Thursday.
- Errors are JSON {"errorMessage": "..."} whatever the status (5xx included); the rate-limit
  answer is 429 with Retry-After (its wording is modelled: OANDA documents 429 but not its
  body). Every reply carries a `RequestID` header.
"""

from __future__ import annotations

import functools
import hmac
import itertools
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..faults import PoisonKind
from ..history import Candle, Market, align_down
from ..limits import Charge, Limit
from ..reply import Reply, json_reply
from .base import Ctx, Dialect, interval_ms, poison_rows

PATH_ACCOUNTS = "/v3/accounts"
_INSTRUMENTS_SUFFIX = "/instruments"
_CANDLES_PREFIX = "/v3/instruments/"
_CANDLES_SUFFIX = "/candles"

DEFAULT_ACCOUNT = "101-004-1234567-001"
MAX_COUNT = 5000
DEFAULT_COUNT = 500

#: every granularity OANDA knows
GRANULARITY_NAMES = ("S5", "S10", "S15", "S30", "M1", "M2", "M4", "M5", "M10", "M15", "M30",
                     "H1", "H2", "H3", "H4", "H6", "H8", "H12", "D", "W", "M")
#: the ones the simulator serves -> its interval: all but M (a calendar month)
GRANULARITIES = {"S5": "5s", "S10": "10s", "S15": "15s", "S30": "30s",
                 "M1": "1m", "M2": "2m", "M4": "4m", "M5": "5m", "M10": "10m", "M15": "15m", "M30": "30m",
                 "H1": "1h", "H2": "2h", "H3": "3h", "H4": "4h", "H6": "6h", "H8": "8h", "H12": "12h",
                 "D": "1d", "W": "1w"}
#: granularities whose phase follows dailyAlignment (shorter ones divide an hour: S5..S30 open
#: on multiples of their length within the minute, M2..M30 and H1 within the hour, whatever
#: the alignment parameters)
_DAILY_ALIGNED = frozenset({"H2", "H3", "H4", "H6", "H8", "H12", "D", "W", "M"})
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "GMT", "Etc/GMT", "Z"})
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_COMPONENTS = {"B": "bid", "M": "mid", "A": "ask"}

METALS = frozenset({"XAU", "XAG", "XPT", "XPD"})
NEW_YORK = ZoneInfo("America/New_York")

UNAUTHORIZED = "Insufficient authorization to perform request."
FORBIDDEN = "The provided request was forbidden."
BAD_INSTRUMENT = "Invalid value specified for 'instrument'"
_SERVER_ERRORS = {500: "An internal server error occurred, please try again later",
                  502: "Bad Gateway", 503: "Service unavailable, please try again later",
                  504: "Gateway Timeout"}


def error(status: int, message: str, **headers: str) -> Reply:
    return json_reply(status, {"errorMessage": message}, **headers)


def invalid(name: str, why: str = "") -> Reply:
    return error(400, f"Invalid value specified for '{name}'" + (f". {why}" if why else ""))


# ----------------------------------------------------------------------- market hours
def _ny_ms(d: date, hour: int) -> int:
    return int(datetime(d.year, d.month, d.day, hour, tzinfo=NEW_YORK).timestamp()) * 1000


@functools.lru_cache(maxsize=4096)
def _closures(monday_ordinal: int, metal: bool) -> tuple[tuple[int, int], ...]:
    """Closed stretches [start, end) in UTC ms of the New York week starting on that Monday."""
    monday = date.fromordinal(monday_ordinal)
    out = []
    if metal:
        out += [(_ny_ms(monday + timedelta(days=i), 17), _ny_ms(monday + timedelta(days=i), 18))
                for i in range(4)]
    out.append((_ny_ms(monday + timedelta(days=4), 17),
                _ny_ms(monday + timedelta(days=6), 18 if metal else 17)))
    return tuple(out)


def market_closed(t_ms: int, metal: bool = False) -> bool:
    """True if OANDA's market of this kind is closed at `t_ms` (the simulator's model)."""
    return _closed_in_hour(t_ms // 3_600_000, metal)


@functools.lru_cache(maxsize=65536)
def _closed_in_hour(hour: int, metal: bool) -> bool:
    """Closures start and end on whole New York hours, which are whole UTC hours: one answer per
    hour (the oracle asks for every minute of a test's history)."""
    t_ms = hour * 3_600_000
    local = datetime.fromtimestamp(t_ms / 1000, NEW_YORK)
    monday = local.date() - timedelta(days=local.weekday())
    return any(a <= t_ms < b for a, b in _closures(monday.toordinal(), metal))


# ------------------------------------------------------------------------ instruments
def instrument_type(m: Market) -> str:
    if m.base in METALS:
        return "METAL"
    if all(len(c) == 3 and c.isalpha() for c in (m.base, m.quote)):
        return "CURRENCY"
    return "CFD"


def display_precision(m: Market) -> int:
    if m.base in METALS:
        return 3 if m.base == "XAU" else 5
    if instrument_type(m) == "CFD":
        # indices print one decimal; a synthetic instrument priced in cents (the benchmarks'
        # S0001/USD) keeps its own digits, or its prices would round to 0
        return 1 if m.base_price >= 100 else m.price_decimals
    return 3 if m.quote == "JPY" else 5


def half_spread(m: Market) -> float:
    p = display_precision(m)
    return max(10.0 ** -p, round(m.base_price * 0.6e-4, p))


@functools.lru_cache(maxsize=1024)
def _pricing(m: Market) -> tuple[int, float]:
    """(display precision, half spread) of a market: asked for each candle served or expected."""
    return display_precision(m), half_spread(m)


def _instrument(m: Market) -> dict[str, Any]:
    p = display_precision(m)
    kind = instrument_type(m)
    return {
        "name": f"{m.base}_{m.quote}", "type": kind, "displayName": f"{m.base}/{m.quote}",
        "pipLocation": 1 - p if kind != "CFD" else 0, "displayPrecision": p,
        "tradeUnitsPrecision": 0 if kind == "CURRENCY" else 1, "minimumTradeSize": "1",
        "maximumTrailingStopDistance": f"{1.0:.{p}f}",
        "minimumTrailingStopDistance": f"{5 * 10.0 ** -p:.{p}f}",
        "maximumPositionSize": "0", "maximumOrderUnits": "100000000",
        "marginRate": "0.0333" if kind == "CURRENCY" else "0.05",
        "guaranteedStopLossOrderMode": "DISABLED",
        "tags": [{"type": "ASSET_CLASS", "name": kind}],
        "financing": {"longRate": "-0.0461", "shortRate": "0.0244",
                      "financingDaysOfWeek": [{"dayOfWeek": d.upper(), "daysCharged": 1}
                                              for d in _WEEKDAYS[:5]]},
    }


# ----------------------------------------------------------------------------- times
def parse_time(raw: str) -> int | None:
    """A DateTime parameter (UNIX seconds with optional fraction, or RFC3339) in ms."""
    raw = raw.strip()
    try:
        if raw.replace(".", "", 1).isdigit():
            whole, _, frac = raw.partition(".")
            return int(whole) * 1000 + int((frac + "000")[:3])
        text = raw.replace("Z", "+00:00")
        if "." in text:  # RFC3339 with up to nanoseconds: Python takes microseconds
            head, _, rest = text.partition(".")
            digits = "".join(itertools.takewhile(str.isdigit, rest))
            text = f"{head}.{(digits + '000000')[:6]}{rest[len(digits):]}"
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def format_time(ms: int, unix: bool) -> str:
    if unix:
        return f"{ms // 1000}.{ms % 1000:03d}000000"
    dt = datetime.fromtimestamp(ms // 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}000000Z"


# --------------------------------------------------------------------------- candles
def components(m: Market, c: Candle, letters: str = "BMA") -> dict[str, tuple[Any, Any, Any, Any]]:
    """(o, h, l, c) strings per price component (of `letters`) as OANDA prints them; None stays
    None. Only the components asked for are formatted: the oracle of a long test asks for one
    per candle, tens of thousands of times."""
    p, half = _pricing(m)
    shifts = {"B": -half, "M": 0.0, "A": half}

    def shift(v: str | None, d: float) -> str | None:
        return None if v is None else f"{round(float(v), p) + d:.{p}f}"

    return {k: (shift(c.open, d), shift(c.high, d), shift(c.low, d), shift(c.close, d))
            for k, d in ((k, shifts[k]) for k in letters)}


def _bool(params: Mapping[str, str], name: str, default: bool) -> bool | None:
    raw = params.get(name)
    if raw is None:
        return default
    return {"true": True, "false": False}.get(raw.lower())


#: The documented REST limit: 120 requests a second (per IP); its best practices ask for at most
#: 100 a second on a kept-alive connection.
REST = Limit("rest", 120, 1_000, sliding=True)


class OandaDialect(Dialect):
    name = "oanda"
    ccxt_id = ""  # no ccxt client: candlekeeper.actors.sources.oanda speaks it
    omit_empty = True  # no ticks, no candle
    page_caps: ClassVar[dict[str, int]] = {"candles": MAX_COUNT}
    listing_kinds = ("accounts", "instruments")

    def __init__(self, token: str | None = None, account_id: str = DEFAULT_ACCOUNT,
                 complete_lag_ms: int = 0) -> None:
        """`token`: the Bearer token accepted (None: any non-empty one); `account_id`: the
        token's one account; `complete_lag_ms`: how long after its close a candle still says
        `complete: false`."""
        super().__init__()
        self._token = token
        self.account_id = account_id
        self.complete_lag_ms = complete_lag_ms
        self._request_ids = itertools.count(42_000_000_000_000_001)

    def __repr__(self) -> str:  # never the token
        return f"OandaDialect(account_id={self.account_id!r})"

    def set_token(self, token: str | None) -> None:
        """Accept only `token` from now on (None: any non-empty one): a token revoked, or
        restored, while a client runs."""
        self._token = token

    def market_id(self, m: Market) -> str:
        return f"{m.base}_{m.quote}"

    def market_hours(self, m: Market) -> Callable[[int], bool] | None:
        metal = m.base in METALS
        return lambda t: market_closed(t, metal)

    def ohlcv(self, m: Market, c: Candle, price: str | None = None,
              ) -> tuple[int, float, float, float, float, float]:
        if price not in (None, "M", "B", "A"):
            raise ValueError(f"price must be M, B or A, got {price!r}")
        o, h, lo, cl = components(m, c, price or "M")[price or "M"]
        return (c.open_time, float(o), float(h), float(lo), float(cl), float(c.trades))

    # ------------------------------------------------------------------------ serving
    def _authorized(self, ctx: Ctx) -> bool:
        scheme, _, token = ctx.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self._token is None or hmac.compare_digest(token.encode(), self._token.encode())

    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        if not self._authorized(ctx):
            return error(401, UNAUTHORIZED)
        if path.startswith(_CANDLES_PREFIX) and path.endswith(_CANDLES_SUFFIX):
            return self.candles(path[len(_CANDLES_PREFIX):-len(_CANDLES_SUFFIX)], params, ctx)
        if path == PATH_ACCOUNTS:
            return json_reply(200, {"accounts": [{"id": self.account_id, "tags": []}]})
        if path.startswith(PATH_ACCOUNTS + "/") and path.endswith(_INSTRUMENTS_SUFFIX):
            account = path[len(PATH_ACCOUNTS) + 1:-len(_INSTRUMENTS_SUFFIX)]
            if account != self.account_id:
                return error(403, FORBIDDEN)
            wanted = {s for s in params.get("instruments", "").split(",") if s}
            rows = [_instrument(m) for m in ctx.venue.markets()
                    if not wanted or self.market_id(m) in wanted]
            return json_reply(200, {"instruments": rows, "lastTransactionID": "1"})
        return error(404, "The requested resource does not exist")

    def limits(self, path: str) -> tuple[Charge, ...]:
        return ((REST, 1),)

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        if path == PATH_ACCOUNTS:
            return "accounts"
        if path.startswith(PATH_ACCOUNTS + "/") and path.endswith(_INSTRUMENTS_SUFFIX):
            return "instruments"
        return None

    def headers(self, path: str, ctx: Ctx) -> dict[str, str]:
        return {"RequestID": str(next(self._request_ids))}

    def candles(self, name: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        m = ctx.venue.lookup(name)
        if m is None:
            return error(400, BAD_INSTRUMENT)
        gran = params.get("granularity", "S5")
        if gran not in GRANULARITY_NAMES:
            return invalid("granularity")
        interval = GRANULARITIES.get(gran)
        if interval is None:
            return invalid("granularity", f"{gran} is not modelled by the simulator")
        price = params.get("price", "M")
        if not price or set(price) - set(_COMPONENTS) or len(set(price)) != len(price):
            return invalid("price")
        cap = ctx.caps["candles"]
        try:
            count = int(params["count"]) if "count" in params else None
        except ValueError:
            return invalid("count")
        if count is not None and not 1 <= count <= cap:
            return invalid("count", f"Maximum value for 'count' is {cap}")
        include_first = _bool(params, "includeFirst", True)
        if include_first is None:
            return invalid("includeFirst")
        smooth = _bool(params, "smooth", False)
        if smooth is None:
            return invalid("smooth")
        if smooth:
            return invalid("smooth", "smoothed candles are not modelled by the simulator")
        refused = self._alignment(gran, params)
        if refused is not None:
            return refused
        frm = to = None
        for key in ("from", "to"):
            if key in params:
                t = parse_time(params[key])
                if t is None:
                    return invalid(key)
                if t > ctx.now_ms:
                    return invalid(key, "Time is in the future")
                if key == "from":
                    frm = t
                else:
                    to = t
        if frm is not None and to is not None and count is not None:
            return invalid("count", "'count' cannot be specified with both 'from' and 'to'")
        poison = ctx.poison(m)
        if poison in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
            r = error(200 if poison is PoisonKind.BAD_SYMBOL_200 else 400, BAD_INSTRUMENT)
            r.poisoned = True
            return r
        ms = interval_ms(interval)
        history = ctx.venue.history
        got: list[Candle] = []
        if poison is PoisonKind.EMPTY:
            pass
        elif frm is not None:
            lo = align_down(frm, interval) + (0 if include_first else ms)
            if to is not None:
                if to >= lo and (align_down(to, interval) - lo) // ms + 1 > cap:
                    return invalid("to", f"Maximum number of candles ({cap}) exceeded")
                got = history.select(m.id, interval, ctx.now_ms, lo=lo, hi=to, limit=cap,
                                     omit_empty=ctx.omit_empty)
            else:
                got = history.select(m.id, interval, ctx.now_ms, lo=lo,
                                     limit=count or DEFAULT_COUNT, omit_empty=ctx.omit_empty)
        else:
            got = history.select(m.id, interval, ctx.now_ms, hi=to, limit=count or DEFAULT_COUNT,
                                 newest=True, omit_empty=ctx.omit_empty)
        unix = ctx.headers.get("accept-datetime-format", "").upper() == "UNIX"
        rows = []
        for c in poison_rows(poison, got):
            entry: dict[str, Any] = {
                "complete": ctx.now_ms >= c.open_time + ms + self.complete_lag_ms,
                "volume": None if c.volume is None else c.trades,
                "time": format_time(c.open_time, unix),
            }
            comps = components(m, c, price)
            for letter in price:
                o, h, lo_, cl = comps[letter]
                entry[_COMPONENTS[letter]] = {"o": o, "h": h, "l": lo_, "c": cl}
            rows.append(entry)
        r = json_reply(200, {"instrument": name, "granularity": gran, "candles": rows})
        r.poisoned = poison is not None
        return r

    def _alignment(self, gran: str, params: Mapping[str, str]) -> Reply | None:
        """Validate the alignment parameters; refuse the ones the simulator does not model."""
        try:
            hour = int(params.get("dailyAlignment", "17"))
        except ValueError:
            return invalid("dailyAlignment")
        if not 0 <= hour <= 23:
            return invalid("dailyAlignment")
        tz = params.get("alignmentTimezone", "America/New_York")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            return invalid("alignmentTimezone")
        weekly = params.get("weeklyAlignment", "Friday")
        if weekly not in _WEEKDAYS:
            return invalid("weeklyAlignment")
        if gran in _DAILY_ALIGNED and (tz not in _UTC_NAMES or hour != 0
                                       or (gran == "W" and weekly != "Monday")):
            return invalid("alignmentTimezone",
                           "the simulator serves only alignmentTimezone=UTC, dailyAlignment=0"
                           " and weeklyAlignment=Monday for H2 and longer")
        return None

    # ----------------------------------------------------------------------- failures
    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        return error(429, "Requests are being rate limited; please slow down",
                     **{"Retry-After": str(retry_after_s)})

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        return error(status, _SERVER_ERRORS.get(status, "Error"))

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        return error(400 if status is None else status, BAD_INSTRUMENT)
