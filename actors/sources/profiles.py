"""What ccxt does not know about how each exchange serves candles, and what it knows (`profile`).

ccxt's metadata is the first source of truth: the page size (`features[...]['fetchOHLCV']['limit']`)
and the rate budget (`rateLimit`; each endpoint's cost comes from ccxt per request). The exchange's
own documentation is the second: how a window is served and which end an over-full answer loses,
whether minutes without trades are left out, how far back history reaches, and the exchange's own
statement of its budget where ccxt's is out of date (Binance: 6000 request weight a minute, klines
2). An exchange not listed here is served like Binance (oldest first from `since`), with ccxt's
page size and budget.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from .base import Profile

#: Facts per ccxt id beyond ccxt's metadata (see the README's exchanges table).
KNOWN: dict[str, dict[str, Any]] = {
    "binance": {"paging": "cursor", "cut": "end", "rate": 6000 / 60,
                "costs": {"ohlcv": 2.0, "markets": 20.0, "heartbeat": 1.0}},
    # OKX serves the newest rows of the window it is asked for; history-candles was capped at 100
    "okx": {"paging": "window", "cut": "start", "caps": (300, 100)},
    "bybit": {"paging": "window", "cut": "start"},
    "kraken": {"paging": "recent", "cut": "start", "omits_empty": True, "reach": 720},
    "coinbase": {"paging": "window", "cut": "start", "omits_empty": True, "caps": (300, 350)},
    "kucoin": {"paging": "window", "cut": "start", "omits_empty": True},
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
}


def profile(exchange_id: str, client: Any) -> Profile:
    """The profile of `exchange_id`, from its ccxt client's metadata and `KNOWN`."""
    features = ((getattr(client, "features", None) or {}).get("spot") or {}).get("fetchOHLCV") or {}
    page_limit = int(features.get("limit") or 500)
    rate_limit_ms = float(getattr(client, "rateLimit", 100) or 100)
    base = Profile(page_limit=page_limit, caps=(page_limit,), rate=1000.0 / rate_limit_ms)
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
