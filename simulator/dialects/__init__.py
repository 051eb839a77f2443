"""Exchange dialects the simulator speaks; `make_dialect("okx")` builds one."""

from __future__ import annotations

import importlib

from .base import Ctx, Dialect

#: dialect name -> "module:Class" (imported on first use)
DIALECTS: dict[str, str] = {
    "binance": "binance:BinanceDialect",
    "okx": "okx:OkxDialect",
    "bybit": "bybit:BybitDialect",
    "kraken": "kraken:KrakenDialect",
    "coinbase": "coinbase:CoinbaseDialect",
    "kucoin": "kucoin:KucoinDialect",
}


def make_dialect(name: str) -> Dialect:
    """A fresh dialect instance (it holds per-server rate meters, so never share one)."""
    try:
        module, cls = DIALECTS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; known: {', '.join(DIALECTS)}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


__all__ = ["DIALECTS", "Ctx", "Dialect", "make_dialect"]
