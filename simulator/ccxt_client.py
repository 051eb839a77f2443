"""How to point the real `ccxt.binance` at a simulator (or any Binance-compatible base URL)."""

from __future__ import annotations

import copy
from typing import Any

import ccxt

from ..actors.sources.ccxt_client import EXCHANGE_OPTIONS
from ..actors.sources.urls import rebase_urls


def binance_options() -> dict[str, Any]:
    """ccxt options so that `load_markets()` calls only GET /api/v3/exchangeInfo.

    - fetchMarkets.types=["spot"]: otherwise it also loads fapi/dapi exchangeInfo (futures).
    - fetchCurrencies=False: otherwise, with API keys set, it calls private sapi
      capital/config/getall (without keys it silently skips it, but be explicit).
    - fetchMargins=False: with keys, spot market loading also calls sapi margin pair lists.
    - adjustForTimeDifference=False: would call /api/v3/time on every load_markets.
    """
    return copy.deepcopy(EXCHANGE_OPTIONS["binance"])


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
