"""A `Source` over ccxt's asyncio client: one per exchange actor incarnation, on its loop thread.

What it adds to ccxt, each because a real exchange made it necessary:

- A whole-request deadline (`timeout`): ccxt's aiohttp client already bounds the request, and a
  `wait_for` one second later bounds anything else (a trickling body cannot hold a request).
- Every answer's own metadata, per request (ccxt keeps only the last response's headers, shared
  by concurrent requests): the server's clock from its `Date` header, its rate headers, the
  Retry-After of a failure (or a ban's documented length where the exchange sends none), and
  the units ccxt charged the request (its throttle is asked, never waited on: the exchange actor
  paces requests itself), in the exchange's budget unit (`profiles.Budget`).
- A market list is admitted once by the exchange actor and charged what all its requests cost
  together (they go back to back); ccxt is kept off the requests the daemon does not need
  (`profiles.QUIET_OPTIONS`, `QUIET_HAS`: Kraken's, allowing about one request a second, is one).
- A 2xx body that is not JSON (a truncated body, an HTML page) is `ccxt.BadResponse`: ccxt would
  hand it to the parser, which turns it into `[]` or `{}` without a word.
- A 5xx answer is transient whatever class ccxt maps it to (Bybit's and Coinbase's 500 become a
  plain `ExchangeError`, which would read as "asking again gets the same answer").
- Market lists are loaded one market type at a time (only the types the configured symbols need),
  so a failing derivatives listing never blocks the spot series.
- ccxt's own clock (it chooses OKX's history endpoint and some windows by it) is the runtime's.
- The markets it loads are shared (`MarketList`) with the exchange's stream, whose ccxt.pro
  clients would otherwise load them again on every reconnect: past the breaker and the budget
  (Binance's exchangeInfo weighs 20), while the exchange is failing.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import ccxt
import ccxt.async_support as ccxt_async

from ...resilience.retry import parse_retry_after
from ...supervisors.clock import WallClock
from .base import Answer, MarketInfo, Page, RateReport, SourceFailure
from .profiles import QUIET_HAS, budget, client_options, market_kind, market_types, profile
from .tls import share_tls_context
from .urls import rebase_urls

T = TypeVar("T")


class MarketList:
    """The market list (ccxt's market structures) the exchange actor last loaded, for the
    exchange's stream clients: one load, under the exchange actor's breaker and rate budget.
    Set on the exchange's loop thread, read on the stream's: one reference, swapped whole."""

    def __init__(self) -> None:
        self._listed: list[dict[str, Any]] | None = None

    def publish(self, listed: list[dict[str, Any]]) -> None:
        self._listed = list(listed)

    def get(self) -> list[dict[str, Any]] | None:
        return self._listed


@dataclass
class _Seen:
    """What the request running in this task saw of its HTTP answers (the last one counts)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    cost: float = 0.0


_SEEN: ContextVar[_Seen | None] = ContextVar("candlekeeper_seen", default=None)
_HOOKED: dict[type, type] = {}


def _hooked(cls: type) -> type:
    """`cls` with the hooks above; one subclass per ccxt class."""
    if cls in _HOOKED:
        return _HOOKED[cls]

    class Hooked(cls):
        def on_rest_response(self, code: Any, reason: Any, url: Any, method: Any, response_headers: Any,
                             response_body: Any, request_headers: Any, request_body: Any) -> Any:
            seen = _SEEN.get()
            if seen is not None:
                seen.status = int(code) if code is not None else None
                seen.headers = dict(response_headers or {})
            return super().on_rest_response(code, reason, url, method, response_headers, response_body,
                                             request_headers, request_body)

        def parse_json(self, http_response: Any) -> Any:
            parsed = super().parse_json(http_response)
            seen = _SEEN.get()
            if parsed is None and seen is not None and seen.status is not None and 200 <= seen.status < 300:
                raise ccxt.BadResponse(f"{self.id}: {_garbled(http_response)}")
            return parsed

        async def throttle(self, cost: Any = None) -> None:
            seen = _SEEN.get()
            if seen is not None:
                seen.cost += float(cost) if cost is not None else 1.0

    Hooked.__name__ = cls.__name__
    _HOOKED[cls] = Hooked
    return Hooked


def _garbled(body: Any) -> str:
    text = body if isinstance(body, str) else ""
    head = text.lstrip()[:1]
    if not text.strip():
        return "an empty body where JSON was expected"
    if head == "<":
        return "an HTML page where JSON was expected"
    return "truncated or garbled JSON"


def _header(headers: dict[str, str], name: str) -> str | None:
    lower = name.lower()
    for key, value in headers.items():
        if key.lower() == lower:
            return value
    return None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class CcxtSource:
    """One ccxt exchange (see the module docstring)."""

    def __init__(self, exchange_id: str, *, symbols: list[str], timeout: float, wall: WallClock,
                 api_base: str | None = None, shared: MarketList | None = None) -> None:
        self.exchange_id = exchange_id
        self.shared = shared
        self.timeout = timeout
        self._wall = wall
        self._types = market_types(exchange_id, symbols)
        cls = _hooked(getattr(ccxt_async, exchange_id))
        self.client = cls({
            "enableRateLimit": True,  # its throttle only counts: see `_hooked`
            "timeout": int(timeout * 1000),
            "options": client_options(exchange_id, self._types),
        })
        share_tls_context(self.client)
        if api_base:
            self.client.urls["api"] = rebase_urls(self.client.urls["api"], api_base)
        for capability in QUIET_HAS.get(exchange_id, ()):
            self.client.has[capability] = False
        self.client.milliseconds = lambda: int(wall() * 1000)
        self.client.seconds = lambda: int(wall())
        self.profile = profile(exchange_id, self.client)
        self.budget = budget(exchange_id, self.client)
        self.failed_types: dict[str, BaseException] = {}
        #: what the last market load's answers said, together (its cost: every listing's)
        self.markets_answer = Answer()

    # -- requests ----------------------------------------------------------------------------

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> tuple[T, Answer]:
        """Run one ccxt call under the deadline; its answer's metadata, or a `SourceFailure`."""
        seen = _Seen()
        _SEEN.set(seen)
        try:
            result = await asyncio.wait_for(fn(), self.timeout + 1.0)
        except TimeoutError:
            raise SourceFailure(ccxt.RequestTimeout(f"{self.exchange_id}: no whole answer within {self.timeout:g} s"),
                                answer=self._answer(seen)) from None
        except ccxt.BaseError as exc:
            raise SourceFailure(self._normalised(exc, seen), answer=self._answer(seen),
                                retry_after=self._retry_after(seen)) from exc
        return result, self._answer(seen)

    def _normalised(self, exc: ccxt.BaseError, seen: _Seen) -> BaseException:
        if isinstance(exc.__cause__, aiohttp.ClientError) and not isinstance(exc, ccxt.OperationFailed):
            # a broken transfer (a body cut short, a bad chunk): ccxt calls it an ExchangeError
            return ccxt.NetworkError(f"{exc}: {type(exc.__cause__).__name__}: {exc.__cause__}")
        status = seen.status
        if status is None or isinstance(exc, ccxt.OperationFailed):
            return exc
        if status == 429:
            return ccxt.RateLimitExceeded(str(exc))
        if status == 418:
            return ccxt.DDoSProtection(str(exc))
        if status >= 500:  # an exchange error code on a 5xx page is still the exchange failing
            return ccxt.ExchangeNotAvailable(f"HTTP {status}: {exc}")
        return exc

    def _retry_after(self, seen: _Seen) -> float | None:
        after = parse_retry_after(_header(seen.headers, "Retry-After"), self._wall())
        ban = self.budget.ban
        if after is None and ban is not None and seen.status == ban[0]:
            return ban[1]  # a ban that does not say how long (Bybit's 403): as long as documented
        return after

    def _answer(self, seen: _Seen) -> Answer:
        h = seen.headers
        server_ms: int | None = None
        date = _header(h, "Date")
        if date:
            try:
                server_ms = int(email.utils.parsedate_to_datetime(date).timestamp() * 1000)
            except (TypeError, ValueError):
                server_ms = None
        cost = seen.cost * self.budget.per_ccxt_unit if seen.cost else None
        return Answer(server_ms=server_ms, rate=self._rate(h, server_ms), cost=cost)

    def _rate(self, h: dict[str, str], server_ms: int | None) -> RateReport | None:
        """The exchange's own count, in its budget's unit. `reset_ms` is on our wall clock (when
        the window ends, measured from the answer's own times, so no clock offset enters it),
        rounded up where the exchange's time is known only to the second."""
        local_ms = int(self._wall() * 1000)
        used = _number(_header(h, "X-MBX-USED-WEIGHT-1M"))
        if used is not None:  # Binance: weight used in the current minute of its clock
            limit = self.budget.rate * 60
            at = server_ms if server_ms is not None else local_ms  # Date: the second, truncated
            return RateReport(used=used, limit=limit, remaining=max(0.0, limit - used),
                              reset_ms=local_ms + 60_000 - at % 60_000, window_s=60)
        remaining = _number(_header(h, "X-Bapi-Limit-Status"))
        if remaining is not None:  # Bybit: the reset on its clock, which Timenow tells to the ms
            reset_at = _number(_header(h, "X-Bapi-Limit-Reset-Timestamp"))
            now = _number(_header(h, "Timenow"))
            now = now if now is not None else server_ms
            left = reset_at - now if reset_at is not None and now is not None else None
            # Bybit's reset is "now" until the limit is exceeded: then nothing is known of it
            return RateReport(limit=_number(_header(h, "X-Bapi-Limit")), remaining=remaining,
                              reset_ms=local_ms + int(left) if left is not None and left > 0 else None,
                              window_s=self.budget.window_s)
        remaining = _number(_header(h, "gw-ratelimit-remaining"))
        if remaining is not None:  # KuCoin: the reset in ms from now
            reset_in = _number(_header(h, "gw-ratelimit-reset"))
            return RateReport(limit=_number(_header(h, "gw-ratelimit-limit")), remaining=remaining,
                              reset_ms=local_ms + int(reset_in) if reset_in is not None else None,
                              window_s=self.budget.window_s)
        return None

    # -- Source ------------------------------------------------------------------------------

    async def load_markets(self) -> dict[str, MarketInfo]:
        """The markets of the types the configured symbols need, one type at a time: a type whose
        listing fails is left out (`failed_types`) and the others are served."""
        client = self.client
        answers: list[Answer] = []
        if self._types is None:
            markets, answer = await self._call(lambda: client.load_markets(reload=True))
            answers.append(answer)
            listed = list(markets.values())
        else:
            listed = []
            self.failed_types = {}
            for kind in self._types:
                client.options["fetchMarkets"] = {"types": [kind]}
                try:
                    got, answer = await self._call(client.fetch_markets)
                except SourceFailure as failure:
                    answers.append(failure.answer)
                    self.failed_types[kind] = failure.error
                    continue
                answers.append(answer)
                listed.extend(got)
            self.markets_answer = _together(answers)
            if not listed and self.failed_types:
                raise SourceFailure(next(iter(self.failed_types.values())), answer=self.markets_answer)
            client.set_markets(listed)
        self.markets_answer = _together(answers)
        if not listed:
            raise SourceFailure(ccxt.BadResponse(f"{self.exchange_id} listed no markets"))
        if self.shared is not None:
            self.shared.publish(listed)
        return {m["symbol"]: MarketInfo(m["symbol"], _listed_ms(m)) for m in listed if m.get("symbol")}

    def pending(self, symbol: str) -> bool:
        """Whether `symbol`'s market type failed to load (its series wait; the rest go on)."""
        return bool(self.failed_types) and market_kind(symbol) in {_kind_of(t) for t in self.failed_types}

    async def fetch_ohlcv(self, symbol: str, timeframe: str, since: int, limit: int, until: int | None) -> Page:
        params: dict[str, Any] = {}
        if until is not None and self.exchange_id == "bybit":
            params["until"] = until - 1  # bybit's `end` is inclusive
        rows, answer = await self._call(
            lambda: self.client.fetch_ohlcv(symbol, timeframe, since=since, limit=limit, params=params)
        )
        if not isinstance(rows, list):
            raise SourceFailure(ccxt.BadResponse(f"{self.exchange_id}: candles are not a list"), answer=answer)
        return Page(rows, answer)

    async def heartbeat(self) -> Answer:
        """The server's time (`fetch_time`) where the exchange has it, else its status."""
        client = self.client
        if client.has.get("fetchTime"):
            server_ms, answer = await self._call(client.fetch_time)
            if isinstance(server_ms, int | float):
                return Answer(server_ms=int(server_ms), rate=answer.rate, cost=answer.cost)
            return answer
        _, answer = await self._call(client.fetch_status)
        return answer

    def closed_until(self, symbol: str, t_ms: int) -> int | None:
        return None  # crypto markets trade around the clock

    async def close(self) -> None:
        await self.client.close()


def _together(answers: list[Answer]) -> Answer:
    """Several requests' answers as one: their costs summed, the last clock and count."""
    cost = sum(a.cost or 0.0 for a in answers)
    last = next((a for a in reversed(answers) if a.rate is not None or a.server_ms is not None), Answer())
    return Answer(server_ms=last.server_ms, rate=last.rate, cost=cost or None)


def _listed_ms(market: dict[str, Any]) -> int | None:
    created = market.get("created")
    return int(created) if isinstance(created, int | float) and created > 0 else None


def _kind_of(type_name: str) -> str:
    return {"swap": "linear"}.get(type_name, type_name)


def parse_body(body: str) -> Any:
    """JSON or None (a helper for tests of the hooks)."""
    try:
        return json.loads(body)
    except ValueError:
        return None
