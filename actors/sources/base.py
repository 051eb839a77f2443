"""What the exchange actor needs of a source of candles, whatever speaks to the exchange.

A source is one exchange's client: ccxt for crypto exchanges (`ccxt_source.CcxtSource`), or a
source of another kind (OANDA's v20 REST API). The exchange actor runs a source's coroutines on its
own asyncio loop thread, one request at a time per coroutine, and owns everything around them:
admission (breaker, rate budget), retries, the series. A source only asks and answers, and says
what it knows of its exchange (`Profile`): page sizes, how windows are served, history reach, the
rate budget, market hours.

Errors are ccxt's exception classes whatever the source (the vocabulary of
`candlekeeper.actors.market.errors.classify`), raised wrapped in `SourceFailure` with what the
answer said about time and budget (Retry-After, the server's clock, rate headers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Paging = Literal["cursor", "window", "recent"]


@dataclass(frozen=True)
class Profile:
    """How an exchange serves candles, so a series knows what an answer proves.

    paging:
        "cursor": `since` and `limit` give the first `limit` candles at or after `since`, oldest
        first (Binance): a stretch before the first row returned does not exist.
        "window": the source asks for the window [since, until) and gets every candle in it
        (OKX, Bybit, Coinbase, KuCoin, OANDA), unless the answer was cut at a page cap.
        "recent": only the newest `reach` candles are served, `since` only filters (Kraken).
    page_limit: the largest page the exchange serves (ccxt's `features[...]['fetchOHLCV']['limit']`).
    caps: page sizes at which an answer may have been cut short (an endpoint's own cap, as OKX's
        history-candles once served 100): an answer of exactly that many rows is not trusted to
        be complete at its `cut` end.
    cut: which end of an over-full window an answer loses: "end" for oldest-first exchanges,
        "start" for newest-first ones.
    omits_empty: the exchange leaves candles without trades out (Coinbase, KuCoin, Kraken):
        a missing candle inside a served window is `no_trades`; else it is an `exchange_hole`.
    reach: how many candles back the exchange serves at most (None: all of its history).
    rate: budget units per second the exchange allows (from ccxt's `rateLimit`, or the source's
        own documentation); `costs` maps a request kind ("ohlcv", "markets", "heartbeat") to the
        units it costs (a first guess: answers say what each request cost, `Answer.cost`);
        `window_s`: the window the exchange counts its budget in (Binance: a minute).
    per_endpoint: the exchange limits each endpoint on its own (OKX), each with a budget as large,
        rather than all together (the others).
    recent_bars: candles of the last `recent_bars` bars come from another endpoint than older ones
        (OKX's candles endpoint, beside history-candles).
    settle_ms: how long after a candle closes the exchange may still be publishing it: a missing
        candle younger than this is "not fetched yet", never a gap.
    """

    page_limit: int = 1000
    caps: tuple[int, ...] = ()
    paging: Paging = "cursor"
    cut: Literal["end", "start"] = "end"
    omits_empty: bool = False
    reach: int | None = None
    rate: float = 10.0
    costs: dict[str, float] = field(default_factory=lambda: {"ohlcv": 1.0, "markets": 1.0, "heartbeat": 1.0})
    settle_ms: int = 60_000
    window_s: float = 1.0
    per_endpoint: bool = False
    recent_bars: int | None = None

    def cost(self, kind: str) -> float:
        return self.costs.get(kind, 1.0)


@dataclass(frozen=True)
class MarketInfo:
    """One market the exchange lists; `listed_ms` when the exchange says when it was listed."""

    symbol: str
    listed_ms: int | None = None


@dataclass(frozen=True)
class RateReport:
    """What an exchange said about its rate budget in an answer's headers (any may be unknown).

    used/limit count the exchange's own units in its current window (Binance:
    X-MBX-USED-WEIGHT-1M of 6000); remaining and reset_ms are the same, told the other way
    (Bybit: X-Bapi-Limit-Status, X-Bapi-Limit-Reset-Timestamp)."""

    used: float | None = None
    limit: float | None = None
    remaining: float | None = None
    reset_ms: int | None = None
    window_s: float | None = None


@dataclass(frozen=True)
class Answer:
    """What one request told besides its payload: the server's clock and its rate budget."""

    server_ms: int | None = None  # the exchange's clock (a Date header, or its own field), if it said
    rate: RateReport | None = None
    cost: float | None = None  # units of the profile's budget this request cost, when the source knows


@dataclass(frozen=True)
class Page:
    """An answer to `fetch_ohlcv`: the rows as ccxt shapes them ([ts, o, h, l, c, v], oldest
    first, not yet validated), and what the answer said (`answer`)."""

    rows: list[list[Any]]
    answer: Answer = Answer()


class SourceFailure(Exception):
    """A request failed: `error` is a ccxt exception (the classifier's vocabulary), `answer` what
    the failed answer still said, `retry_after` the server's Retry-After in seconds, if any."""

    def __init__(self, error: BaseException, *, answer: Answer | None = None, retry_after: float | None = None):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.answer = answer or Answer()
        self.retry_after = retry_after


class Source(Protocol):
    """One exchange's client, used from one asyncio loop (see the module docstring)."""

    profile: Profile

    async def load_markets(self) -> dict[str, MarketInfo]:
        """Every market the configured series could need, by unified symbol."""

    async def fetch_ohlcv(self, symbol: str, timeframe: str, since: int, limit: int, until: int | None) -> Page:
        """Candles of `symbol` from `since` (ms), at most `limit`; with `until`, only those that
        open before it (the window [since, until), for "window" paging)."""

    async def heartbeat(self) -> Answer:
        """The exchange's cheapest public request (server time, status): is it up, what time is it."""

    def pending(self, symbol: str) -> bool:
        """Whether `symbol`'s market list failed to load this time (its series wait for the next
        load), as opposed to the exchange not listing it."""

    def closed_until(self, symbol: str, t_ms: int) -> int | None:
        """When the market of `symbol` reopens if it is closed at `t_ms` (forex weekends), else None."""

    async def close(self) -> None:
        """Release connections; the source is not used again."""
