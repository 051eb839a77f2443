"""What ccxt does not know about how each exchange serves candles, and what it knows (`profile`).

ccxt's metadata is the first source of truth: the page size (`features[...]['fetchOHLCV']['limit']`)
and the rate budget (`rateLimit`, and each endpoint's cost, which ccxt computes per request and the
source reports with each answer). The exchange's own documentation is the second: how a window is
served and which end an over-full answer loses, whether minutes without trades are left out, how
far back history reaches, and the budget itself where ccxt's differs from the exchange's own
statement (`BUDGETS`). An exchange not listed here is served like Binance (oldest first from
`since`), with ccxt's page size and budget.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Profile

#: Facts per ccxt id beyond ccxt's metadata (see the README's exchanges table).
KNOWN: dict[str, dict[str, Any]] = {
    "binance": {"paging": "cursor", "cut": "end"},
    # OKX serves the newest rows of the window it is asked for; history-candles was capped at 100
    "okx": {"paging": "window", "cut": "start", "caps": (300, 100),
            # limits per endpoint; the last 1439 bars (ccxt's border) come from /market/candles
            "per_endpoint": True, "recent_bars": 1439},
    "bybit": {"paging": "window", "cut": "start"},
    "kraken": {"paging": "recent", "cut": "start", "omits_empty": True, "reach": 720},
    "coinbase": {"paging": "window", "cut": "start", "omits_empty": True, "caps": (300, 350)},
    "kucoin": {"paging": "window", "cut": "start", "omits_empty": True},
}


@dataclass(frozen=True)
class Budget:
    """An exchange's rate budget, in a unit of its own: what it counts (Binance: request weight;
    KuCoin: weight of its public pool; Bybit, Coinbase: requests), or ccxt's unit (`rateLimit` ms of
    waiting) where the exchange states limits per endpoint.

    rate: units a second the exchange allows. window_s: the window it counts them in (it bounds the
        burst the daemon allows itself, and is how long to wait after a rate-limit answer that says
        nothing). per_ccxt_unit: units of this budget per unit of ccxt's endpoint cost (ccxt's
        costs are right relative to each other where the exchange's docs agree; only its scale
        differs). costs: each request kind's cost until ccxt's charge for it was seen. ban: the
        HTTP status of a ban answer that carries no Retry-After, and the ban's documented
        length in seconds. source: where the figures come from (the README's exchanges table).
    """

    rate: float
    window_s: float = 1.0
    per_ccxt_unit: float = 1.0
    costs: Mapping[str, float] = field(default_factory=lambda: {"ohlcv": 1.0, "markets": 1.0, "heartbeat": 1.0})
    ban: tuple[int, float] | None = None
    source: str = "ccxt"


#: Budgets the exchanges document, where they differ from ccxt's `rateLimit` or are counted in the
#: exchange's own unit (to read its rate headers). ccxt's per-endpoint costs are still charged,
#: times `per_ccxt_unit`.
BUDGETS: dict[str, Budget] = {
    # 6000 request weight a minute per IP; klines 2, exchangeInfo 20, time 1. ccxt agrees (50 ms a
    # unit, klines 0.4 = weight 2): counted in weight here to read X-MBX-USED-WEIGHT-1M.
    "binance": Budget(rate=6000 / 60, window_s=60.0, per_ccxt_unit=5.0,
                      costs={"ohlcv": 2.0, "markets": 20.0, "heartbeat": 1.0},
                      source="Binance docs (6000 weight/min), = ccxt"),
    # Per endpoint and IP: candles 40 and history-candles 20 requests per 2 s. ccxt's relative costs
    # agree (0.5, 1) but its rateLimit is 110 ms: 10 % below the documented 100 ms on purpose.
    "okx": Budget(rate=10.0, window_s=2.0, costs={"ohlcv": 1.0, "markets": 1.0, "heartbeat": 2.0},
                  source="OKX docs (history-candles 20/2 s, candles 40/2 s); ccxt: 10 % less"),
    # 600 requests per 5 s per IP, any endpoint. ccxt charges public endpoints 5 of its 20 ms
    # units: 10 requests a second, a twelfth of the documented limit.
    "bybit": Budget(rate=600 / 5, window_s=5.0, per_ccxt_unit=1 / 5,
                    costs={"ohlcv": 1.0, "markets": 1.0, "heartbeat": 1.0}, ban=(403, 600.0),
                    source="Bybit docs (600 per 5 s per IP); ccxt: 10/s"),
    # No hard figure published for public endpoints ("about one a second"): ccxt's 1 s a unit,
    # OHLC 1.2 (its note: 1 "triggers too many requests immediately").
    "kraken": Budget(rate=1.0, window_s=1.0, costs={"ohlcv": 1.2, "markets": 1.0, "heartbeat": 1.0},
                     source="ccxt (Kraken: about 1 a second)"),
    # Advanced Trade public endpoints: 10 requests a second per IP (ccxt: 3 units of 34 ms, 9.8/s;
    # its v2 calls, 10,000 an hour, 10.6 units: not made, see QUIET_OPTIONS and QUIET_HAS).
    "coinbase": Budget(rate=10.0, window_s=1.0, per_ccxt_unit=1 / 3,
                       costs={"ohlcv": 1.0, "markets": 2.0, "heartbeat": 1.0},
                       source="Coinbase docs (10/s public), ~ ccxt"),
    # The public resource pool: 2000 weight per 30 s (VIP0); candles 3, symbols 4. ccxt counts
    # public endpoints against the spot pool (4000 per 30 s), twice the public pool's budget.
    "kucoin": Budget(rate=2000 / 30, window_s=30.0, costs={"ohlcv": 3.0, "markets": 4.0, "heartbeat": 3.0},
                     source="KuCoin docs (public pool 2000/30 s); ccxt: 4000/30 s"),
}

#: ccxt option that restricts `fetch_markets` to some market types, and each type's name there.
MARKET_TYPES: dict[str, dict[str, str]] = {
    "binance": {"spot": "spot", "linear": "linear", "inverse": "inverse", "option": "option"},
    "okx": {"spot": "spot", "linear": "swap", "inverse": "swap", "future": "future", "option": "option"},
    "bybit": {"spot": "spot", "linear": "linear", "inverse": "inverse", "option": "option"},
    "kucoin": {"spot": "spot", "linear": "swap", "inverse": "swap", "future": "future"},
}

#: Options that keep ccxt off endpoints the daemon does not need (private, currencies, time).
QUIET_OPTIONS: dict[str, dict[str, Any]] = {
    "binance": {"fetchCurrencies": False, "fetchMargins": False, "adjustForTimeDifference": False},
    "kucoin": {"fetchTickersFees": False},
    # the server time from Advanced Trade (ms, in the public 10/s budget) rather than v2 (s, 3.5x dearer)
    "coinbase": {"fetchTime": "v3PublicGetBrokerageTime"},
}
#: Capabilities turned off so that a market load makes only the requests it needs: Kraken's and
#: Coinbase's currency lists (one and three requests; Kraken allows about one request a second).
QUIET_HAS: dict[str, tuple[str, ...]] = {
    "kraken": ("fetchCurrencies",),
    "coinbase": ("fetchCurrencies",),
}


def budget(exchange_id: str, client: Any) -> Budget:
    """The rate budget of `exchange_id`: `BUDGETS`, else ccxt's (`rateLimit` ms a unit)."""
    known = BUDGETS.get(exchange_id)
    if known is not None:
        return known
    rate_limit_ms = float(getattr(client, "rateLimit", 100) or 100)
    return Budget(rate=1000.0 / rate_limit_ms)


def profile(exchange_id: str, client: Any) -> Profile:
    """The profile of `exchange_id`, from its ccxt client's metadata, `KNOWN` and `BUDGETS`."""
    features = ((getattr(client, "features", None) or {}).get("spot") or {}).get("fetchOHLCV") or {}
    page_limit = int(features.get("limit") or 500)
    rates = budget(exchange_id, client)
    base = Profile(page_limit=page_limit, caps=(page_limit,), rate=rates.rate, costs=dict(rates.costs),
                   window_s=rates.window_s)
    known = dict(KNOWN.get(exchange_id, {}))
    if "caps" in known:
        known["caps"] = tuple(sorted({page_limit, *known["caps"]}, reverse=True))
    return dataclasses.replace(base, **known)


def market_kind(symbol: str) -> str:
    """spot, linear, inverse, future or option, from a unified symbol's settle part."""
    base_quote, _, settle = symbol.partition(":")
    if not settle:
        return "spot"
    base, _, quote = base_quote.partition("/")
    coin, _, expiry = settle.partition("-")
    if expiry.count("-") >= 2:  # BTC/USD:BTC-250328-50000-C
        return "option"
    if expiry:
        return "future"
    return "linear" if coin == quote else "inverse" if coin == base else "linear"


def market_types(exchange_id: str, symbols: list[str]) -> list[str] | None:
    """The exchange's own names of the market types `symbols` need (spot first), or None when
    its ccxt class loads every type in one go (there is no option to choose)."""
    names = MARKET_TYPES.get(exchange_id)
    if names is None:
        return None
    out: list[str] = []
    for kind in sorted({market_kind(s) for s in symbols} or {"spot"}, key=lambda k: k != "spot"):
        name = names.get(kind)
        if name is not None and name not in out:
            out.append(name)
    return out or ["spot"]


def client_options(exchange_id: str, types: list[str] | None) -> dict[str, Any]:
    options = copy.deepcopy(QUIET_OPTIONS.get(exchange_id, {}))
    if types is not None:
        options["fetchMarkets"] = {"types": list(types)}
    return options
