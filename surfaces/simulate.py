"""`--simulate`: every configured exchange served by an in-process simulated exchange speaking
its dialect, for `run` and `backfill` alike (the simulator is imported only when asked for)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import structlog

from ..app.config import Config


def simulated(cfg: Config) -> tuple[Config, list[Any]]:
    """Point every exchange at its own in-process simulated exchange speaking its dialect (Binance,
    OKX, Bybit, Kraken, Coinbase, KuCoin, OANDA), with light random faults, and keep the data apart
    from a real database (`<path>.simulate.db`). Each lists the dialect's default markets and, also,
    the configured symbols, so `ctl add` of a listed market works as it would against the real
    exchange. An exchange with no dialect is simulated as Binance, and the log says so.

    An OANDA exchange (`source = "oanda"`) is served by the OANDA dialect with a token made up here,
    put in its `token_env` variable for this process only (so a real token there is never sent
    anywhere, not even to the simulator) and never printed."""
    import secrets

    from ..simulator.dialects import DIALECTS
    from ..simulator.faults import Faults
    from ..simulator.server import ExchangeSimulator

    log = structlog.get_logger("candlekeeper")
    sims, exchanges = [], []
    tokens: dict[str, str] = {}  # token_env -> the simulated token
    for i, ex in enumerate(cfg.exchanges):
        options: dict[str, Any] = {}
        history: dict[str, Any] = {}
        if ex.source == "oanda":
            dialect = "oanda"
            # a week of history, so a weekend (the market closed since yesterday) has candles to show
            history["history_start_ms"] = (int(time.time()) // 86400 - 7) * 86_400_000
            token = tokens.setdefault(ex.token_env, secrets.token_hex(16) + "-" + secrets.token_hex(16))
            os.environ[ex.token_env] = token
            options["token"] = token
        else:
            dialect = ex.exchange if ex.exchange in DIALECTS and ex.exchange != "oanda" else "binance"
        if dialect != ex.exchange:
            log.warning("simulate_no_dialect", exchange=ex.name, ccxt_id=ex.exchange, simulated_as=dialect)
        sim = ExchangeSimulator(list(ex.symbols), dialect=dialect, name=ex.name, seed=i,
                                faults=Faults.uniform(0.03, seed=i), dialect_options=options, **history).start()
        sims.append(sim)
        log.info("simulating", exchange=ex.name, dialect=dialect, url=sim.url)
        exchanges.append(dataclasses.replace(ex, exchange=dialect, api_base=sim.url))
    root, _ = os.path.splitext(cfg.storage.path)
    # never into a real database: a SQLite file of its own, also when the config names a
    # PostgreSQL one (and so without clustering, which needs it)
    storage = dataclasses.replace(cfg.storage, path=f"{root}.simulate.db", url=None, timescale=None)
    cluster = dataclasses.replace(cfg.cluster, enabled=False)
    return dataclasses.replace(cfg, exchanges=tuple(exchanges), storage=storage, cluster=cluster), sims
