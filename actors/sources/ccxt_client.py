"""Building the real ccxt client an exchange actor owns."""

from __future__ import annotations

import copy
from typing import Any

import ccxt

from .urls import rebase_urls

# Options that keep ccxt from calling endpoints the daemon does not need. For binance,
# load_markets then needs only GET /api/v3/exchangeInfo (spot), no futures or private calls.
EXCHANGE_OPTIONS: dict[str, dict[str, Any]] = {
    "binance": {
        "fetchMarkets": {"types": ["spot"]},
        "fetchCurrencies": False,
        "fetchMargins": False,
        "adjustForTimeDifference": False,
    },
}


def make_client(exchange_id: str, *, api_base: str | None = None, timeout: float = 10.0) -> ccxt.Exchange:
    """A synchronous ccxt client with ccxt's own rate limiter off (ours paces requests:
    ccxt's would sleep inside a worker and count twice) and its REST URLs rebased on
    `api_base` when given."""
    cls = getattr(ccxt, exchange_id)
    client = cls(
        {
            "enableRateLimit": False,
            "timeout": int(timeout * 1000),
            "options": copy.deepcopy(EXCHANGE_OPTIONS.get(exchange_id, {})),
        }
    )
    if api_base:
        client.urls["api"] = rebase_urls(client.urls["api"], api_base)
    return client
