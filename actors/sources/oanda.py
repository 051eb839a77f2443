"""OANDA's v20 REST API as a source of candles, beside ccxt (which does not cover OANDA).

Plain HTTP over aiohttp, one session per source, on the exchange actor's asyncio loop:

- markets: GET /v3/accounts (the accounts the token may use; the first one, unless the
  settings name one), then GET /v3/accounts/{id}/instruments. No account id to configure.
- candles: GET /v3/instruments/{EUR_USD}/candles with `granularity` (5s -> S5 ... 1w -> W,
  `GRANULARITIES`), `price` (M mid by default, B bid or A ask: the stored OHLC is that one
  component; a candle row holds one price, so bid and ask are two configured exchanges), `from`
  (UNIX seconds, `Accept-Datetime-Format: UNIX`) + `count` + `includeFirst=true`, and
  `alignmentTimezone=UTC&dailyAlignment=0&weeklyAlignment=Monday` so H2..D candles open on
  multiples of their length since the epoch and weeks on Monday 00:00 UTC, as the daemon's
  other exchanges. Paging is by window ([since, until), `Profile.paging = "window"`): `count`
  is the number of candle slots in the window (<= 5000), so the answer holds every candle of
  the window whichever way OANDA counts (the first `count` candles from `from`, as documented,
  or `count` intervals: both cover the window), and a short answer never passes for "nothing
  more". Never `to`: OANDA refuses a `to` in the future with a 400 (not a transient), and a
  window ending after now is the normal case. Only `complete: true` candles become rows;
  volume is OANDA's tick volume.
- heartbeat: GET /v3/accounts, the cheapest authenticated call (no instrument, a few bytes),
  which also proves the token still works.

Errors are ccxt's classes (the classifier's vocabulary): 401 AuthenticationError, 403
PermissionDenied (both a configuration problem: not retried), 400 about the instrument
BadSymbol, other 4xx BadRequest, 429 RateLimitExceeded (+ Retry-After), 504 RequestTimeout,
other 5xx ExchangeNotAvailable, connection failures NetworkError, the whole-request deadline
(`timeout`) RequestTimeout, an unusable 200 BadResponse. Nothing is retried here (the
exchange actor owns retries), except that aiohttp sends a GET again, once, when the
connection it went out on is reset (RFC 9112's retry of an idempotent request: a keep-alive
connection the server closed while idle). At most `connections` connections are kept open
(OANDA asks for persistent connections and at most 2 new ones a second); the deadline
includes waiting for a free one. The token is read from the environment variable the
settings name, sent only in the Authorization header, and never appears in a repr, an error
or a log line (the source logs nothing itself).
"""

from __future__ import annotations

import email.utils
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import ccxt

from ...resilience.retry import parse_retry_after
from ..market.candles import timeframe_ms
from .base import Answer, MarketInfo, Page, Profile, SourceFailure
from .forex_hours import kind_of, reopens_at

HOSTS: dict[str, str] = {
    "practice": "https://api-fxpractice.oanda.com",
    "live": "https://api-fxtrade.oanda.com",
}
#: daemon timeframe -> OANDA granularity: every one of fixed length. 3m and 3d have none; OANDA's
#: M (monthly) is not served: a series steps by one fixed length, and months differ in length.
GRANULARITIES: dict[str, str] = {
    "5s": "S5", "10s": "S10", "15s": "S15", "30s": "S30",
    "1m": "M1", "2m": "M2", "4m": "M4", "5m": "M5", "10m": "M10", "15m": "M15", "30m": "M30",
    "1h": "H1", "2h": "H2", "3h": "H3", "4h": "H4", "6h": "H6", "8h": "H8", "12h": "H12",
    "1d": "D", "1w": "W",
}
_WEEK_MS = 7 * 86_400_000
_WEEK_OFFSET_MS = 4 * 86_400_000  # weeks open on Monday; the epoch was a Thursday
#: price component -> the candle's field holding it
PRICES: dict[str, str] = {"M": "mid", "B": "bid", "A": "ask"}
MAX_COUNT = 5000
_GARBLED = object()

PROFILE = Profile(
    page_limit=MAX_COUNT,
    paging="window",  # [since, until) as from + count of its slots, oldest first (module docstring)
    cut="end",
    omits_empty=True,  # no ticks, no candle: a quiet minute or a closed market has no row
    reach=None,
    rate=100.0,  # OANDA's best practices: at most 100 requests/s on a persistent connection
    costs={"ohlcv": 1.0, "markets": 2.0, "heartbeat": 1.0},
    # OANDA marks a candle complete a little after its close (seconds, at times ~45 s): one
    # that is missing for less than this may still be on its way
    settle_ms=120_000,
)


