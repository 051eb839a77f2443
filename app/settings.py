"""From the config to each actor's settings: the one place where config keys become behaviour.

A reader following a key goes config.py (what the user writes) -> here (what it means) -> the
actor's settings dataclass (what it uses). The `[resilience]` keys are translated here and only
here, into the resilience layer's own configs; no key silently drives another.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from ..actors.cluster import ClusterSettings
from ..actors.exchange import ExchangeSettings
from ..actors.health import HealthSettings, Pace
from ..actors.notifier import NotifierSettings
from ..actors.series import SeriesSettings
from ..actors.sources.base import Profile, Source
from ..actors.sources.ccxt_source import CcxtSource, MarketList
from ..actors.sources.ccxt_stream import pro_client, stream_profile, supports
from ..actors.sources.profiles import profile
from ..actors.stream import StreamSettings
from ..resilience.breaker import BreakerConfig
from ..resilience.quarantine import QuarantineConfig
from ..resilience.retry import RetryConfig
from ..supervisors.clock import WallClock
from .config import (
    AlertsConfig,
    ClusterConfig,
    Config,
    ExchangeConfig,
    ResilienceConfig,
    StorageConfig,
    ccxt_metadata,
)
from .errors import CredentialsMissing

#: A series asks for as many candles as the exchange serves; the exchange actor caps it.
ANY_PAGE = 1_000_000
#: A streamed series polls REST for a candle its stream has not delivered this long after the
#: close (the stream stores a candle within a second or two; its word to the series is paced).
STREAM_GRACE_S = 10.0
#: How often a streamed series re-reads over REST the candles stored since its last audit: one
#: request per series per 2 h, 1/120 of what polling 1m candles costs.
AUDIT_INTERVAL_S = 7200.0


def retry_config(r: ResilienceConfig) -> RetryConfig:
    return RetryConfig(attempts=r.retry_attempts, base_delay=r.retry_base_delay, max_delay=r.retry_max_delay)


def breaker_config(r: ResilienceConfig) -> BreakerConfig:
    return BreakerConfig(
        mode="rate" if r.breaker_mode == "rate" else "consecutive",
        failure_threshold=r.breaker_threshold,
        window_size=r.breaker_window,
        minimum_calls=r.breaker_minimum_calls,
        failure_rate_threshold=r.breaker_failure_rate,
        slow_call_duration=r.breaker_slow_call,
        recovery_timeout=r.breaker_recovery,
        # the longest open time, never shorter than the first one
        max_recovery_timeout=max(r.breaker_max_recovery, r.breaker_recovery),
        half_open_max_calls=r.breaker_half_open_calls,
    )


def stream_breaker_config(r: ResilienceConfig) -> BreakerConfig:
    """The stream's breaker: the exchange's failure rule, its own open times. A stream that is
    down costs no candle (its series poll REST meanwhile) and a connection attempt costs no
    request budget, so it probes sooner than REST does: a WebSocket outage of 30 s must not
    keep every series on REST for another minute or more after the exchange is back."""
    return replace(breaker_config(r), recovery_timeout=r.stream_recovery,
                   max_recovery_timeout=max(r.stream_max_recovery, r.stream_recovery))


def quarantine_config(r: ResilienceConfig) -> QuarantineConfig:
    return QuarantineConfig(
        threshold=r.quarantine_after,
        probe_interval=r.quarantine_probe,
        max_probe_interval=max(r.quarantine_probe, QuarantineConfig.max_probe_interval),
    )


def _ccxt_source(ex: ExchangeConfig, wall: WallClock, markets: MarketList | None = None) -> Source:
    return CcxtSource(ex.exchange, symbols=list(ex.symbols), timeout=ex.timeout, wall=wall, api_base=ex.api_base,
                      shared=markets)


def _oanda_source(ex: ExchangeConfig, wall: WallClock) -> Source:
    from ..actors.sources.oanda import OandaSettings, OandaSource

    return OandaSource(OandaSettings(token_env=ex.token_env, environment=ex.environment, api_base=ex.api_base,
                                     price=ex.price, timeout=ex.timeout, account_id=ex.account_id))


#: `[exchanges.NAME] source` -> what builds that exchange's client (a third kind of source adds a line)
SOURCES = {"ccxt": _ccxt_source, "oanda": _oanda_source}


def exchange_settings(ex: ExchangeConfig, markets: MarketList | None = None) -> ExchangeSettings:
    """`markets`: where a ccxt source shares the market list it loads with the exchange's stream."""
    source = (functools.partial(_ccxt_source, ex, markets=markets) if ex.source == "ccxt" and markets is not None
              else functools.partial(SOURCES[ex.source], ex))
    return ExchangeSettings(
        name=ex.name,
        source=source,
        rate_limit=ex.rate_limit,
        timeout=ex.timeout,
        page_limit=ex.page_limit,
        heartbeat=ex.heartbeat,
        markets_refresh=ex.markets_refresh,
        retry=retry_config(ex.resilience),
    )


@functools.lru_cache(maxsize=64)
def source_profile(source: str, exchange_id: str) -> Profile:
    """What the exchange actor's source will say of itself (`Source.profile`), known from the config:
    for ccxt, its metadata corrected by `KNOWN`; for OANDA, its own."""
    if source == "oanda":
        from ..actors.sources.oanda import PROFILE

        return PROFILE
    return profile(exchange_id, ccxt_metadata(exchange_id))


