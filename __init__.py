"""candlekeeper: a market-data ingestion daemon that never loses a candle, embeddable in your app.

    import candlekeeper
    system = candlekeeper.start({"storage": {"path": "candles.db"},
                                 "exchanges": {"binance": {"symbols": ["BTC/USDT"]}}})
    system.subscribe(print)        # each newly stored candle (a StoredCandle)
    print(system.health())
    system.stop()

Layers, bottom up (each imports only the ones below it): `candlekeeper.supervisors` (the OTP
runtime), `candlekeeper.resilience` (state machines), `candlekeeper.actors` (ingestion actors and
their messages), `candlekeeper.app` (config, tree, operator commands), `candlekeeper.surfaces`
(control socket, CLI, top). `candlekeeper.simulator` is test support, imported only by
`--simulate`, the tests and the benchmarks.

The names below are imported lazily, so `candlekeeper ctl health` does not pay for importing ccxt.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .actors.messages import SeriesKey, StoredCandle
    from .app.config import Config, ConfigError
    from .app.errors import CommandError, MissingDependency, SocketInUse, SocketUnusable, StartupError, StorageUnusable
    from .app.system import System
    from .surfaces.embedding import start

__all__ = [
    "CommandError",
    "Config",
    "ConfigError",
    "MissingDependency",
    "SeriesKey",
    "SocketInUse",
    "SocketUnusable",
    "StartupError",
    "StorageUnusable",
    "StoredCandle",
    "System",
    "start",
]

_HOMES = {
    "CommandError": ".app.errors",
    "Config": ".app.config",
    "ConfigError": ".app.config",
    "MissingDependency": ".app.errors",
    "SeriesKey": ".actors.messages",
    "SocketInUse": ".app.errors",
    "SocketUnusable": ".app.errors",
    "StartupError": ".app.errors",
    "StorageUnusable": ".app.errors",
    "StoredCandle": ".actors.messages",
    "System": ".app.system",
    "start": ".surfaces.embedding",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'candlekeeper' has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
