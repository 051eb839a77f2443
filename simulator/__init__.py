"""Loopback simulator of exchanges' public REST APIs (Binance, OKX, Bybit, Kraken, Coinbase,
KuCoin), for tests, --simulate and soaks.

The ccxt side (`make_client`, `binance_options`, `make_binance`) lives in
`simulator.ccxt_client`, kept out of this import so a bare server does not pay for ccxt.
"""

from .catalogue import DEFAULT_MARKETS, default_markets
from .dialects import DIALECTS
from .faults import FaultKind, Faults, OutageMode, PoisonKind
from .history import INTERVALS, CandleHistory
from .server import DEFAULT_SYMBOLS, BinanceSimulator, ExchangeSimulator, synthetic_symbols, wall_clock_ms
from .stats import RequestHook, StatsSnapshot

__all__ = [
                     "DEFAULT_MARKETS",
                     "DEFAULT_SYMBOLS",
                     "DIALECTS",
                     "INTERVALS",
                     "BinanceSimulator",
                     "CandleHistory",
                     "ExchangeSimulator",
                     "FaultKind",
                     "Faults",
                     "OutageMode",
                     "PoisonKind",
                     "RequestHook",
                     "StatsSnapshot",
                     "default_markets",
                     "synthetic_symbols",
                     "wall_clock_ms",
]
