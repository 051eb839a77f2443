"""candlekeeper's supervision runtime, and the way to embed the whole system in an app:

    import supervisors
    system = supervisors.start({"storage": {"path": "candles.db"},
                                "exchanges": {"binance": {"symbols": ["BTC/USDT"]}}})
    system.subscribe(print)        # each newly stored candle
    print(system.health())
    system.stop()

`start` and `System` are imported lazily, so `import supervisors.child` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["System", "start"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from supervisors import system

        return getattr(system, name)
    raise AttributeError(f"module 'supervisors' has no attribute {name!r}")
