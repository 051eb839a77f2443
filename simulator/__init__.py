"""Loopback simulator of Binance's public spot REST API, for tests, --simulate and soaks.

The ccxt side (`binance_options`, `make_binance`) lives in `simulator.ccxt_client`, kept out of
this import so a bare server does not pay for importing ccxt.
"""

from .faults import FaultKind, Faults, OutageMode, PoisonKind
from .history import INTERVALS, CandleHistory
from .server import DEFAULT_SYMBOLS, BinanceSimulator, synthetic_symbols, wall_clock_ms
from .stats import RequestHook, StatsSnapshot

__all__ = [
    "DEFAULT_SYMBOLS",
    "INTERVALS",
    "BinanceSimulator",
    "CandleHistory",
    "FaultKind",
    "Faults",
    "OutageMode",
    "PoisonKind",
    "RequestHook",
    "StatsSnapshot",
    "synthetic_symbols",
    "wall_clock_ms",
]
