"""Prometheus metrics of one system, and the HTTP endpoint that serves them.

Each `System` has its own `Metrics` with its own `CollectorRegistry`, so two systems in one
process never share or clash over series. Actors only increment counters (a lock and an add:
nothing that can block a mailbox); states that the health actor already knows (breaker state,
series status, lag) are read from it at scrape time instead of being mirrored here, so the
endpoint and `ctl health` can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from ..supervisors.child import Child
from ..supervisors.clock import WallClock
from ..supervisors.clock import wall as wall_clock
from ..supervisors.events import LifecycleEvent
from .market.candles import timeframe_ms
from .market.errors import classify

BREAKER_STATES = ("closed", "half_open", "open")
SERIES_STATES = ("ok", "backfilling", "retrying", "lagging", "quarantined", "paused", "invalid", "stopped")


def outcome(error: BaseException | None) -> str:
    """The `outcome` label of a request: a small closed set, whatever the source raises."""
    return classify(error).outcome


class Metrics:
    """The counters actors increment, plus a collector for what the health actor knows."""

    def __init__(self, health: Callable[[], dict[str, Any]] | None = None, *, wall: WallClock = wall_clock) -> None:
        self.registry = CollectorRegistry()
        self._health = health
        r = self.registry
        self.requests = Counter(
            "candlekeeper_requests", "Requests sent to exchanges, by outcome.", ["exchange", "outcome"], registry=r
        )
        self.retries = Counter(
            "candlekeeper_retries", "Retries scheduled by series after a failed request.", ["exchange"], registry=r
        )
        self.restarts = Counter(
            "candlekeeper_restarts", "Actor restarts by supervisors, by kind of actor.", ["kind"], registry=r
        )
        self.crashes = Counter("candlekeeper_crashes", "Actor crashes, by kind of actor.", ["kind"], registry=r)
        self.candles_written = Counter(
            "candlekeeper_candles_written", "Closed candles handed to storage (re-fetched overlaps included).",
            ["exchange"], registry=r,
        )
        self.candles_stored = Counter(
            "candlekeeper_candles_stored", "Candles the store did not hold before (new or corrected rows).",
            registry=r,
        )
        self.refused_writes = Counter(
            "candlekeeper_refused_writes",
            "Candle writes refused because this node no longer holds the series' lease (clustering).", registry=r,
        )
        self.candles_corrected = Counter(
            "candlekeeper_candles_corrected",
            "Stored candles rewritten because a later answer had other values for the same candle.",
            registry=r,
        )
        self.rate_limit_wait = Counter(
            "candlekeeper_rate_limit_wait_seconds",
            "Time requests were queued and held back only by the rate limiter.", ["exchange"], registry=r,
        )
        self.stream_messages = Counter(
            "candlekeeper_stream_messages", "Kline messages received over exchanges' WebSocket streams.",
            ["exchange"], registry=r,
        )
        self.stream_reconnects = Counter(
            "candlekeeper_stream_reconnects", "Stream connections that dropped or stalled (each is reconnected).",
            ["exchange"], registry=r,
        )
        self.stream_fallbacks = Counter(
            "candlekeeper_stream_fallbacks",
            "REST requests a streamed series made instead of its stream, by reason (silent, missed, gap, down).",
            ["exchange", "reason"], registry=r,
        )
        self.close_to_store = Histogram(
            "candlekeeper_close_to_store_seconds", "Seconds from a live candle's close to its write, by source.",
            ["exchange", "source"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120), registry=r,
        )
        self.request_duration = Histogram(
            "candlekeeper_request_duration_seconds", "Duration of requests to exchanges.", ["exchange"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )
        if health is not None:
            r.register(_HealthCollector(health, wall))

    def request(self, exchange: str, error: BaseException | None, duration: float) -> None:
        self.requests.labels(exchange, outcome(error)).inc()
        self.request_duration.labels(exchange).observe(duration)

    def written(self, exchange: str, n: int) -> None:
        self.candles_written.labels(exchange).inc(n)

    def on_event(self, event: Any) -> None:
        """A lifecycle event subscriber (the runtime's event bus)."""
        if isinstance(event, LifecycleEvent):
            if event.kind == "crashed":
                self.crashes.labels(event.kind_of_actor).inc()
            elif event.kind == "restarted":
                self.restarts.labels(event.kind_of_actor).inc()


class _HealthCollector:
    """Breaker state, series states and lag, read from the health actor at scrape time."""

    def __init__(self, health: Callable[[], dict[str, Any]], wall: WallClock) -> None:
        self.health = health
        self.wall = wall

    def describe(self) -> Iterable[Metric]:
        return ()  # unknown label values until the first scrape; avoids asking health at registration

    def collect(self) -> Iterable[Metric]:
        report = self.health()
        breaker = GaugeMetricFamily(
            "candlekeeper_breaker_state", "Circuit breaker state per exchange (1 for the current state).",
            labels=["exchange", "state"],
        )
        for ex in report.get("exchanges", []):
            for state in BREAKER_STATES:
                breaker.add_metric([ex["name"], state], 1.0 if ex.get("breaker") == state else 0.0)
        yield breaker
        up = GaugeMetricFamily("candlekeeper_up", "1 when the health roll-up is ok, 0.5 degraded, 0 down.")
        up.add_metric([], {"ok": 1.0, "degraded": 0.5}.get(report.get("status", "down"), 0.0))
        yield up
        states = GaugeMetricFamily("candlekeeper_series", "Series by status.", labels=["exchange", "status"])
        counts: dict[tuple[str, str], int] = {}
        lag = GaugeMetricFamily(
            "candlekeeper_series_lag_seconds",
            "Seconds since the close of the newest stored candle of each series.",
            labels=["exchange", "symbol", "timeframe"],
        )
        now_ms = self.wall() * 1000
        for s in report.get("series", []):
            counts[(s["exchange"], s["status"])] = counts.get((s["exchange"], s["status"]), 0) + 1
            seconds = s.get("lag_seconds")  # the health actor's own judgement, when it gives one
            if seconds is None and s.get("last_ts") is not None:
                seconds = max(0.0, (now_ms - s["last_ts"] - timeframe_ms(s["timeframe"])) / 1000)
            if seconds is not None:
                lag.add_metric([s["exchange"], s["symbol"], s["timeframe"]], seconds)
        exchanges = {s["exchange"] for s in report.get("series", [])}
        for ex_name in sorted(exchanges):
            for status in SERIES_STATES:
                states.add_metric([ex_name, status], counts.get((ex_name, status), 0))
        yield states
        yield lag
        stream = GaugeMetricFamily(
            "candlekeeper_stream_up", "Each streaming exchange's stream: 1 up, 0.5 partly up or connecting, 0 down.",
            labels=["exchange"],
        )
        for ex in report.get("exchanges", []):
            st = (ex.get("stream") or {}).get("state")
            if st is not None and st != "off":
                stream.add_metric([ex["name"]], {"up": 1.0, "partial": 0.5, "connecting": 0.5}.get(st, 0.0))
        yield stream
        sources = GaugeMetricFamily("candlekeeper_series_source", "Series by how their candles arrive now.",
                                    labels=["exchange", "source"])
        by_source: dict[tuple[str, str], int] = {}
        for s in report.get("series", []):
            if s.get("source"):
                by_source[(s["exchange"], s["source"])] = by_source.get((s["exchange"], s["source"]), 0) + 1
        for (ex_name, source), n in sorted(by_source.items()):
            sources.add_metric([ex_name, source], n)
        yield sources


class MetricsServer:
    """prometheus-client's HTTP server on `host:port`, for one registry; `stop` joins its thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.server, self.thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port: int = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


class MetricsEndpoint(Child):
    """The supervised owner of the HTTP endpoint (`[metrics] listen`)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        super().__init__()
        self.metrics = metrics
        self.host = host
        self.port = port
        self.server: MetricsServer | None = None

    def on_start(self) -> None:
        self.server = MetricsServer(self.metrics, self.host, self.port)
        self.log.info("metrics_listening", host=self.host, port=self.server.port)

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *_: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.host, self.server.port