@dataclass(frozen=True)
class OandaSettings:
    """How to reach OANDA. `token_env` names the environment variable holding the token
    (the token itself is never in the settings); `api_base` overrides the environment's host
    (a simulator, a proxy); `timeout` is the whole-request deadline in seconds; `account_id`
    is optional (default: the first account the token lists); `connections` caps the open
    connections (and so the requests in flight)."""

    token_env: str = "OANDA_TOKEN"
    environment: str = "practice"
    api_base: str | None = None
    price: str = "M"
    timeout: float = 10.0
    account_id: str | None = None
    connections: int = 10

    def __post_init__(self) -> None:
        if self.environment not in HOSTS:
            raise ValueError(f"environment must be one of {', '.join(HOSTS)}, got {self.environment!r}")
        if self.price not in PRICES:
            several = len(self.price) > 1 and set(self.price) <= set(PRICES)
            why = " (a candle row holds one price: one source per component)" if several else ""
            raise ValueError(f"price must be one of {', '.join(PRICES)}, got {self.price!r}{why}")
        if not self.token_env:
            raise ValueError("token_env must name an environment variable")
        if not self.timeout > 0:
            raise ValueError("timeout must be > 0 seconds")
        if self.connections < 1:
            raise ValueError("connections must be >= 1")

    @property
    def base_url(self) -> str:
        return (self.api_base or HOSTS[self.environment]).rstrip("/")


