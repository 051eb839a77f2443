"""`candlekeeper.start`: the whole system inside another Python app, with or without its control socket."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..app.config import Config
from ..app.system import System, as_config
from .control import ControlSurface


def start(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    control: bool = True,
    **options: Any,
) -> System:
    """Start a candlekeeper system and return it running.

    `config` is a `Config`, a dict with the TOML's keys, a path to a TOML file, or None (the
    built-in defaults). `control=False` runs without the control socket (the app steers it through
    the `System` methods). `subscribers=[...]` receive every candle stored from the very start (see
    `System.subscribe`); `runtime=` and `on_shutdown=` are passed to `System`.
    """
    cfg = as_config(config)
    surfaces = [ControlSurface(cfg.control)] if control else []
    return System(cfg, surfaces=surfaces, **options).start()
