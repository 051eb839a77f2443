"""Exchange dialects the simulator speaks; `make_dialect("okx")` builds one. Every dialect
speaks to a ccxt client but OANDA's, which `candlekeeper.actors.sources.oanda` speaks to."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Ctx, Dialect

#: dialect name -> "module:Class" (imported on first use)
DIALECTS: dict[str, str] = {
    "binance": "binance:BinanceDialect",
    "okx": "okx:OkxDialect",
    "bybit": "bybit:BybitDialect",
    "kraken": "kraken:KrakenDialect",
    "coinbase": "coinbase:CoinbaseDialect",
    "kucoin": "kucoin:KucoinDialect",
    "oanda": "oanda:OandaDialect",
}


def make_dialect(name: str, **options: Any) -> Dialect:
    """A fresh dialect instance (it holds per-server rate meters, so never share one).
    `options` go to its constructor (OANDA: `token`, `account_id`, `complete_lag_ms`)."""
    try:
        module, cls = DIALECTS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; known: {', '.join(DIALECTS)}") from None
    dialect: Dialect = getattr(importlib.import_module(f"{__name__}.{module}"), cls)(**options)
    return dialect


__all__ = ["DIALECTS", "Ctx", "Dialect", "make_dialect"]
