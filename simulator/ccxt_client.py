"""How to point the real ccxt clients at a simulator (or any exchange-compatible base URL)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import ccxt

from ..actors.sources.profiles import client_options
from ..actors.sources.urls import rebase_urls


def binance_options() -> dict[str, Any]:
    """ccxt options so that `load_markets()` calls only GET /api/v3/exchangeInfo.

    - fetchMarkets.types=["spot"]: otherwise it also loads fapi/dapi exchangeInfo (futures).
    - fetchCurrencies=False: otherwise, with API keys set, it calls private sapi
      capital/config/getall (without keys it silently skips it, but be explicit).
    - fetchMargins=False: with keys, spot market loading also calls sapi margin pair lists.
    - adjustForTimeDifference=False: would call /api/v3/time on every load_markets.
    """
    return client_options("binance", ["spot"])


def make_binance(api_base: str | None = None, *, timeout_ms: int = 10_000,
                 enable_rate_limit: bool = False) -> ccxt.binance:
    """A real ccxt.binance client with `binance_options()`, its REST URLs rebased on
    `api_base` when given.

    `enable_rate_limit` defaults to False: ccxt's own throttle sleeps inside the calling thread
    (50 ms per weight unit for binance), which would block an actor and double-count with the
    daemon's own limiter. Keep it False whenever the daemon limits itself.
    """
    ex = ccxt.binance({
        "enableRateLimit": enable_rate_limit,
        "timeout": timeout_ms,
        "options": binance_options(),
    })
    if api_base is not None:
        ex.urls["api"] = rebase_urls(ex.urls["api"], api_base)
    return ex


#: Options that keep each client's `load_markets` to spot listings (and off private or
#: optional endpoints). Without them ccxt's defaults also load derivative listings; see the
#: README's per-exchange table. Coinbase and Kraken have no such option (Coinbase's futures
#: listing failure is swallowed by ccxt's sync client anyway; Kraken lists spot only).
SPOT_ONLY_OPTIONS: dict[str, dict[str, Any]] = {
    "binance": client_options("binance", ["spot"]),
    "okx": {"fetchMarkets": {"types": ["spot"]}},
    "bybit": {"fetchMarkets": {"types": ["spot"]}},
    "kucoin": {"fetchMarkets": {"types": ["spot"], "fetchTickersFees": False}},
    "kraken": {},
    "coinbase": {},
}


def make_client(exchange_id: str, api_base: str | None = None, *, timeout_ms: int = 10_000,
                spot_only: bool = True, enable_rate_limit: bool = False,
                options: dict[str, Any] | None = None) -> ccxt.Exchange:
    """A real ccxt client for `exchange_id` ("okx", "bybit", ...), REST URLs rebased on
    `api_base` when given. `spot_only` applies `SPOT_ONLY_OPTIONS`; `options` are merged
    over them. ccxt's own rate limiter is off by default (see `make_binance`)."""
    opts = copy.deepcopy(SPOT_ONLY_OPTIONS.get(exchange_id, {})) if spot_only else {}
    opts.update(copy.deepcopy(options or {}))
    ex = getattr(ccxt, exchange_id)({
        "enableRateLimit": enable_rate_limit,
        "timeout": timeout_ms,
        "options": opts,
    })
    if api_base is not None:
        ex.urls["api"] = rebase_urls(ex.urls["api"], api_base)
    return ex


def use_clock(ex: ccxt.Exchange, now_ms: Callable[[], int]) -> ccxt.Exchange:
    """Make the client's own clock `now_ms` (a fake clock in tests).

    Some clients derive request windows from their own clock: OKX picks /market/candles or
    /market/history-candles by comparing `since` with *its* now, Coinbase and KuCoin compute
    `start`/`startAt` from it when `since` is None. Against a simulator on a fake clock those
    requests would target the wrong years unless the client shares the clock."""
    ex.milliseconds = now_ms
    ex.seconds = lambda: now_ms() // 1000
    return ex