def token_problem(token_env: str, environ: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with the token's environment variable (for start-up checks), or None."""
    value = (os.environ if environ is None else environ).get(token_env)
    if value is None:
        return f"environment variable {token_env} is not set"
    if not value.strip():
        return f"environment variable {token_env} is empty"
    return None


def instrument_of(symbol: str) -> str:
    """OANDA's name of a symbol: "EUR/USD" -> "EUR_USD"."""
    base, sep, rest = symbol.partition("/")
    if not sep or not base or not rest or "/" in rest or ":" in rest:
        raise ValueError(f"{symbol!r} is not an OANDA instrument (BASE/QUOTE)")
    return f"{base}_{rest}"


def symbol_of(name: str) -> str | None:
    """The symbol of an OANDA instrument name: "EUR_USD" -> "EUR/USD" (None if not BASE_QUOTE)."""
    parts = name.split("_")
    if len(parts) != 2 or not all(parts):
        return None
    return f"{parts[0]}/{parts[1]}"


def first_open(since_ms: int, tf_ms: int) -> int:
    """The first candle open at or after `since_ms` (weeks open on Monday 00:00 UTC)."""
    offset = _WEEK_OFFSET_MS if tf_ms == _WEEK_MS else 0
    return -((offset - since_ms) // tf_ms) * tf_ms + offset


def parse_time(raw: object) -> int:
    """A candle's `time` in ms: UNIX seconds ("1700006400.000000000") or RFC3339."""
    if not isinstance(raw, str):
        raise ValueError(f"time is {raw!r}")
    if "T" not in raw:
        whole, _, frac = raw.partition(".")
        if not whole.isdigit() or not (frac.isdigit() or frac == ""):
            raise ValueError(f"time is {raw!r}")
        return int(whole) * 1000 + int((frac + "000")[:3])
    text = raw.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # nanoseconds: datetime takes microseconds
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{(rest[:digits] + '000000')[:6]}{rest[digits:]}"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"time without a zone: {raw!r}")
    return int(dt.timestamp() * 1000)


def _number(v: object, what: str) -> float | None:
    """A price or volume as ccxt would give it: None stays None (the validator rejects it)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError(f"{what} is {v!r}")
    return float(v)


def _date_ms(headers: Mapping[str, str]) -> int | None:
    """The server's clock from its Date header (`headers`: names in lower case)."""
    raw = headers.get("date")
    if not raw:
        return None
    try:
        return int(email.utils.parsedate_to_datetime(raw).timestamp() * 1000)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _retry_after(headers: Mapping[str, str], server_ms: int | None) -> float | None:
    """Retry-After in seconds: delta-seconds, or an HTTP date read against the server's own
    clock (its Date header; without one, an HTTP date says nothing we can trust)."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        float(raw)
    except ValueError:
        if server_ms is None:
            return None
    return parse_retry_after(raw, (server_ms or 0) / 1000)


def _message(body: bytes) -> str:
    """OANDA's errorMessage, or the start of whatever else the body was."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("errorMessage"), str):
        return str(data["errorMessage"])
    text = body[:200].decode("utf-8", "replace")
    return " ".join(text.split()) or "(empty body)"


def _error_class(status: int, message: str) -> type[ccxt.BaseError]:
    if status == 401:
        return ccxt.AuthenticationError
    if status == 403:
        return ccxt.PermissionDenied
    if status == 429:
        return ccxt.RateLimitExceeded
    if status in (400, 404) and "'instrument'" in message:
        return ccxt.BadSymbol
    if 400 <= status < 500:
        return ccxt.BadRequest
    if status == 504:
        return ccxt.RequestTimeout
    if status >= 500:
        return ccxt.ExchangeNotAvailable
    return ccxt.ExchangeError


class OandaSource:
    """OANDA v20 over REST (see the module docstring). Use from one asyncio loop."""

    def __init__(self, settings: OandaSettings | None = None, *,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings or OandaSettings()
        self.profile = PROFILE
        token = (os.environ if environ is None else environ).get(self.settings.token_env, "")
        self._token: str | None = token.strip() or None
        self._session: aiohttp.ClientSession | None = None
        self._account: str | None = self.settings.account_id
        self._types: dict[str, str] = {}  # symbol -> OANDA instrument type (CURRENCY, METAL, CFD)

    def __repr__(self) -> str:
        s = self.settings
        return (f"OandaSource(environment={s.environment!r}, api_base={s.base_url!r}, "
                f"price={s.price!r}, token_env={s.token_env!r})")

    # ------------------------------------------------------------------------ Source
    async def load_markets(self) -> dict[str, MarketInfo]:
        account = await self._account_id()
        data, answer = await self._get(f"/v3/accounts/{quote(account, safe='')}/instruments")
        instruments = data.get("instruments") if isinstance(data, dict) else None
        if not isinstance(instruments, list):
            raise SourceFailure(ccxt.BadResponse("oanda instruments: no 'instruments' list"), answer=answer)
        markets: dict[str, MarketInfo] = {}
        types: dict[str, str] = {}
        for entry in instruments:
            name = entry.get("name") if isinstance(entry, dict) else None
            symbol = symbol_of(name) if isinstance(name, str) else None
            if symbol is None:
                continue
            markets[symbol] = MarketInfo(symbol)
            kind = entry.get("type")
            if isinstance(kind, str):
                types[symbol] = kind
        if not markets:
            raise SourceFailure(ccxt.BadResponse("oanda instruments: the account lists none"), answer=answer)
        self._types = types
        return markets

    async def fetch_ohlcv(self, symbol: str, timeframe: str, since: int, limit: int,
                          until: int | None = None) -> Page:
        granularity = GRANULARITIES.get(timeframe)
        if granularity is None:
            raise SourceFailure(ccxt.NotSupported(
                f"oanda has no {timeframe} candles (supported: {' '.join(GRANULARITIES)})"))
        try:
            instrument = instrument_of(symbol)
        except ValueError as e:
            raise SourceFailure(ccxt.BadSymbol(str(e))) from None
        tf_ms = timeframe_ms(timeframe)
        start = first_open(since, tf_ms)
        count = min(limit, MAX_COUNT)
        if until is not None:
            count = min(count, -(-(until - start) // tf_ms))
        if count <= 0:
            return Page([])
        params = {
            "granularity": granularity, "price": self.settings.price,
            "from": str(start // 1000), "count": str(count), "includeFirst": "true",
            "alignmentTimezone": "UTC", "dailyAlignment": "0", "weeklyAlignment": "Monday",
        }
        path = f"/v3/instruments/{quote(instrument, safe='')}/candles"
        try:
            data, answer = await self._get(path, params)
        except SourceFailure as failure:
            # `from` ahead of OANDA's clock (ours runs a little fast): nothing opened there yet
            if isinstance(failure.error, ccxt.BadRequest) and "'from'" in str(failure.error) \
                    and "in the future" in str(failure.error):
                return Page([], failure.answer)
            raise
        try:
            rows = self._rows(data, start, until)
        except ValueError as e:
            raise SourceFailure(ccxt.BadResponse(f"oanda GET {path}: {e}"), answer=answer) from None
        return Page(rows, answer)

    async def heartbeat(self) -> Answer:
        data, answer = await self._get("/v3/accounts")
        if self._account is None:
            self._account = self._first_account(data, answer)
        return answer

    def pending(self, symbol: str) -> bool:
        """Never: one request lists every instrument, so a load fails whole (and raises)."""
        return False

    def closed_until(self, symbol: str, t_ms: int) -> int | None:
        """Forex hours (`forex_hours`): by the instrument type OANDA listed, else by the name."""
        return reopens_at(t_ms, kind_of(symbol, self._types.get(symbol)))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ------------------------------------------------------------------------ helpers
    def _rows(self, data: Any, since: int, until: int | None) -> list[list[Any]]:
        """Complete candles in [since, until) as [ts, o, h, l, c, volume]; ValueError if the
        answer is not a candle list."""
        if not isinstance(data, dict):
            raise ValueError("the answer is not a JSON object")
        candles = data.get("candles")
        if not isinstance(candles, list):
            message = data.get("errorMessage")
            raise ValueError(f"no 'candles' list ({message})" if message else "no 'candles' list")
        field = PRICES[self.settings.price]
        rows: list[list[Any]] = []
        for c in candles:
            if not isinstance(c, dict) or not isinstance(c.get("complete"), bool):
                raise ValueError(f"malformed candle {str(c)[:80]}")
            if not c["complete"]:
                continue  # the candle in progress: never stored
            ts = parse_time(c.get("time"))
            if ts < since or (until is not None and ts >= until):
                continue
            ohlc = c.get(field)
            if not isinstance(ohlc, dict):
                raise ValueError(f"candle at {ts} has no {field} prices")
            rows.append([ts, *(_number(ohlc.get(k), f"{field}.{k}") for k in "ohlc"),
                         _number(c.get("volume"), "volume")])
        return rows

    async def _account_id(self) -> str:
        if self._account is None:
            data, answer = await self._get("/v3/accounts")
            self._account = self._first_account(data, answer)
        return self._account

    @staticmethod
    def _first_account(data: Any, answer: Answer) -> str:
        accounts = data.get("accounts") if isinstance(data, dict) else None
        if not isinstance(accounts, list):
            raise SourceFailure(ccxt.BadResponse("oanda accounts: no 'accounts' list"), answer=answer)
        for a in accounts:
            if isinstance(a, dict) and isinstance(a.get("id"), str) and a["id"]:
                return str(a["id"])
        raise SourceFailure(ccxt.PermissionDenied("OANDA: the token gives access to no account"),
                            answer=answer)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.connections),
                headers={"Accept-Datetime-Format": "UNIX", "User-Agent": "candlekeeper"},
                raise_for_status=False)
        return self._session

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> tuple[Any, Answer]:
        """GET `path` under the whole-request deadline: (JSON body, what the answer said), or
        SourceFailure with a ccxt error. Errors are raised outside `except` blocks so no
        client exception (whose request info holds the Authorization header) is chained."""
        what = f"oanda GET {path}"
        if self._token is None:
            raise SourceFailure(ccxt.AuthenticationError(
                f"OANDA has no token: environment variable {self.settings.token_env} is not set ({what})"))
        timeout = self.settings.timeout
        failure: ccxt.BaseError | None = None
        status, body, headers = 0, b"", {}  # headers: names in lower case
        try:
            async with self._session_now().get(
                    self.settings.base_url + path, params=params, allow_redirects=False,
                    headers={"Authorization": f"Bearer {self._token}"},
                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.read()
                status = resp.status
                headers = {k.lower(): v for k, v in resp.headers.items()}
        except TimeoutError:
            failure = ccxt.RequestTimeout(f"{what}: no whole answer within {timeout:g} s")
        except aiohttp.ClientPayloadError as e:
            failure = ccxt.NetworkError(f"{what}: answer cut short ({type(e).__name__})")
        except (aiohttp.ClientError, OSError) as e:
            failure = ccxt.NetworkError(self._scrub(f"{what}: {type(e).__name__}: {e}"))
        if failure is not None:
            raise SourceFailure(failure)
        server_ms = _date_ms(headers)
        answer = Answer(server_ms=server_ms, cost=1.0)
        request_id = headers.get("requestid")
        if status != 200:
            message = self._scrub(_message(body))
            text = f"{what}: HTTP {status} {message}" + (f" (RequestID {request_id})" if request_id else "")
            if status in (401, 403):  # what the operator must fix, and where: the token's variable
                text = f"OANDA rejected the token in ${self.settings.token_env}: {text}"
            retry = _retry_after(headers, server_ms) if status in (429, 503) else None
            raise SourceFailure(_error_class(status, message)(text), answer=answer, retry_after=retry)
        try:
            data = json.loads(body)
        except ValueError:
            data = _GARBLED
        if data is _GARBLED:
            raise SourceFailure(ccxt.BadResponse(
                f"{what}: HTTP 200 with a body that is not JSON ({len(body)} bytes)"), answer=answer)
        if isinstance(data, dict) and isinstance(data.get("errorMessage"), str):
            message = self._scrub(data["errorMessage"])  # an error told with HTTP 200
            cls = ccxt.BadSymbol if "'instrument'" in message else ccxt.BadResponse
            raise SourceFailure(cls(f"{what}: HTTP 200 {message}"), answer=answer)
        return data, answer
