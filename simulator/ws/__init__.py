"""Loopback WebSocket servers speaking Binance, OKX and Bybit public kline stream dialects,
for the real ccxt.pro client (see README.md in this folder)."""

from .dialects import DIALECTS, Dialect, Rules
from .faults import StallMode, StreamFault, StreamFaults
from .server import WsSimulator
from .stats import WsStats

__all__ = ["DIALECTS", "Dialect", "Rules", "StallMode", "StreamFault", "StreamFaults",
           "WsSimulator", "WsStats"]
