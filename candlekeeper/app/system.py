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
store generation and every series re-reads its resume point; the health actor's knowledge
(`HealthState`) is owned here, so a health restart loses no status and no restart count.

Nothing here is global: two `System`s run side by side in one process.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pykka
import structlog

from candlekeeper.actors.alerting.alerts import AlertState
from candlekeeper.resilience.breaker import BreakerConfig, CircuitBreaker
from candlekeeper.actors.exchange import ExchangeActor
from candlekeeper.actors.market.errors import counts_against_exchange
from candlekeeper.actors.health import HealthActor, HealthState
from candlekeeper.actors.messages import ForgetSeries, Pause, SeriesKey
from candlekeeper.actors.metrics import Metrics, MetricsEndpoint
from candlekeeper.actors.notifier import NotifierActor
from candlekeeper.actors.series import SeriesActor
from candlekeeper.actors.market.candles import timeframe_ms
from candlekeeper.actors.storage import StorageActor
from candlekeeper.actors.stores.sqlite import Store, StoreError, StoreGone
from candlekeeper.app import config as config_mod
from candlekeeper.supervisors.child import Address, Crash, Exit, Fanout, Runtime
from candlekeeper.app.config import Config, ExchangeConfig
from candlekeeper.supervisors.events import EventBus
from candlekeeper.supervisors.supervisor import ChildExists, ChildSpec, NoSuchChild, Supervisor, start_root

SYMBOL = re.compile(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+)?$")

ASK_TIMEOUT = 10.0

log = structlog.get_logger("candlekeeper")


class CommandError(Exception):
    """A control command that was refused (unknown target, bad arguments): its message is the reason."""


class StorageUnusable(Exception):
    """The database cannot be opened at all (a bad path, no permission): a mistake to report at
    start, not a crash loop of the storage actor that ends with the root giving up."""


def series_id(symbol: str, timeframe: str) -> str:
    return f"{symbol}@{timeframe}"


