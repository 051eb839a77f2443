"""The candlekeeper tree, built from the config:

    root (one_for_one)
    ├── storage          StorageActor: the one database writer
    ├── health           HealthActor: latest status of everything
    ├── notifier         NotifierActor: alerts (log lines, Slack, PagerDuty)
    ├── metrics          MetricsEndpoint (only with [metrics] listen)
    ├── control          ControlServer, when the system runs with its control surface
    ├── NAME             Supervisor (rest_for_one), one per exchange
    │   ├── exchange     ExchangeActor: exchange client, rate-limit bucket, circuit breaker
    │   ├── stream       StreamActor: live candles over WebSocket (only when the exchange streams)
    │   └── series       Supervisor (one_for_one)
    │       └── SYMBOL@TF  SeriesActor, one per (symbol, timeframe)
    └── cluster          ClusterActor, only with [cluster] enabled: which series run here

Why these strategies: series are independent, so one crashing restarts only itself
(one_for_one). An exchange's series depend on its exchange actor, so a crash of the exchange
actor also restarts its series (rest_for_one): their requests in flight died with it, and they
resume cleanly from the store. The stream sits between them: series depend on it (they join it,
it stores their live candles), so its crash restarts them too and they join the new incarnation
(each resumes from the store and asks REST once); its own crash is rare, and a dropped connection
is not a crash (the stream reconnects by itself). The exchange's clock (`ServerClock`, measured by
the exchange actor, read by the stream to close candles) is created here and shared by both, as
is each stream's breaker. The breaker object is created here and handed to every
incarnation of the exchange actor, so no restart resets an open breaker. Storage, health and
control are independent of each other at the root (one_for_one): a storage restart changes the
store generation and every series re-reads its resume point; the health actor's knowledge
(`HealthState`) and the notifier's (`AlertState`) are owned here, and their addresses keep the
reports told while they restart (`REPORTS`, see `Address`), so their restarts lose nothing.

Clustering: the series supervisors start empty; the cluster actor, started last (so the
supervisors exist when it starts series) and stopped first, starts and stops the series whose
leases this node holds. Its state that must outlive its restarts lives here too: the fencing
tokens (`Fences`, which storage attaches to every write) and each series supervisor's list
of running specs (what a restarted series supervisor starts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..actors.alerting import AlertState
from ..actors.cluster import ClusterActor, new_incarnation
from ..actors.exchange import ExchangeActor
from ..actors.fencing import Fences
from ..actors.health import HealthActor, HealthState
from ..actors.market.closing import ServerClock
from ..actors.market.streamed import StreamLedger
from ..actors.messages import (
    ClusterStatus,
    ExchangeStatus,
    ForgetSeries,
    SeriesKey,
    SeriesStatus,
    StorageStatus,
    StreamStatus,
)
from ..actors.metrics import Metrics, MetricsEndpoint
from ..actors.notifier import NotifierActor
from ..actors.series import SeriesActor
from ..actors.sources.ccxt_source import MarketList
from ..actors.storage import StorageActor
from ..actors.stream import StreamActor
from ..resilience.breaker import CircuitBreaker
from ..supervisors.child import Address, Fanout, Runtime
from ..supervisors.events import EventBus, LifecycleEvent
from ..supervisors.supervisor import ChildSpec, Supervisor
from . import settings
from .config import Config, ExchangeConfig, parse_host_port

#: (exchange, symbol, timeframe, changed_at_ms, active): a series added or removed at run time.
SeriesChange = tuple[str, str, str, int, bool]


#: What health and the notifier are told by everyone else, which nobody tells again unless it
#: changes: held for them while they restart.
REPORTS: tuple[type, ...] = (SeriesStatus, ExchangeStatus, StreamStatus, StorageStatus, ClusterStatus, ForgetSeries,
                             LifecycleEvent)


def series_id(symbol: str, timeframe: str) -> str:
    return f"{symbol}@{timeframe}"


class Blueprint:
    """One system's tree, planned: its child specs, and what outlives restarts (addresses,
    breakers, the health and alert state, each exchange's list of wanted series)."""

    def __init__(self, config: Config, runtime: Runtime, *, metrics: Metrics, candles: EventBus) -> None:
        self.config = config
        self.runtime = runtime
        self.metrics = metrics
        self.candles = candles
        self.storage = Address("storage")
        self.health = Address("health", keep=REPORTS)
        self.notifier = Address("notifier", keep=REPORTS)
        # every actor's status reports go to health and to the alerts notifier
        self.status = Fanout(self.health, self.notifier)
        self.health_state = HealthState()
        self.alert_state = AlertState()
        self.exchanges: dict[str, Address] = {ex.name: Address(f"{ex.name}/exchange") for ex in config.exchanges}
        self.breakers: dict[str, CircuitBreaker] = {
            ex.name: CircuitBreaker(settings.breaker_config(ex.resilience), clock=runtime.clock, rng=runtime.rng)
            for ex in config.exchanges
        }
        self.server_clocks: dict[str, ServerClock] = {ex.name: ServerClock() for ex in config.exchanges}
        # the market list each exchange actor loads, shared with its stream's clients
        self.market_lists: dict[str, MarketList] = {ex.name: MarketList() for ex in config.exchanges}
        # the live stream of each exchange that streams, and its breaker (outlives its restarts)
        self.streams: dict[str, Address] = {
            ex.name: Address(f"{ex.name}/stream") for ex in config.exchanges if settings.streams(ex)
        }
        self.stream_breakers: dict[str, CircuitBreaker] = {
            name: CircuitBreaker(settings.stream_breaker_config(self._exchange(name).resilience), clock=runtime.clock,
                                 rng=runtime.rng)
            for name in self.streams
        }
        # what each stream took, read by its series before they ask REST (outlives restarts)
        self.stream_ledgers: dict[str, StreamLedger] = {name: StreamLedger() for name in self.streams}
        # The wanted series of each exchange. The list object is the series supervisor's own
        # child-spec list, so a restarted series supervisor starts from it: run-time additions
        # and removals survive restarts, not only the daemon's.
        self.series_specs: dict[str, list[ChildSpec]] = {}
        # Clustering: the series run here are the owned ones, not all wanted ones
        self.cluster_settings = settings.cluster_settings(config)
        self.clustered = self.cluster_settings is not None
        self.cluster = Address("cluster")
        self.incarnation = new_incarnation()
        self.fences: Fences | None = Fences() if self.clustered else None
        self.running: dict[str, list[ChildSpec]] = {ex.name: [] for ex in config.exchanges}
        self.series_sups: dict[str, Address] = {ex.name: Address(f"{ex.name}/series") for ex in config.exchanges}

    def _exchange(self, name: str) -> ExchangeConfig:
        ex = self.exchange_config(name)
        assert ex is not None
        return ex

    def exchange_config(self, name: str) -> ExchangeConfig | None:
        return next((ex for ex in self.config.exchanges if ex.name == name), None)

    def plan(self, changes: Iterable[SeriesChange]) -> None:
        """Configured series, plus those added and minus those removed at run time (persisted)."""
        changes = list(changes)
        for ex in self.config.exchanges:
            wanted = [(sym, tf) for sym in ex.symbols for tf in ex.ingest.timeframes]
            for exchange, sym, tf, _, active in changes:
                if exchange != ex.name:
                    continue
                if active and (sym, tf) not in wanted:
                    wanted.append((sym, tf))
                elif not active and (sym, tf) in wanted:
                    wanted.remove((sym, tf))
            self.series_specs[ex.name] = [self.series_spec(ex, sym, tf) for sym, tf in wanted]
            if not self.clustered:
                self.running[ex.name] = self.series_specs[ex.name]

    def configured_keys(self) -> list[SeriesKey]:
        """Every configured series (run-time changes not applied)."""
        return [SeriesKey(ex.name, sym, tf) for ex in self.config.exchanges for sym in ex.symbols
                for tf in ex.ingest.timeframes]

    def spec_of(self, key: SeriesKey) -> ChildSpec | None:
        """The child spec of a series, for the cluster actor; None for an unknown exchange."""
        ex = self.exchange_config(key.exchange)
        return None if ex is None else self.series_spec(ex, key.symbol, key.timeframe)

    def series_spec(self, ex: ExchangeConfig, symbol: str, timeframe: str) -> ChildSpec:
        configured = len(ex.symbols) * len(ex.ingest.timeframes)
        return ChildSpec(
            series_id(symbol, timeframe),
            SeriesActor,
            args=(SeriesKey(ex.name, symbol, timeframe), settings.series_settings(ex, configured)),
            kwargs={
                "exchange": self.exchanges[ex.name],
                "storage": self.storage,
                "health": self.health,
                "alerts": self.notifier,
                "metrics": self.metrics,
                "stream": self.streams.get(ex.name),
                "stream_ledger": self.stream_ledgers.get(ex.name),
            },
            kind="series",
            shutdown=10.0,
        )

    def exchange_spec(self, ex: ExchangeConfig) -> ChildSpec:
        exchange = ChildSpec(
            "exchange", ExchangeActor,
            args=(settings.exchange_settings(ex, self.market_lists[ex.name]), self.breakers[ex.name], self.status,
                  self.metrics),
            kwargs={"server_clock": self.server_clocks[ex.name]},
            address=self.exchanges[ex.name], kind="exchange", shutdown=ex.timeout + 5.0,
        )
        series = ChildSpec(
            "series", Supervisor, args=(self.running[ex.name],),
            kwargs={"strategy": "one_for_one", "start_timeout": 30.0}, kind="supervisor", shutdown=120.0,
            address=self.series_sups[ex.name],
        )
        children = [exchange, series]
        if ex.name in self.streams:
            stream = ChildSpec(
                "stream", StreamActor,
                args=(settings.stream_settings(ex, self.market_lists[ex.name]), self.stream_breakers[ex.name],
                      self.server_clocks[ex.name]),
                kwargs={"storage": self.storage, "health": self.health, "metrics": self.metrics,
                        "ledger": self.stream_ledgers[ex.name]},
                address=self.streams[ex.name], kind="stream", shutdown=ex.timeout + 5.0,
            )
            children.insert(1, stream)
        return ChildSpec(
            ex.name, Supervisor, args=(children,),
            kwargs={"strategy": "rest_for_one", "start_timeout": 60.0}, kind="supervisor", shutdown=180.0,
        )

    def root_specs(self, surfaces: Sequence[ChildSpec] = ()) -> list[ChildSpec]:
        """The root's children in start order; `surfaces` (the control server, say) start after the
        services and before the exchanges."""
        cfg = self.config
        specs = [
            ChildSpec("storage", StorageActor, args=(cfg.storage.location, self.status),
                      kwargs={"candles": self.candles, "metrics": self.metrics, "fences": self.fences,
                              "cluster": self.cluster if self.clustered else None,
                              "store_options": settings.store_options(cfg.storage, cfg.cluster)},
                      address=self.storage, kind="storage", shutdown=30.0),
            ChildSpec("health", HealthActor,
                      args=([e.name for e in cfg.exchanges], self.health_state, settings.health_settings(cfg)),
                      address=self.health, kind="health"),
            ChildSpec("notifier", NotifierActor, args=(settings.notifier_settings(cfg.alerts), self.alert_state),
                      address=self.notifier, kind="notifier", shutdown=10.0),
        ]
        if cfg.metrics.listen:
            host, port = parse_host_port(cfg.metrics.listen)
            specs.append(ChildSpec("metrics", MetricsEndpoint, args=(self.metrics, host, port), kind="metrics"))
        specs.extend(surfaces)
        specs.extend(self.exchange_spec(ex) for ex in cfg.exchanges)
        if self.cluster_settings is not None and self.fences is not None:
            specs.append(ChildSpec(
                "cluster", ClusterActor, args=(self.cluster_settings,),
                kwargs={"incarnation": self.incarnation, "configured": self.configured_keys(),
                        "spec_of": self.spec_of, "supervisors": self.series_sups, "running": self.running,
                        "fences": self.fences, "storage": self.storage, "health": self.health},
                address=self.cluster, kind="cluster", shutdown=60.0,
            ))
        return specs
