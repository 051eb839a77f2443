"""What every exchange dialect provides, and the helpers they share.

A dialect turns (path, params, context) into a `Reply`: routes, JSON shapes, error bodies,
rate-limit answers and the headers the exchange sends. It owns no sockets and no faults; the
server decides *whether* a request fails, the dialect decides what that failure looks like.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..faults import PoisonKind
from ..history import INTERVALS, Candle, Market, align_down
from ..limits import Charge, Meters
from ..reply import Reply, gateway_page
from ..venue import Venue


@dataclass(frozen=True)
class Ctx:
    """Everything a route may look at for one request."""

    venue: Venue
    now_ms: int  # the exchange's clock (skew included)
    poison: Callable[[Market], PoisonKind | None]
    caps: Mapping[str, int]  # page caps by endpoint name (dialect defaults + overrides)
    omit_empty: bool  # leave candles without trades out (else serve them flat)
    #: request headers, names in lower case (authenticating dialects read Authorization)
    headers: Mapping[str, str] = field(default_factory=dict)


class Dialect:
    """Base class: subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    #: ccxt exchange id
    ccxt_id: ClassVar[str]
    #: True if the exchange leaves candles without trades out of its pages
    omit_empty: ClassVar[bool]
    #: endpoint name -> max rows per page
    page_caps: ClassVar[dict[str, int]]
    #: market-type listings ccxt's load_markets may request (keys of `Faults.fail_listing`)
    listing_kinds: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        #: usage of the exchange's documented limits, by every client of this server
        self.meters = Meters()

    # ---------------------------------------------------------------- identity
    def market_id(self, m: Market) -> str:
        raise NotImplementedError

    def aliases(self, m: Market) -> tuple[str, ...]:
        """Other ids the exchange accepts for `m`."""
        return ()

    # ---------------------------------------------------------------- serving
    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        raise NotImplementedError

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        """The market-type listing this request is, if it is one."""
        return None

    def headers(self, path: str, ctx: Ctx) -> dict[str, str]:
        """Headers sent with every response (rate-limit accounting and the like)."""
        return {}

    def limits(self, path: str) -> tuple[Charge, ...]:
        """The documented rate limits a request to `path` counts against, with its cost there
        (see `simulator.limits`); the server counts them for every request and enforces them
        with `Faults(documented_limits=True)`."""
        return ()

    # ---------------------------------------------------------------- failures
    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        raise NotImplementedError

    def banned(self, retry_after_s: int, until_ms: int, ctx: Ctx) -> Reply:
        """The answer to a client that kept going after being rate limited."""
        return self.rate_limited(retry_after_s, ctx)

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        """5xx (or any other failing status) as this exchange's API or edge sends it."""
        return gateway_page(status)

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        """The error for a market id the exchange does not list (`status` overrides the HTTP
        status, for the 200-with-error-body poison)."""
        raise NotImplementedError

    def failing_listing(self, status: int, ctx: Ctx) -> Reply:
        """A market-type listing that fails with `status` (see `Faults.fail_listing`)."""
        if status == 429:
            return self.rate_limited(1, ctx)
        return self.server_error(status, ctx)

    # ---------------------------------------------------------------- history
    def reachable_from(self, venue: Venue, symbol: str, interval: str, at_ms: int) -> int:
        """Open time of the oldest candle a client can still fetch at `at_ms`."""
        return venue.history.first_open(interval, symbol)

    def market_hours(self, m: Market) -> Callable[[int], bool] | None:
        """When `m` is closed (a predicate on minute open times), or None: crypto never closes."""
        return None

    def ohlcv(self, m: Market, c: Candle, price: str | None = None,
              ) -> tuple[int, float, float, float, float, float]:
        """`c` as this exchange's client returns it (what `expected_candles` lists). `price`
        picks a price component where the exchange has several (OANDA: M, B, A)."""
        if price is not None:
            raise ValueError(f"the {self.name} dialect has no price components")
        return c.ohlcv()


def num(s: str | None) -> str | None:
    """A decimal string without trailing zeros ("90123.40000000" -> "90123.4"), as most
    exchanges print prices; None (poisoned rows) passes through."""
    if s is None:
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


def poison_rows(kind: PoisonKind | None, candles: list[Candle]) -> list[Candle]:
    """Break candles the way `kind` says (INVERTED: high < low; NULLS: null prices/volume).
    EMPTY and the BAD_SYMBOL kinds are answered by the route before any candle is made."""
    if kind is PoisonKind.INVERTED:
        out = []
        for c in candles:
            hi, lo = c.low, c.high
            if hi == lo:  # flat candle: force high < low anyway
                lo = f"{float(lo) * 1.01 + 1e-6:.8f}"
            out.append(c._replace(high=hi, low=lo))
        return out
    if kind is PoisonKind.NULLS:
        nulls: Any = None  # the wire form of a broken row: JSON nulls where numbers belong
        return [c._replace(open=nulls, high=nulls, low=nulls, close=nulls, volume=nulls,
                           quote_volume=nulls) for c in candles]
    return candles


def interval_ms(interval: str) -> int:
    return INTERVALS[interval][0]


def current_open(now_ms: int, interval: str) -> int:
    """Open time of the candle in progress at `now_ms`."""
    return align_down(now_ms, interval)


def int_param(params: Mapping[str, str], name: str) -> int | None:
    """An integer query parameter; None if absent or empty; raises ValueError if malformed."""
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    return int(raw)
