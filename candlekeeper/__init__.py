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
    from candlekeeper.actors.messages import SeriesKey, StoredCandle
    from candlekeeper.app.config import Config, ConfigError
    from candlekeeper.app.system import CommandError, StorageUnusable, System, start
    from candlekeeper.surfaces.control import SocketInUse

__all__ = [
    "CommandError",
    "Config",
    "ConfigError",
    "SeriesKey",
    "SocketInUse",
    "StorageUnusable",
    "StoredCandle",
    "System",
    "start",
]

_HOMES = {
    "CommandError": "candlekeeper.app.system",
    "Config": "candlekeeper.app.config",
    "ConfigError": "candlekeeper.app.config",
    "SeriesKey": "candlekeeper.actors.messages",
    "SocketInUse": "candlekeeper.surfaces.control",
    "StorageUnusable": "candlekeeper.app.system",
    "StoredCandle": "candlekeeper.actors.messages",
    "System": "candlekeeper.app.system",
    "start": "candlekeeper.app.system",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'candlekeeper' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted(__all__)
