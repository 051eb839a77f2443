"""The candlekeeper tree, and `System`: one running daemon, in `run.py` or inside another app.

    root (one_for_one)
    ├── storage          StorageActor: the one SQLite writer
    ├── health           HealthActor: latest status of everything
    ├── control          ControlServer: msgpack over a Unix socket
    └── NAME             Supervisor (rest_for_one), one per exchange
        ├── exchange     ExchangeActor: ccxt client, rate-limit bucket, circuit breaker
        └── series       Supervisor (one_for_one)
            └── SYMBOL@TF  SeriesActor, one per (symbol, timeframe)

Why these strategies: series are independent, so one crashing restarts only itself
(one_for_one). An exchange's series depend on its exchange actor, so a crash of the exchange
actor also restarts its series (rest_for_one): their requests in flight died with it, and they
resume cleanly from the store. The breaker object is created here and handed to every
incarnation of the exchange actor, so no restart resets an open breaker. Storage, health and
control are independent of each other at the root (one_for_one): a storage restart changes the
store generation and every series re-reads its resume point; after a health restart, statuses
come back as each actor next reports a change.

Nothing here is global: two `System`s run side by side in one process.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Mapping
from typing import Any

import pykka

from actors.breaker import BreakerConfig, CircuitBreaker
from actors.exchange import ExchangeActor, counts_against_exchange
from actors.health import HealthActor
from actors.messages import Pause, Reset, SeriesKey
from actors.series import SeriesActor
from actors.storage import StorageActor
from supervisors import config as config_mod
from supervisors.child import Address, Exit, Runtime
from supervisors.config import Config, ExchangeConfig
from supervisors.supervisor import ChildSpec, Supervisor, start_root

ASK_TIMEOUT = 10.0


class CommandError(Exception):
    """A control command that was refused (unknown target, bad arguments): its message is the reason."""


def series_id(symbol: str, timeframe: str) -> str:
    return f"{symbol}@{timeframe}"


class System:
    """A running candlekeeper: start it, ask it, steer it, stop it."""

    def __init__(self, config: Config, *, runtime: Runtime | None = None, control: bool = True) -> None:
        self.config = config
        self.runtime = runtime or Runtime(rng=random.Random())
        self.storage = Address("storage")
        self.health_address = Address("health")
        self.exchange_addresses: dict[str, Address] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.with_control = control
        self.exited = threading.Event()
        self.exit: Exit | None = None
        self._root: pykka.ActorRef[Supervisor] | None = None

    # -- building ------------------------------------------------------------------------

    def _exchange_spec(self, ex: ExchangeConfig) -> ChildSpec:
        address = self.exchange_addresses.setdefault(ex.name, Address(f"{ex.name}/exchange"))
        r = ex.resilience
        breaker = self.breakers.setdefault(
            ex.name,
            CircuitBreaker(
                BreakerConfig(
                    failure_threshold=r.breaker_threshold,
                    recovery_timeout=r.breaker_recovery,
                    half_open_max_calls=r.breaker_half_open_calls,
                    max_recovery_timeout=max(r.breaker_recovery, 600.0),
                    is_failure=counts_against_exchange,
                ),
                clock=self.runtime.clock,
                rng=self.runtime.rng,
            ),
        )
        series_specs = [self._series_spec(ex, symbol, tf) for symbol in ex.symbols for tf in ex.ingest.timeframes]
        return ChildSpec(
            ex.name,
            Supervisor,
            args=(
                [
                    ChildSpec("exchange", ExchangeActor, args=(ex, breaker, self.health_address), address=address),
                    ChildSpec(
                        "series",
                        Supervisor,
                        args=(series_specs,),
                        kwargs={"strategy": "one_for_one", "start_timeout": 30.0},
                        kind="supervisor",
                        shutdown=120.0,
                    ),
                ],
            ),
            kwargs={"strategy": "rest_for_one", "start_timeout": 60.0},
            kind="supervisor",
            shutdown=180.0,
        )

    def _series_spec(self, ex: ExchangeConfig, symbol: str, timeframe: str) -> ChildSpec:
        return ChildSpec(
            series_id(symbol, timeframe),
            SeriesActor,
            args=(SeriesKey(ex.name, symbol, timeframe), ex.ingest, ex.resilience),
            kwargs={
                "exchange": self.exchange_addresses[ex.name],
                "storage": self.storage,
                "health": self.health_address,
                "request_timeout": ex.timeout,
                "page_limit": ex.page_limit,
            },
            kind="series",
            shutdown=10.0,
        )

    def _root_specs(self) -> list[ChildSpec]:
        specs = [
            ChildSpec("storage", StorageActor, args=(self.config.storage.path, self.health_address),
                      address=self.storage, kind="storage", shutdown=30.0),
            ChildSpec("health", HealthActor, args=([e.name for e in self.config.exchanges],),
                      address=self.health_address, kind="health"),
        ]
        if self.with_control:
            from supervisors.control import ControlServer

            specs.append(ChildSpec("control", ControlServer, args=(self.config.control, self), kind="control"))
        specs.extend(self._exchange_spec(ex) for ex in self.config.exchanges)
        return specs

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> System:
        self.runtime.start()
        self.runtime.events.subscribe(self._forward_event)
        self._root, _ = start_root(self.runtime, self._root_specs(), on_exit=self._on_root_exit, start_timeout=120.0)
        return self

    def _forward_event(self, event: Any) -> None:
        self.health_address.tell(event)

    def _on_root_exit(self, exit_: Exit) -> None:
        self.exit = exit_
        self.exited.set()

    def stop(self, timeout: float = 300.0) -> None:
        """Stop every actor in reverse start order (storage flushes last), then the timer thread."""
        if self._root is not None:
            self._root.stop(block=True, timeout=timeout)
            self.exited.wait(timeout)
        self.runtime.events.unsubscribe(self._forward_event)
        self.runtime.stop()

    def wait(self, timeout: float | None = None) -> Exit | None:
        self.exited.wait(timeout)
        return self.exit

    def __enter__(self) -> System:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # -- asking --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        try:
            return self.health_address.proxy().health().get(timeout=ASK_TIMEOUT)
        except pykka.ActorDeadError:
            return {"status": "down", "exchanges": [], "series": [], "error": "health actor restarting"}

    def tree(self) -> dict[str, Any]:
        if self._root is None:
            raise CommandError("not started")
        return self._root.proxy().tree().get(timeout=ASK_TIMEOUT)

    def _sup(self, *path: str) -> Any:
        """The proxy of a supervisor by child ids from the root, e.g. ("binance", "series")."""
        ref: pykka.ActorRef[Any] | None = self._root
        for part in path:
            try:
                ref = ref.proxy().child_ref(part).get(timeout=ASK_TIMEOUT) if ref is not None else None
            except KeyError:
                raise CommandError(f"no such actor: {'/'.join(path)}") from None
            if ref is None:
                raise CommandError(f"{'/'.join(path)} is not running")
        assert ref is not None
        return ref.proxy()

    def _exchange_config(self, exchange: str) -> ExchangeConfig:
        for ex in self.config.exchanges:
            if ex.name == exchange:
                return ex
        raise CommandError(f"unknown exchange {exchange!r}")

    def _series_targets(self, exchange: str, symbol: str | None, timeframe: str | None) -> list[Any]:
        ex = self._exchange_config(exchange)
        series = self._sup(ex.name, "series")
        rows = series.which_children().get(timeout=ASK_TIMEOUT)
        out = []
        for row in rows:
            sym, _, tf = row["id"].rpartition("@")
            if (symbol is None or sym == symbol) and (timeframe is None or tf == timeframe):
                if row["state"] == "running":
                    ref = series.child_ref(row["id"]).get(timeout=ASK_TIMEOUT)
                    if ref is not None:
                        out.append(ref)
        if symbol is not None and not out:
            raise CommandError(f"no running series {exchange} {symbol}" + (f"@{timeframe}" if timeframe else ""))
        return out

    def reset(self, exchange: str, symbol: str | None = None, timeframe: str | None = None) -> dict[str, Any]:
        """Reset the breaker of an exchange (and every series' retry state and quarantine), or one series'."""
        targets = self._series_targets(exchange, symbol, timeframe)
        if symbol is None:
            self.exchange_addresses[exchange].tell(Reset())
        for ref in targets:
            ref.tell(Reset())
        return {"exchange": exchange, "symbol": symbol, "series_reset": len(targets)}

    def pause(self, exchange: str, symbol: str | None = None, timeframe: str | None = None, *, paused: bool = True) -> dict[str, Any]:
        targets = self._series_targets(exchange, symbol, timeframe)
        for ref in targets:
            ref.tell(Pause(paused))
        return {"exchange": exchange, "symbol": symbol, "series": len(targets), "paused": paused}

    def latest(self, exchange: str, symbol: str, timeframe: str = "1m", n: int = 1) -> list[tuple[Any, ...]]:
        return self.storage.proxy().latest(exchange, symbol, timeframe, n).get(timeout=ASK_TIMEOUT)


def start(config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None, **options: Any) -> System:
    """Start a candlekeeper system: `config` is a `Config`, a dict with the TOML's keys, or a path."""
    if config is None:
        cfg = config_mod.default()
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = config_mod.from_dict(config)
    else:
        cfg = config_mod.load(config)
    return System(cfg, **options).start()