class System:
    """A running candlekeeper: start it, ask it, steer it, stop it."""

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime | None = None,
        control: bool = True,
        on_shutdown: Callable[[], None] | None = None,
        subscribers: Iterable[Any] = (),
    ) -> None:
        self.config = config
        self.runtime = runtime or Runtime(rng=random.Random(), allow_crash_injection=config.control.chaos)
        self.storage = Address("storage")
        self.health_address = Address("health")
        self.notifier_address = Address("notifier")
        # every actor's status reports go to health and to the alerts notifier
        self.status = Fanout(self.health_address, self.notifier_address)
        self.candles = EventBus()  # newly stored candles, for `subscribe`
        self.metrics = Metrics(health=self.health)
        self.health_state = HealthState()  # survives restarts of the health actor
        for subscriber in subscribers:  # before start, so they miss nothing of the backfill
            self.candles.subscribe(subscriber)
        self.exchange_addresses: dict[str, Address] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        # The desired series of each exchange. The list object is the series supervisor's own
        # child-spec list, so a restarted series supervisor starts from it: run-time additions
        # and removals survive restarts, not only the daemon's.
        self.series_specs: dict[str, list[ChildSpec]] = {}
        self.with_control = control
        self._on_shutdown = on_shutdown
        self._lock = threading.Lock()
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
        series_specs = self.series_specs[ex.name]
        return ChildSpec(
            ex.name,
            Supervisor,
            args=(
                [
                    ChildSpec("exchange", ExchangeActor, args=(ex, breaker, self.status, self.metrics), address=address,
                              kind="exchange", shutdown=ex.timeout + 5.0),
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
                "alerts": self.notifier_address,
                "request_timeout": ex.timeout,
                "page_limit": ex.page_limit,
                "metrics": self.metrics,
                # the time the exchange needs to serve one poll of each configured series at its
                # rate limit: the series' polls after each close are spread over it (at most
                # poll_interval), see SeriesActor.poll_offset
                "poll_spread": min(ex.ingest.poll_interval,
                                   len(ex.symbols) * len(ex.ingest.timeframes) / ex.rate_limit),
            },
            kind="series",
            shutdown=10.0,
        )

    def _root_specs(self) -> list[ChildSpec]:
        specs = [
            ChildSpec("storage", StorageActor, args=(self.config.storage.path, self.status),
                      kwargs={"candles": self.candles, "metrics": self.metrics}, address=self.storage, kind="storage",
                      shutdown=30.0),
            ChildSpec("health", HealthActor, args=([e.name for e in self.config.exchanges], self.health_state),
                      address=self.health_address, kind="health"),
        ]
        # one AlertState per system, kept by the spec: a restarted notifier still resolves what it opened
        specs.append(ChildSpec("notifier", NotifierActor, args=(self.config.alerts, AlertState()),
                               address=self.notifier_address, kind="notifier", shutdown=10.0))
        if self.config.metrics.listen:
            specs.append(ChildSpec("metrics", MetricsEndpoint, args=(self.metrics, self.config.metrics.listen),
                                   kind="metrics"))
        if self.with_control:
            from candlekeeper.surfaces.control import ControlServer

            specs.append(ChildSpec("control", ControlServer, args=(self.config.control, self), kind="control"))
        specs.extend(self._exchange_spec(ex) for ex in self.config.exchanges)
        return specs

    # -- lifecycle -----------------------------------------------------------------------

    def _plan_series(self) -> None:
        """Configured series, plus those added and minus those removed at run time (persisted)."""
        changes = stored_series_changes(self.config.storage.path)
        for ex in self.config.exchanges:
            wanted = [(sym, tf) for sym in ex.symbols for tf in ex.ingest.timeframes]
            for exchange, sym, tf, _, active in changes:
                if exchange != ex.name:
                    continue
                if active and (sym, tf) not in wanted:
                    wanted.append((sym, tf))
                elif not active and (sym, tf) in wanted:
                    wanted.remove((sym, tf))
            self.exchange_addresses.setdefault(ex.name, Address(f"{ex.name}/exchange"))
            self.series_specs[ex.name] = [self._series_spec(ex, sym, tf) for sym, tf in wanted]

    def start(self) -> System:
        """Start the tree. Raises `candlekeeper.surfaces.control.SocketInUse` when another daemon holds the
        control socket (or a TCP port is taken), `StorageUnusable` when the database cannot be
        opened at all (see `stored_series_changes`)."""
        if self.with_control:
            from candlekeeper.surfaces.control import check_free

            check_free(self.config.control)
        if self.config.metrics.listen:
            check_port_free(self.config.metrics.listen)
        self._plan_series()
        self.runtime.start()
        self.runtime.events.subscribe(self._forward_event)
        self.runtime.events.subscribe(self.metrics.on_event)
        self._root, _ = start_root(self.runtime, self._root_specs(), on_exit=self._on_root_exit, start_timeout=120.0)
        return self

    def _forward_event(self, event: Any) -> None:
        self.status.tell(event)

    def _on_root_exit(self, exit_: Exit) -> None:
        self.exit = exit_
        self.exited.set()

    def stop(self, timeout: float = 300.0) -> None:
        """Stop every actor in reverse start order (storage flushes last), then the timer thread."""
        if self._root is not None:
            self._root.stop(block=True, timeout=timeout)
            self.exited.wait(timeout)
        self.runtime.events.unsubscribe(self._forward_event)
        self.runtime.events.unsubscribe(self.metrics.on_event)
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

    def metrics_address(self) -> tuple[str, int] | None:
        """Where the Prometheus endpoint listens (the real port when configured with port 0)."""
        if not self.config.metrics.listen:
            return None
        return self._sup().child_ref("metrics").get(timeout=ASK_TIMEOUT).proxy().address().get(timeout=ASK_TIMEOUT)

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
        # Asked, not told: when the reply comes, the new states have been reported to health, so
        # a `health` right after a `reset` already shows them.
        futures = [ref.proxy().reset() for ref in targets]
        if symbol is None:
            try:
                futures.append(self.exchange_addresses[exchange].proxy().reset())
            except pykka.ActorDeadError:
                raise CommandError(f"{exchange} exchange actor is restarting; try again") from None
        for future in futures:
            try:
                future.get(timeout=ASK_TIMEOUT)
            except pykka.ActorDeadError:
                pass  # that series crashed meanwhile; its replacement starts with a clean state
        return {"exchange": exchange, "symbol": symbol, "series_reset": len(targets)}

    def pause(self, exchange: str, symbol: str | None = None, timeframe: str | None = None, *, paused: bool = True) -> dict[str, Any]:
        targets = self._series_targets(exchange, symbol, timeframe)
        for ref in targets:
            ref.tell(Pause(paused))
        return {"exchange": exchange, "symbol": symbol, "series": len(targets), "paused": paused}

    def latest(self, exchange: str, symbol: str, timeframe: str = "1m", n: int = 1) -> dict[str, Any]:
        """The newest stored candles and how stale the series is: answered from the store, so it
        works while the exchange is down (read-only mode)."""
        ex = self._exchange_config(exchange)
        if not isinstance(n, int) or not 1 <= n <= 1000:
            raise CommandError("n must be an integer from 1 to 1000")
        tf_ms = _timeframe(timeframe)
        rows = self.storage.proxy().latest(exchange, symbol, timeframe, n).get(timeout=ASK_TIMEOUT)
        if not rows and not any(s.id == series_id(symbol, timeframe) for s in self.series_specs.get(ex.name, [])):
            raise CommandError(f"no series {exchange}:{symbol}@{timeframe}")
        now = time.time()
        last = rows[0][0] if rows else None
        breaker = self.breakers[ex.name].state if ex.name in self.breakers else None
        return {
            "exchange": exchange,
            "symbol": symbol,
            "timeframe": timeframe,
            "candles": [dict(zip(("ts", "open", "high", "low", "close", "volume"), r, strict=True)) for r in rows],
            "last_ts": last,
            "stale_seconds": None if last is None else max(0.0, round(now - (last + tf_ms) / 1000, 3)),
            "exchange_breaker": breaker,
            "read_only": breaker == "open",
        }

    def add_series(self, exchange: str, symbol: str, timeframe: str = "1m") -> dict[str, Any]:
        """Start a series at run time and persist it, so a restart keeps it."""
        ex = self._exchange_config(exchange)
        _timeframe(timeframe)
        if not isinstance(symbol, str) or not SYMBOL.match(symbol):
            raise CommandError(f"bad symbol {symbol!r}: expected BASE/QUOTE")
        sid = series_id(symbol, timeframe)
        with self._lock:
            specs = self.series_specs[ex.name]
            if any(s.id == sid for s in specs):
                raise CommandError(f"{exchange}:{sid} is already running")
            listed = self._listed(ex.name, symbol)
            if listed is False:
                raise CommandError(f"{exchange} does not list {symbol}")
            self.storage.proxy().set_series_active(exchange, symbol, timeframe, True).get(timeout=ASK_TIMEOUT)
            spec = self._series_spec(ex, symbol, timeframe)
            specs.append(spec)
        try:
            self._sup(ex.name, "series").start_child(spec).get(timeout=ASK_TIMEOUT)
        except (ChildExists, CommandError):
            pass  # its supervisor restarted meanwhile and started it from the list
        return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "added": True}

    def remove_series(self, exchange: str, symbol: str, timeframe: str = "1m") -> dict[str, Any]:
        """Stop a series and persist its removal; its stored candles stay."""
        ex = self._exchange_config(exchange)
        sid = series_id(symbol, timeframe)
        with self._lock:
            specs = self.series_specs[ex.name]
            spec = next((s for s in specs if s.id == sid), None)
            if spec is None:
                raise CommandError(f"no series {exchange}:{sid}")
            self.storage.proxy().set_series_active(exchange, symbol, timeframe, False).get(timeout=ASK_TIMEOUT)
            specs.remove(spec)
        try:
            self._sup(ex.name, "series").delete_child(sid).get(timeout=ASK_TIMEOUT)
        except (NoSuchChild, CommandError):
            pass  # not running right now; it will not be started again
        path = f"root/{ex.name}/series/{sid}"
        self.health_address.tell(ForgetSeries(path))
        return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "removed": True}

    def _locate(self, target: Any, verb: str) -> tuple[pykka.ActorRef[Any], dict[str, Any]]:
        """The supervisor of the actor at `target` (its path below the root) and its child row."""
        if not isinstance(target, str) or not target.strip("/"):
            raise CommandError(f"{verb} needs a target path, e.g. binance/series/BTC/USDT@1m")
        remaining = target.strip("/").removeprefix("root/")
        parent = self._root
        if parent is None:
            raise CommandError("not started")
        while True:
            rows = parent.proxy().which_children().get(timeout=ASK_TIMEOUT)
            matches = sorted((r for r in rows if remaining == r["id"] or remaining.startswith(r["id"] + "/")),
                             key=lambda r: len(r["id"]), reverse=True)
            if not matches:
                raise CommandError(f"no actor at {target!r}")
            row = matches[0]
            remaining = remaining[len(row["id"]) + 1 :]
            if not remaining:
                return parent, row
            ref = parent.proxy().child_ref(row["id"]).get(timeout=ASK_TIMEOUT)
            if ref is None or row["kind"] != "supervisor":
                raise CommandError(f"no actor at {target!r}")
            parent = ref

    def restart(self, target: str) -> dict[str, Any]:
        """Restart an actor through its supervisor; `target` is its path below the root, e.g.
        ``binance/exchange``, ``binance/series/BTC/USDT@1m``, ``storage``, or ``binance``."""
        parent, row = self._locate(target, "restart")
        parent.proxy().restart_child(row["id"]).get(timeout=ASK_TIMEOUT)
        return {"restarted": row["path"]}

    def crash(self, target: str, reason: str = "injected crash") -> dict[str, Any]:
        """Make the actor at `target` raise, as a bug would (chaos tests; needs ``[control] chaos``)."""
        if not self.runtime.allow_crash_injection:
            raise CommandError("crash injection is off; set [control] chaos = true (tests and soaks only)")
        parent, row = self._locate(target, "crash")
        ref = parent.proxy().child_ref(row["id"]).get(timeout=ASK_TIMEOUT)
        if ref is None:
            raise CommandError(f"{row['path']} is not running")
        ref.tell(Crash(reason))
        return {"crashed": row["path"]}

    def shutdown(self) -> dict[str, Any]:
        """Stop the whole system (after this reply is sent)."""
        if self._on_shutdown is not None:
            self._on_shutdown()
        else:
            threading.Thread(target=self.stop, name="candlekeeper-shutdown", daemon=True).start()
        return {"stopping": True}

    def subscribe(self, subscriber: Any) -> None:
        """Receive each newly stored candle (`candlekeeper.actors.storage.StoredCandle`): a callable (called on
        the storage actor's thread, so keep it quick) or a pykka ActorRef (told)."""
        self.candles.subscribe(subscriber)

    def unsubscribe(self, subscriber: Any) -> None:
        self.candles.unsubscribe(subscriber)

    def _listed(self, exchange: str, symbol: str) -> bool | None:
        """Whether the exchange lists `symbol`; None when its markets are not loaded yet."""
        try:
            return self.exchange_addresses[exchange].proxy().lists(symbol).get(timeout=ASK_TIMEOUT)
        except (pykka.ActorDeadError, pykka.Timeout):
            return None


