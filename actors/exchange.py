"""The exchange actor: owns the ccxt client, the rate-limit bucket and the circuit breaker.

Every request to an exchange goes through `ExchangeActor`, which admits it only when the
breaker allows (none while open, `breaker_half_open_calls` probes while half-open) and the
bucket has a token, then runs it on a small thread pool it owns. Its own mailbox never blocks
on the network, so `reset`, `stop` and status questions are answered at once, even while every
worker is stuck in a request timing out.

Series keep at most one request here; a resend from the same series replaces the queued one.
While the breaker is open, requests wait in that queue instead of failing, so the series do not
spin, and the moment a probe succeeds (or an operator resets the breaker) the queue drains at
the rate limit.

The breaker object is passed in by the tree builder and outlives this actor's incarnations: a
restart (of this actor or of a series) must not reset an open breaker, or restarts would bypass
it.
"""

from __future__ import annotations

import email.utils
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import ccxt
import pykka
import structlog

from ..resilience.breaker import CircuitBreaker
from ..resilience.bucket import TokenBucket
from ..resilience.retry import RetryConfig, parse_retry_after
from ..supervisors.child import Child
from ..supervisors.clock import wall_ms
from .market.candles import closed, timeframe_ms, validate
from .market.errors import BadResponse, classify, is_retryable
from .messages import ExchangeStatus, FetchRequest, FetchResult, Reset, SeriesKey
from .sources.ccxt_client import make_client

log = structlog.get_logger("candlekeeper.exchange")

# Fraction of rate_limit actually used: the margin absorbs timer and network jitter.
PACING = 0.97

# How far ahead of our clock a candle may be stamped before it counts as "in the future".
FUTURE_TOLERANCE_MS = 60_000


@dataclass(frozen=True)
class _Done:
    request: FetchRequest
    result: FetchResult
    duration: float


@dataclass(frozen=True)
class _MarketsDone:
    markets: dict[str, Any] | None
    error: BaseException | None
    duration: float
    state: dict[str, Any] | None = None  # the loading client's parsed market tables, see _client


# What ccxt's set_markets builds from the markets: each pool thread's client gets these tables
# by reference from the client that loaded them. set_markets per client would deep-copy every
# market again: with 1000 markets, 50 ms of CPU and 3.5 MB per client (8 per exchange). They are
# never mutated in place (a reload builds new ones), and requests only read them.
_MARKET_TABLES = ("markets", "markets_by_id", "symbols", "ids", "currencies", "currencies_by_id", "codes",
                  "baseCurrencies", "quoteCurrencies")


@dataclass(frozen=True)
class ExchangeSettings:
    """What the exchange actor needs, built from `[exchanges.NAME]` by `candlekeeper.app.settings`.

    `retry` paces market-list reloads after a failure (its `attempts` are unbounded there: a
    market list is needed, so it is retried until it comes)."""

    name: str  # the config's name for the exchange (`[exchanges.NAME]`)
    exchange: str  # ccxt id
    rate_limit: float = 10.0  # requests per second
    timeout: float = 10.0
    api_base: str | None = None
    retry: RetryConfig = RetryConfig()


class _Pump:
    pass


class _LoadMarkets:
    pass


_PUMP = _Pump()
_LOAD = _LoadMarkets()


