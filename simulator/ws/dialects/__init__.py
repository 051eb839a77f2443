"""The exchanges' public kline WebSocket dialects the simulator speaks."""

from __future__ import annotations

from .base import Dialect, Op, Refusal, Request, Resolved, Rules, SessionView, StreamKey, Topic
from .binance import BinanceDialect
from .bybit import BybitDialect
from .okx import OkxDialect

DIALECTS: dict[str, Dialect] = {
    "binance": BinanceDialect(), "okx": OkxDialect(), "bybit": BybitDialect(),
}


def dialect(name: str) -> Dialect:
    """The dialect of exchange `name` ("binance", "okx", "bybit")."""
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"no WebSocket dialect for {name!r}; have {sorted(DIALECTS)}") from None


__all__ = [
    "DIALECTS",
    "Dialect",
    "Op",
    "Refusal",
    "Request",
    "Resolved",
    "Rules",
    "SessionView",
    "StreamKey",
    "Topic",
    "dialect",
]