def requests_per_second(ex: ExchangeConfig) -> float:
    """How many candle requests a second the exchange allows: `rate_limit` when configured, else
    its own budget over the cost of one candle request (its source's profile)."""
    if ex.rate_limit is not None:
        return ex.rate_limit
    p = source_profile(ex.source, ex.exchange)
    return p.rate / p.cost("ohlcv")


def check_credentials(cfg: Config) -> None:
    """Credentials the config names but the environment lacks: a start-up error (exit 2), one line
    naming the variable, never its value."""
    from ..actors.sources.oanda import token_problem

    for ex in cfg.exchanges:
        if ex.source == "oanda":
            problem = token_problem(ex.token_env)
            if problem is not None:
                raise CredentialsMissing(f"[exchanges.{ex.name}] token_env: {problem};"
                                         " it must hold the OANDA API token")


@functools.lru_cache(maxsize=64)
def _can_stream(exchange_id: str) -> bool:
    return supports(exchange_id)


def streams(ex: ExchangeConfig) -> bool:
    """Whether the exchange's caught-up series get their candles over WebSocket (`live`):
    "websocket" yes, "rest" no; "auto" yes where the daemon can stream the exchange, unless
    `api_base` sends REST elsewhere (a proxy, a test server) with no `ws_url` beside it, since
    its streams would then go to the real exchange. Only ccxt's exchanges stream (not OANDA)."""
    if ex.live == "rest" or ex.source != "ccxt":
        return False
    if ex.live == "websocket":
        return True
    if ex.api_base is not None and ex.ws_url is None:
        return False
    return _can_stream(ex.exchange)


def _stream_client(ex: ExchangeConfig, wall: WallClock, symbols: list[str]) -> Any:
    return pro_client(ex.exchange, symbols=symbols, timeout=ex.timeout, wall=wall, api_base=ex.api_base,
                      ws_url=ex.ws_url)


def stream_settings(ex: ExchangeConfig, markets: MarketList | None = None) -> StreamSettings:
    """`markets`: the exchange actor's market list (its stream clients never load their own)."""
    return StreamSettings(
        name=ex.name,
        client=functools.partial(_stream_client, ex),
        profile=stream_profile(ex.exchange),
        timeout=ex.timeout,
        retry=retry_config(ex.resilience),
        max_reconnect=max(ex.resilience.stream_max_recovery, ex.resilience.stream_recovery),
        markets=markets.get if markets is not None else None,
    )


def series_settings(ex: ExchangeConfig, series_count: int) -> SeriesSettings:
    """`series_count`: how many series the exchange serves, over which polls are spread."""
    per_second = requests_per_second(ex)
    return SeriesSettings(
        lookback=ex.ingest.lookback,
        since_ms=ex.ingest.since_ms,
        poll_interval=ex.ingest.poll_interval,
        page_limit=ex.page_limit or ANY_PAGE,
        request_timeout=ex.timeout,
        poll_spread=min(ex.ingest.poll_interval, series_count / per_second),
        retry=retry_config(ex.resilience),
        quarantine=quarantine_config(ex.resilience),
        invalid_recheck=ex.markets_refresh,
        stream_grace=STREAM_GRACE_S,
        audit_interval=AUDIT_INTERVAL_S,
    )


def health_settings(cfg: Config) -> HealthSettings:
    """How soon each exchange's series should store each candle: from its poll_interval, the
    candle requests a second it allows over its configured series, and its request timeout
    (see `Pace`); and, when clustering, the node that owns the series here."""
    return HealthSettings(node=cfg.cluster.node if cfg.cluster.enabled else None, pace={
        ex.name: Pace.of(poll_interval=ex.ingest.poll_interval,
                         rate_limit=requests_per_second(ex),
                         series=len(ex.symbols) * len(ex.ingest.timeframes), timeout=ex.timeout)
        for ex in cfg.exchanges
    })


def notifier_settings(alerts: AlertsConfig) -> NotifierSettings:
    if alerts.pagerduty_url is None:
        return NotifierSettings(alerts.slack_webhook, alerts.pagerduty_routing_key)
    return NotifierSettings(alerts.slack_webhook, alerts.pagerduty_routing_key, alerts.pagerduty_url)


def store_options(storage: StorageConfig, cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """What the PostgreSQL store is opened with (nothing for SQLite). Clustering: a session
    frozen inside a transaction is ended by the server within a third of a lease, so the locks
    it holds never delay another node's failover. Without it a writing store holds the
    database's lock: one daemon per database, as with a SQLite file."""
    if not storage.url:
        return {}
    options: dict[str, Any] = {"timescale": storage.timescale}
    if cluster is not None and cluster.enabled:
        options["idle_in_transaction_s"] = max(1.0, cluster.lease / 3)
    else:
        options["exclusive"] = True  # one daemon per database (stores.postgres_lock)
    return options


def rate_budget(cfg: Config) -> float:
    """This node's weight in the cluster's placement: `[cluster] rate_budget`, else the candle
    requests a second its exchanges allow, summed (what it can fetch: its fair share)."""
    if cfg.cluster.rate_budget is not None:
        return cfg.cluster.rate_budget
    return sum(requests_per_second(ex) for ex in cfg.exchanges) or 1.0


def cluster_settings(cfg: Config) -> ClusterSettings | None:
    """The cluster actor's settings, or None when clustering is off."""
    if not cfg.cluster.enabled or not cfg.storage.url:
        return None
    return ClusterSettings(url=cfg.storage.url, node=cfg.cluster.node, lease=cfg.cluster.lease,
                           rate_budget=rate_budget(cfg), store_options=store_options(cfg.storage, cfg.cluster))