class ExchangeActor(Child):
    def __init__(
        self, settings: ExchangeSettings, breaker: CircuitBreaker, status: Any = None, metrics: Any = None
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self._held_since: float | None = None  # since when the queue head waits for the rate limiter
        self.config = settings
        self.log = self.log.bind(exchange=settings.name)
        self.breaker = breaker
        self.status_to = status  # the status fan-out (health, notifier)
        self.bucket = self._new_bucket()
        self.concurrency = max(1, min(8, int(settings.rate_limit * settings.timeout)))
        self._queue: OrderedDict[SeriesKey, FetchRequest] = OrderedDict()
        self._in_flight = 0
        self._pump_timer: Any = None
        self._markets_retry_at = 0.0  # monotonic time before which markets are not reloaded
        self._markets: dict[str, Any] | None = None
        self._market_state: dict[str, Any] | None = None
        self._markets_version = 0
        self._loading = False
        self._load_attempt = 0
        self._load_retry = replace(settings.retry, attempts=10**9).policy(rng=self.runtime.rng, retryable=is_retryable)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._last_report: tuple[str, str] | None = None
        self.requests_sent = 0

    def _new_bucket(self) -> TokenBucket:
        """Requests paced evenly (burst 1) at PACING x rate_limit: an exchange counting requests in
        a sliding window then never sees rate + 1 in one window, whatever the network jitter."""
        return TokenBucket(rate=self.config.rate_limit * PACING, burst=1.0, clock=self.runtime.clock)

    # -- lifecycle -----------------------------------------------------------------------

    def on_start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"{self.path}/io")
        self.actor_ref.tell(_LOAD)
        self._report(force=True)

    def on_stop(self) -> None:
        # a graceful stop waits for requests in flight (at most one request timeout), so no
        # worker thread outlives the system
        self._shutdown_pool(wait=True)

    def on_failure(self, *_: Any) -> None:
        self._shutdown_pool(wait=False)  # a crash must not wait: its replacement starts now

    def _shutdown_pool(self, *, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FetchRequest):
            self._enqueue(message)
        elif message is _PUMP:
            self._pump_timer = None
            self._pump()
        elif isinstance(message, _Done):
            self._on_done(message)
        elif message is _LOAD:
            self._load_markets()
        elif isinstance(message, _MarketsDone):
            self._on_markets(message)
        elif isinstance(message, Reset):
            self.reset()
        else:
            return super().on_receive(message)
        return None

    # -- public API (asked through the proxy) --------------------------------------------

    def reset(self) -> dict[str, Any]:
        """Operator reset: close the breaker and lift any rate-limit penalty, then drain the queue."""
        self.breaker.reset()
        self.bucket = self._new_bucket()
        self._markets_retry_at = 0.0
        self._load_attempt = 0
        if self._pump_timer is not None:
            self._pump_timer.cancel()
            self._pump_timer = None
        self.log.info("exchange_reset")
        self._pump()
        self._report(force=True)
        return self.status()

    def lists(self, symbol: str) -> bool | None:
        """Whether the exchange lists `symbol`; None while its markets are not loaded."""
        return None if self._markets is None else symbol in self._markets

    def status(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "breaker": self.breaker.state,
            "status": self._status_word(),
            "markets_loaded": self._markets is not None,
            "queued": len(self._queue),
            "in_flight": self._in_flight,
            "requests_sent": self.requests_sent,
            "breaker_detail": self.breaker.snapshot(),
        }

    # -- admission -----------------------------------------------------------------------

    def _enqueue(self, req: FetchRequest) -> None:
        if self._markets is not None and req.key.symbol not in self._markets:
            req.reply_to.tell(
                FetchResult(req.req_id, error=ccxt.BadSymbol(f"{self.config.name} does not list {req.key.symbol}"))
            )
            return
        self._queue[req.key] = req
        if req.priority:
            self._queue.move_to_end(req.key, last=False)
        self._pump()

    def _admit(self) -> bool:
        """Take a bucket token and a breaker admission, or schedule the next try."""
        wait = self.bucket.time_until(1.0)
        if wait > 0:
            if self._held_since is None:
                self._held_since = self.runtime.clock()
            self._pump_later(wait)
            return False
        self._end_rate_limit_wait()
        if not self.breaker.allow():
            probe_in = self.breaker.time_until_probe()
            if probe_in is not None:
                self._pump_later(probe_in)
            self._report()
            return False
        granted = self.bucket.try_acquire(1.0)
        assert granted == 0.0, "bucket refused right after time_until said yes"
        self.requests_sent += 1
        return True

    def _pump(self) -> None:
        if self._pool is None:
            return
        if self._markets is None:
            wait = self._markets_retry_at - self.runtime.clock()
            if wait > 0:
                self._pump_later(wait)
            elif not self._loading:
                self._load_markets()
            return
        while self._queue and self._in_flight < self.concurrency:
            if not self._admit():
                break
            _, req = self._queue.popitem(last=False)
            self._in_flight += 1
            self._pool.submit(self._fetch, req)
        self._report()

    def _end_rate_limit_wait(self) -> None:
        if self._held_since is not None:
            if self.metrics is not None:
                self.metrics.rate_limit_wait.labels(self.config.name).inc(self.runtime.clock() - self._held_since)
            self._held_since = None

    def _pump_later(self, delay: float) -> None:
        self._pump_timer = self.schedule_soonest(self._pump_timer, delay, _PUMP)

    # -- markets -------------------------------------------------------------------------

    def _load_markets(self) -> None:
        if self._loading or self._pool is None or self._in_flight >= self.concurrency:
            return
        if not self._admit():
            return
        self._loading = True
        self._in_flight += 1
        self._pool.submit(self._fetch_markets)

    def _on_markets(self, done: _MarketsDone) -> None:
        self._loading = False
        self._in_flight -= 1
        if self.metrics is not None:
            self.metrics.request(self.config.name, done.error, done.duration)
        if done.error is None and done.markets is not None:
            self.breaker.record_success(done.duration)
            self._markets = done.markets
            self._market_state = done.state
            self._markets_version += 1
            self._load_attempt = 0
            self.log.info("markets_loaded", markets=len(done.markets))
            # requests for symbols the exchange does not list are answered now
            for key in [k for k in self._queue if k.symbol not in done.markets]:
                self._enqueue(self._queue.pop(key))
            self._pump()
        else:
            assert done.error is not None
            self._record_outcome(done.error, done.duration)
            self._load_attempt += 1
            decision = self._load_retry.decide(self._load_attempt, done.error)
            delay = getattr(decision, "delay", 60.0)
            self.log.warning("markets_failed", error=repr(done.error), retry_in=round(delay, 2))
            self._markets_retry_at = self.runtime.clock() + delay
            self._pump_later(delay)
        self._report()

    # -- results -------------------------------------------------------------------------

    def _on_done(self, done: _Done) -> None:
        self._in_flight -= 1
        error = done.result.error
        if self.metrics is not None:
            self.metrics.request(self.config.name, error, done.duration)
        if error is None:
            self.breaker.record_success(done.duration)
        else:
            self._record_outcome(error, done.duration, done.result.retry_after)
        try:
            done.request.reply_to.tell(done.result)
        except pykka.ActorDeadError:  # the series restarted meanwhile; it will ask again
            self.log.debug("reply_dropped", series=str(done.request.key))
        self._pump()

    def _record_outcome(self, error: BaseException, duration: float, retry_after: float | None = None) -> None:
        kind = classify(error)
        if kind.rate_limited:
            penalty = retry_after if retry_after is not None else 1.0
            self.bucket.penalize(penalty)
            self.log.warning("rate_limited", error=type(error).__name__, penalty=penalty)
        if kind.against_exchange:
            self.breaker.record_failure(duration)
        else:
            self.breaker.record_success(duration)

    # -- worker side (runs on the pool's threads, never touches actor state) -------------

    def _client(self) -> ccxt.Exchange:
        local = self._local
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = make_client(
                self.config.exchange, api_base=self.config.api_base, timeout=self.config.timeout
            )
            local.version = -1
        if self._markets is not None and local.version != self._markets_version:
            state = self._market_state
            if state is not None:
                for attr, value in state.items():
                    setattr(client, attr, value)
            else:
                client.set_markets(self._markets)
            local.version = self._markets_version
        return client

    def _fetch_markets(self) -> None:
        t0 = self.runtime.clock()
        try:
            client = self._client()
            markets = client.load_markets(reload=True)
            if not markets:  # ccxt parses a truncated exchangeInfo into {} without raising
                raise BadResponse("exchange listed no markets: truncated or garbled response")
            state = {attr: getattr(client, attr) for attr in _MARKET_TABLES if hasattr(client, attr)}
            result = _MarketsDone(dict(markets), None, self.runtime.clock() - t0, state)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the actor
            result = _MarketsDone(None, exc, self.runtime.clock() - t0)
        try:
            self.actor_ref.tell(result)
        except pykka.ActorDeadError:
            log.debug("markets_dropped_actor_stopped")

    def _fetch(self, req: FetchRequest) -> None:
        t0 = self.runtime.clock()
        client = None
        try:
            client = self._client()
            # ccxt keeps the last response's headers when a request gets no response (reset,
            # timeout): without this, a stale Retry-After (say a 418 ban's) would be applied to it
            client.last_response_headers = None
            tf_ms = timeframe_ms(req.key.timeframe)
            raw = client.fetch_ohlcv(req.key.symbol, req.key.timeframe, since=req.since, limit=req.limit)
            local_ms = wall_ms(self.runtime.wall)
            if not raw and req.since + tf_ms <= local_ms - FUTURE_TOLERANCE_MS:
                # An exchange answers `since` in the past with at least its in-progress candle;
                # ccxt turns a truncated JSON body into [] without raising, so [] is not "no news".
                raise BadResponse(f"empty page for since={req.since}: truncated or garbled response")
            candles = validate(raw, tf_ms, local_ms + FUTURE_TOLERANCE_MS)
            now_ms = _closed_clock_ms(client, local_ms)
            done = closed(candles, tf_ms, now_ms)
            horizon = (now_ms // tf_ms) * tf_ms  # open time of the first candle not surely closed
            result = FetchResult(req.req_id, candles=tuple(done), horizon_ms=horizon)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the actor
            retry_after = _retry_after(client, self.runtime.wall()) if isinstance(exc, ccxt.OperationFailed) else None
            result = FetchResult(req.req_id, error=exc, retry_after=retry_after)
        try:
            self.actor_ref.tell(_Done(req, result, self.runtime.clock() - t0))
        except pykka.ActorDeadError:
            log.debug("result_dropped_actor_stopped", series=str(req.key))

    # -- status --------------------------------------------------------------------------

    def _status_word(self) -> str:
        state = self.breaker.state
        if state == "open":
            return "down"
        if state == "half_open":
            return "recovering"
        if self._markets is None:
            return "starting"
        return "ok"

    def _report(self, *, force: bool = False) -> None:
        now = (self.breaker.state, self._status_word())
        if (now != self._last_report or force) and self.status_to is not None:
            if self._last_report is not None and now[0] != self._last_report[0]:
                self.log.warning("breaker_" + now[0], previous=self._last_report[0])
            self._last_report = now
            self.status_to.tell(
                ExchangeStatus(name=self.config.name, breaker=now[0], status=now[1], detail=self.breaker.snapshot())
            )


def _closed_clock_ms(client: ccxt.Exchange, local_ms: int) -> int:
    """The clock that decides whether a candle has closed: ours, but never ahead of the server's.

    The response's `Date` header is the server's time truncated to the second, so every candle
    whose close is at or before it is closed by the server's own clock, whatever our skew.
    """
    headers = getattr(client, "last_response_headers", None) or {}
    date = headers.get("Date") or headers.get("date")
    if date:
        try:
            server_ms = int(email.utils.parsedate_to_datetime(date).timestamp() * 1000)
            return min(local_ms, server_ms)
        except (TypeError, ValueError):
            pass
    return local_ms - 2000  # no server time: a documented 2 s skew margin


def _retry_after(client: ccxt.Exchange | None, now: float) -> float | None:
    headers = getattr(client, "last_response_headers", None) or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    return parse_retry_after(value, now) if value else None