def check_port_free(listen: str) -> None:
    """Fail fast when the metrics port is taken: restarting the endpoint would not free it."""
    from candlekeeper.surfaces.control import SocketInUse, parse_host_port

    host, port = parse_host_port(listen)
    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise SocketInUse(f"[metrics] cannot listen on {listen}: {exc.strerror or exc}") from None


def stored_series_changes(path: str) -> list[tuple[str, str, str, int, bool]]:
    """The series added and removed at run time, from the database; opening it is also the
    start-up check that fails fast (`StorageUnusable`) when it cannot be opened or created. A
    corrupt file is no reason: the storage actor moves it aside and starts a fresh one."""
    try:
        with Store(path) as store:
            return store.list_series()
    except StoreGone as exc:  # corrupt, or replaced meanwhile: the storage actor recovers it
        log.warning("series_changes_unreadable", error=str(exc))
        return []
    except StoreError as exc:
        raise StorageUnusable(f"[storage] path: {exc}") from None


def _timeframe(timeframe: Any) -> int:
    try:
        return timeframe_ms(timeframe)
    except (ValueError, TypeError, KeyError):
        raise CommandError(f"unknown timeframe {timeframe!r}") from None


def start(config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None, **options: Any) -> System:
    """Start a candlekeeper system: `config` is a `Config`, a dict with the TOML's keys, or a path.

    `subscribers=[...]` receive every candle stored from the very start (see `System.subscribe`).
    """
    if config is None:
        cfg = config_mod.default()
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = config_mod.from_dict(config)
    else:
        cfg = config_mod.load(config)
    return System(cfg, **options).start()
