"""The exchange actor: owns one exchange's source of candles, its rate governor and its breaker.

Every request to an exchange goes through its `ExchangeActor`, which admits it only when the
breaker allows (none while open, `breaker_half_open_calls` probes while half-open) and the rate
governor has budget, then runs it on the asyncio loop thread it owns (`sources.loop.LoopThread`),
under a whole-request deadline. Its own mailbox never waits on the network, so `reset`, `stop`
and status questions are answered at once, and a stop ends every request in flight.

Series keep at most one request here (a resend from the same series replaces the queued one, and
never runs beside its first copy). While the breaker is open, requests wait in the queue instead
of failing, so the series do not spin; the moment a probe succeeds (or an operator resets the
breaker) the queue drains at the rate budget.

Between a series' requests the actor keeps the exchange under watch: a heartbeat (the exchange's
cheapest request, its server time where it has one) every `heartbeat` seconds when nothing else
was sent, feeding the same breaker, so an exchange that goes down is noticed between candles and
so is its recovery; and the exchange's clock, measured from its answers, decides which candles
are closed. The market list is refreshed on a schedule and when a series asks for a symbol it
does not know, so a new listing is picked up within minutes.

Whether the exchange is back is asked of the exchange itself: a half-open breaker's probe is the
heartbeat, not a series' request, and a series that keeps failing while the exchange answers
everything else (its symbol's answers trickle past the deadline, say) fails on its own: its
failures stop counting against the breaker once a heartbeat has shown the exchange answering.
With heartbeats off (`heartbeat = "off"`) none of these is sent: probes are series' requests.

The breaker object is passed in by the tree builder and outlives this actor's incarnations: a
restart (of this actor or of a series) must not reset an open breaker.

Credentials the exchange refuses (an OANDA token it answers 401 or 403 to) are a configuration
problem, not a transient one: asking again gets the same answer. When a market load or a
heartbeat is refused so, the actor stops asking (`_credentials_refused`): its status is `invalid` with the
reason, every candle request is answered with that error at once (its series turn `invalid`),
and the credentials are re-checked with one market load after `AUTH_RECHECK_S`, doubling up to
an hour, or at once on an operator `reset`; when they work again, every series that was refused
is told to try again at once (`Reset`), rather than at its next re-check. A candle request
refused so first has the credentials checked with one market load before any other is sent: a
symbol the token may not read is that series' problem, a token the exchange refuses is everyone's.
"""

from __future__ import annotations

import concurrent.futures
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import ccxt
import pykka

from ..resilience.breaker import CircuitBreaker
from ..resilience.governor import RateGovernor
from ..resilience.retry import RetryConfig
from ..supervisors.child import Child
from ..supervisors.clock import WallClock
from .market.candles import timeframe_ms
from .market.closing import ServerClock, close_rows
from .market.errors import EmptyAnswer, ListedSymbolRefused, classify, describe
from .market.paging import served, window_end
from .messages import ExchangeStatus, FetchRequest, FetchResult, Reset, SeriesKey
from .sources.base import Answer, MarketInfo, Source, SourceFailure
from .sources.loop import LoopThread

SourceFactory = Callable[[WallClock], Source]

MIN_REFRESH_S = 60.0  # an unknown symbol triggers a market refresh at most this often
AUTH_RECHECK_S = (300.0, 3600.0)  # refused credentials: re-checked after 5 min, doubling up to 1 h
# a symbol the market list has but the exchange refuses (BadSymbol) triggers a refresh at most this often
REFUSED_REFRESH_S = 10.0
# A series failing on its own (its answers trickle) is told from the exchange failing by asking
# the exchange itself; its failures count against the breaker again after this long at least.
ISOLATION_S = 10.0
MAIN, RECENT = "main", "recent"  # the exchange's budget; the one of its recent-candles endpoint (OKX)


@dataclass(frozen=True)
class ExchangeSettings:
    """What the exchange actor needs, built from `[exchanges.NAME]` by `candlekeeper.app.settings`.

    `source` builds the exchange's client (`CcxtSource`, `OandaSource`...) given the wall clock.
    `rate_limit`, when set, replaces the exchange's own budget: that many requests a second, each
    costing one (the exchange's own counts, where it reports them, still hold requests back).
    `retry` paces market-list reloads after a failure (unbounded attempts there)."""

    name: str  # the config's name for the exchange (`[exchanges.NAME]`)
    source: SourceFactory
    rate_limit: float | None = None
    timeout: float = 10.0
    page_limit: int | None = None  # candles per request; None: the exchange's own maximum
    heartbeat: float = 30.0
    markets_refresh: float = 300.0
    retry: RetryConfig = RetryConfig()


@dataclass(frozen=True)
class _Done:
    kind: str  # "ohlcv", "markets", "heartbeat"
    request: FetchRequest | None
    result: Any
    error: BaseException | None
    retry_after: float | None
    answer: Answer
    sent_at: float  # local monotonic
    sent_wall: float
    duration: float
    charged: float = 0.0  # units of the exchange's budget charged when it was sent
    lane: str = MAIN  # which of the exchange's budgets it was charged to
    ticket: int = 0  # its place in that budget's log (`RateGovernor.take`)


class _Pump:
    pass


class _Load:
    pass


class _Beat:
    pass


_PUMP, _LOAD, _BEAT = _Pump(), _Load(), _Beat()


class ExchangeActor(Child):
    def __init__(
        self, settings: ExchangeSettings, breaker: CircuitBreaker, status: Any = None, metrics: Any = None,
        server_clock: ServerClock | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.log = self.log.bind(exchange=settings.name)
        self.breaker = breaker
        self.status_to = status  # the status fan-out (health, notifier)
        self.metrics = metrics
        # the exchange's clock as measured here; shared with the stream actor, which closes
        # streamed candles by it (and, like the breaker, it outlives this incarnation)
        self.clock = server_clock if server_clock is not None else ServerClock()
        self.source: Source | None = None
        self.loop: LoopThread | None = None
        self.governor: RateGovernor | None = None  # the exchange's budget (MAIN)
        # every budget of the exchange's, by lane: MAIN alone, or one per endpoint (OKX)
        self._lanes: dict[str, RateGovernor] = {}
        self._queue: OrderedDict[SeriesKey, FetchRequest] = OrderedDict()
        self._in_flight: set[SeriesKey] = set()
        self._busy = 0  # requests of any kind in flight
        self.concurrency = 1
        self._pump_timer: Any = None
        self._beat_timer: Any = None
        self._markets: dict[str, MarketInfo] | None = None
        self._loading = False
        self._load_attempt = 0
        self._markets_retry_at = 0.0
        self._last_load = -1e18  # monotonic time of the last market load that completed
        self._refresh_due = False
        # a market list is needed whatever went wrong: reloads back off, never give up
        self._load_retry = replace(settings.retry, attempts=10**9).policy(rng=self.runtime.rng)
        self._last_sent = 0.0
        self._held_since: float | None = None
        self._last_report: tuple[Any, ...] | None = None
        self.requests_sent = 0
        # credentials refused (see the module docstring): the error, and how many checks failed
        self._refused: BaseException | None = None
        self._refused_checks = 0
        self._verify = False  # a candle request was refused for its credentials: check them first
        self._refused_series: dict[SeriesKey, Any] = {}  # told to try again when the credentials work
        # one series failing alone: when each series' run of failures began, when the exchange
        # last answered anything, and whether a heartbeat should ask it now
        self._streaks: dict[SeriesKey, float] = {}
        self._answered: set[SeriesKey] = set()  # series the exchange has answered at least once
        self._answered_failing = 0  # how many of those are failing now (have a streak)
        self._last_ok = float("-inf")
        self._ask_due = False
        self._beating = False
        self._measuring = False  # candle requests wait for the first heartbeat (the exchange's clock)
        # operators waiting to know whether a symbol is listed, answered by the next market load
        self._listing_waiters: list[tuple[str, concurrent.futures.Future[bool | None]]] = []
        self._costs: dict[tuple[str, str], float] = {}  # (kind, lane): its cost, as the last answer said
        self._admitted: tuple[str, float, int] = (MAIN, 1.0, 0)  # lane, cost, ticket of the one just admitted
        self._rate_held = False  # why `_admit` said no: the rate budget (else the breaker)
        self._in_flight_cost = 0.0  # budget units of the requests sent and not answered yet
        self._held_window: float | None = None  # the exchange's window a hold was logged for

    # -- lifecycle -----------------------------------------------------------------------

    def on_start(self) -> None:
        self.source = self.settings.source(self.runtime.wall)
        profile = self.source.profile
        self._costs = {(kind, MAIN): cost for kind, cost in profile.costs.items()}
        self._new_lanes()
        per_request = self._lanes[MAIN].rate / self._pace_cost("ohlcv")
        self.concurrency = max(1, min(16, int(per_request * self.settings.timeout)))
        self.loop = LoopThread(f"{self.path}/io")
        self._last_sent = self.runtime.clock()
        self.actor_ref.tell(_LOAD)
        self._report(force=True)

    def on_stop(self) -> None:
        self._close_loop()
        self._answer_listing_waiters(None)

    def on_failure(self, *_: Any) -> None:
        self._close_loop()
        self._answer_listing_waiters(None)

    def _close_loop(self) -> None:
        loop, source = self.loop, self.source
        self.loop = None
        if loop is not None:
            loop.stop(source.close if source is not None else None, timeout=min(5.0, self.settings.timeout))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FetchRequest):
            self._enqueue(message)
        elif message is _PUMP:
            self._pump_timer = None
            self._pump()
        elif isinstance(message, _Done):
            self._on_done(message)
        elif message is _LOAD:
            self._refresh_due = True
            self._pump()
        elif message is _BEAT:
            self._beat_timer = None
            self._heartbeat()
        elif isinstance(message, Reset):
            self.reset()
        else:
            return super().on_receive(message)
        return None

    # -- public API (asked through the proxy) --------------------------------------------

    def reset(self) -> dict[str, Any]:
        """Operator reset: close the breaker and lift any rate-limit hold, then drain the queue."""
        self.breaker.reset()
        if self.governor is not None:
            self._new_lanes()
        self._markets_retry_at = 0.0
        self._load_attempt = 0
        if self._refused is not None:
            self._refused_checks = 0
            self._refresh_due = True  # check the credentials now (`invalid` until they work)
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

    def listing(self, symbol: str) -> concurrent.futures.Future[bool | None]:
        """Whether the exchange lists `symbol`, for an operator (`add`): a symbol the market list
        does not have is looked up in a fresh list (the load in flight, or one started now), so
        a new listing is accepted at once. None: the markets cannot be loaded right now."""
        answer: concurrent.futures.Future[bool | None] = concurrent.futures.Future()
        if self._markets is None or symbol in self._markets:
            answer.set_result(self.lists(symbol))
        else:
            self._listing_waiters.append((symbol, answer))
            self._refresh_due = True
            self._pump()
        return answer

    def _answer_listing_waiters(self, markets: dict[str, MarketInfo] | None) -> None:
        waiters, self._listing_waiters = self._listing_waiters, []
        for symbol, answer in waiters:
            if not answer.done():
                answer.set_result(None if markets is None else symbol in markets)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.settings.name,
            "breaker": self.breaker.state,
            "status": self._status_word(),
            "markets_loaded": self._markets is not None,
            "queued": len(self._queue),
            "in_flight": self._busy,
            "requests_sent": self.requests_sent,
            "clock_offset_ms": self.clock.offset_ms,
            "rate_held_s": round(max((g.held_for for g in self._governors()), default=0.0), 3),
            "breaker_detail": self.breaker.snapshot(),
            "detail": self._refused_reason(),
        }

    # -- admission -----------------------------------------------------------------------

    def _new_governor(self) -> RateGovernor:
        """Paced at the configured `rate_limit` (requests a second, in a one-second window), else
        at the exchange's own budget, in the window it counts in."""
        assert self.source is not None
        if self.settings.rate_limit is not None:
            return RateGovernor(self.settings.rate_limit, clock=self.runtime.clock, window_s=1.0)
        profile = self.source.profile
        return RateGovernor(profile.rate, clock=self.runtime.clock, window_s=profile.window_s)

    def _new_lanes(self) -> None:
        """One budget for the exchange, or (its limits per endpoint, as OKX's) one per endpoint:
        candles (MAIN), recent candles, market lists, heartbeats."""
        assert self.source is not None
        per_endpoint = self.settings.rate_limit is None and self.source.profile.per_endpoint
        lanes = (MAIN, RECENT, "markets", "heartbeat") if per_endpoint else (MAIN,)
        self._lanes = {lane: self._new_governor() for lane in lanes}
        self.governor = self._lanes[MAIN]

    def _governors(self) -> list[RateGovernor]:
        return list(self._lanes.values())

    def _lane(self, kind: str, req: FetchRequest | None) -> str:
        """Which budget a request is charged to: the exchange's only one, or its endpoint's. OKX
        serves candles of the last `recent_bars` bars from another endpoint than older ones (ccxt
        picks it by the same rule, on the same clock)."""
        if len(self._lanes) == 1:
            return MAIN
        if kind != "ohlcv":
            return kind if kind in self._lanes else MAIN
        bars = self.source.profile.recent_bars if self.source is not None else None
        if not bars or req is None:
            return MAIN
        border = self.runtime.wall() * 1000 - bars * timeframe_ms(req.key.timeframe)
        return RECENT if req.since >= border else MAIN

    def _cost(self, kind: str, lane: str = MAIN) -> float:
        """What a request of `kind` costs in the exchange's own budget: what the last answer to
        one said (ccxt's charge for the endpoint it used, in the exchange's unit), else the
        profile's first guess."""
        cost = self._costs.get((kind, lane)) or self._costs.get((kind, MAIN))
        if cost is not None:
            return cost
        return self.source.profile.cost(kind) if self.source is not None else 1.0

    def _pace_cost(self, kind: str, lane: str = MAIN) -> float:
        """What a request costs of the pace: one with a configured `rate_limit`, else its cost."""
        return 1.0 if self.settings.rate_limit is not None else self._cost(kind, lane)

    def _enqueue(self, req: FetchRequest) -> None:
        markets = self._markets
        if markets is not None and req.key.symbol not in markets and not self._waiting_for_listing(req.key.symbol):
            # an operator's request (`reset` of an invalid series) looks again at once: one load
            # at a time, whoever asks, paced by the rate budget like any request
            if req.priority or self._loading or self.runtime.clock() - self._last_load >= MIN_REFRESH_S:
                self._refresh_due = True  # a new listing, perhaps: look before saying no
            else:
                self._refuse(req, f"{self.settings.name} does not list {req.key.symbol}")
                return
        self._queue[req.key] = req
        if req.priority:
            self._queue.move_to_end(req.key, last=False)
        self._pump()

    def _refuse(self, req: FetchRequest, why: str) -> None:
        try:
            req.reply_to.tell(FetchResult(req.req_id, error=ccxt.BadSymbol(why)))
        except pykka.ActorDeadError:
            self.log.debug("reply_dropped", series=str(req.key))

    def _admit(self, kind: str, req: FetchRequest | None = None) -> bool:
        """Take budget and a breaker admission for one request, or schedule the next try."""
        lane = self._lane(kind, req)
        governor = self._lanes[lane]
        cost = self._cost(kind, lane)
        wait = governor.time_until(cost)
        self._rate_held = wait > 0
        if wait > 0:
            if self._held_since is None:
                self._held_since = self.runtime.clock()
            self._log_exchange_hold(governor, cost)
            self._pump_later(wait)
            return False
        self._end_rate_limit_wait()
        if not self.breaker.allow():
            probe_in = self.breaker.time_until_probe()
            if probe_in is not None:
                self._pump_later(probe_in)
            self._report()
            return False
        ticket = governor.take(self._pace_cost(kind, lane), counted=cost)
        self._admitted = (lane, cost, ticket)
        self.requests_sent += 1
        self._last_sent = self.runtime.clock()
        return True

    def _log_exchange_hold(self, governor: RateGovernor, cost: float) -> None:
        """Say once per window of the exchange's that its own count (other clients on this
        address included) holds requests until the window resets."""
        hold = governor.exchange_hold(cost)
        if hold <= 0:
            return
        window = round(self.runtime.clock() + hold)
        if window != self._held_window:
            self._held_window = window
            self.log.info("rate_budget_held", hold_s=round(hold, 2), in_flight=round(self._in_flight_cost, 2),
                          **governor.view())

    def _pump(self) -> None:
        if self.loop is None:
            return
        if self._refused is not None:
            self._refuse_queued()
            if self._refresh_due:
                self._load_markets()  # the re-check, when it is due
            self._report()
            return
        if self._refresh_due or self._markets is None:
            self._load_markets()
            if self._markets is None:
                self._report()  # a market load may have been the half-open breaker's probe
                return
        if self._verify:
            return  # the market load under way says whether the credentials still work
        if self.settings.heartbeat > 0 and (self.breaker.state == "half_open" or self._ask_due):
            self._ask_exchange()
        if self._measuring:
            self._report()
            return
        held: set[str] = set()  # budgets with nothing left for now (OKX: two, one per endpoint)
        # the queue is walked only as far as requests can go (it holds every waiting series: a
        # copy of it at each pump cost a hash of each key, most of the exchange actor's time at
        # 1,000 series); what leaves it is removed after the walk
        gone: list[SeriesKey] = []
        for key, req in self._queue.items():
            if self._busy >= self.concurrency:
                break
            if key in self._in_flight:
                continue  # its first copy is still out: one request per series at a time
            if self._markets is not None and key.symbol not in self._markets:
                if self._loading or self._refresh_due or self._waiting_for_listing(key.symbol):
                    continue  # the (re)load will tell
                gone.append(key)
                self._refuse(req, f"{self.settings.name} does not list {key.symbol}")
                continue
            lane = self._lane("ohlcv", req)
            if lane in held:
                continue
            if not self._admit("ohlcv", req):
                held.add(lane)
                if not self._rate_held or len(held) == len(self._lanes):
                    break  # the breaker, or every budget: nothing else goes either
                continue
            gone.append(key)
            self._in_flight.add(key)
            self._submit("ohlcv", self._fetch(req), req)
        for key in gone:
            del self._queue[key]
        self._schedule_heartbeat()
        self._report()

    def _waiting_for_listing(self, symbol: str) -> bool:
        """Its market type's listing failed: reload it (paced by the retry policy) and wait."""
        if self.source is None or not self.source.pending(symbol):
            return False
        self._refresh_due = True
        return True

    def _end_rate_limit_wait(self) -> None:
        if self._held_since is not None:
            if self.metrics is not None:
                self.metrics.rate_limit_wait.labels(self.settings.name).inc(self.runtime.clock() - self._held_since)
            self._held_since = None

    def _pump_later(self, delay: float) -> None:
        self._pump_timer = self.schedule_soonest(self._pump_timer, delay, _PUMP)

    # -- running requests ----------------------------------------------------------------

    def _submit(self, kind: str, coro: Coroutine[Any, Any, Any], req: FetchRequest | None) -> None:
        assert self.loop is not None
        self._busy += 1
        if kind == "heartbeat":
            self._beating = True
        lane, charged, ticket = self._admitted  # what `_admit` just charged for it, and to which budget
        self._in_flight_cost += charged
        sent_at, sent_wall = self.runtime.clock(), self.runtime.wall()
        future = self.loop.submit(coro)
        ref, clock = self.actor_ref, self.runtime.clock

        def done(f: concurrent.futures.Future[Any]) -> None:
            error: BaseException | None = None
            retry_after: float | None = None
            answer = Answer()
            result: Any = None
            try:
                result, answer = f.result()
            except SourceFailure as failure:
                error, retry_after, answer = failure.error, failure.retry_after, failure.answer
            except concurrent.futures.CancelledError:
                error = ccxt.RequestTimeout("cancelled: the exchange actor stopped")
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the actor
                error = exc
            try:
                ref.tell(_Done(kind, req, result, error, retry_after, answer, sent_at, sent_wall, clock() - sent_at,
                               charged, lane, ticket))
            except pykka.ActorDeadError:
                pass  # stopped meanwhile: the series ask the next incarnation

        future.add_done_callback(done)

    async def _fetch(self, req: FetchRequest) -> tuple[FetchResult, Answer]:
        """One page, validated, closed by the exchange's clock, with what it proves (runs on the loop)."""
        assert self.source is not None
        source, key = self.source, req.key
        tf = timeframe_ms(key.timeframe)
        profile = source.profile
        limit = min(req.limit, self.settings.page_limit or profile.page_limit)
        until = window_end(profile, req.since, limit, tf, req.until)
        if until is not None:
            limit = max(1, min(limit, -(-(until - req.since) // tf)))
        # Closed by the exchange's clock when the request went out: the page was made after that,
        # but maybe long before it arrived (a slow or trickling answer across a close would
        # otherwise pass the candle in progress in it as closed)
        asked_ms = int(self.runtime.wall() * 1000)
        page = await source.fetch_ohlcv(key.symbol, key.timeframe, req.since, limit, until)
        rows, skipped = _leave_out(page.rows, req.skip)
        closed = close_rows(rows, tf, self.clock.now_ms(asked_ms), margin_ms=self.clock.margin_ms())
        # rows left out were served all the same: what the answer proves counts them
        opens = sorted(ts for ts in [*closed.opens, *skipped] if ts >= req.since)
        if not opens and profile.paging == "cursor" and req.since + tf + profile.settle_ms <= closed.horizon_ms:
            # "the first candles from `since`" cannot be none at all for a listed market
            raise SourceFailure(EmptyAnswer(f"no candles at all from {req.since} on (a glitch, a trading halt?)"),
                                answer=page.answer)
        cover = served(profile, since=req.since, limit=limit, until=until, opens=opens, tf_ms=tf,
                       horizon_ms=closed.horizon_ms)
        candles = tuple(c for c in closed.candles if req.since <= c[0] < cover.end)
        market = (self._markets or {}).get(key.symbol)
        result = FetchResult(
            req.req_id, candles=candles, horizon_ms=closed.horizon_ms, served=cover, settle_ms=profile.settle_ms,
            now_ms=closed.now_ms, market_reopens_ms=source.closed_until(key.symbol, closed.horizon_ms),
            listed_ms=market.listed_ms if market is not None else None,
            closed_spans=_closed_spans(source, key.symbol, req.since, cover.end, tf),
        )
        return result, page.answer

    async def _markets_call(self) -> tuple[dict[str, MarketInfo], Answer]:
        assert self.source is not None
        markets = await self.source.load_markets()
        return markets, getattr(self.source, "markets_answer", None) or Answer()  # their cost, if told

    async def _heartbeat_call(self) -> tuple[None, Answer]:
        assert self.source is not None
        return None, await self.source.heartbeat()

    # -- markets -------------------------------------------------------------------------

    def _load_markets(self) -> None:
        if self._loading or self.loop is None or self._busy >= self.concurrency:
            return
        wait = self._markets_retry_at - self.runtime.clock()
        if wait > 0:
            self._pump_later(wait)
            return
        if not self._admit("markets"):
            return
        self._loading = True
        self._refresh_due = False
        self._submit("markets", self._markets_call(), None)

    def _on_markets(self, done: _Done) -> None:
        self._loading = False
        self._answer_listing_waiters(done.result if done.error is None and done.result else None)
        if isinstance(done.error, ccxt.AuthenticationError):
            self._credentials_refused(done.error)
            return
        if done.error is None and done.result:
            self._credentials_accepted()
            fresh = self._markets is None
            added = set(done.result) - set(self._markets or {})
            self._markets = done.result
            self._last_load = self.runtime.clock()
            if fresh:
                self.log.info("markets_loaded", markets=len(done.result))
                # what time is it on the exchange? Asked before any candle request, so the first
                # answers are already closed by its clock, not by ours (a heartbeat only when
                # idle would come after the backfill, if ever)
                self._ask_due = self._measuring = self.settings.heartbeat > 0  # unless heartbeats are off
            elif added:
                self.log.info("markets_refreshed", markets=len(done.result), new=sorted(added)[:20])
            failed = getattr(self.source, "failed_types", None)
            if failed:  # some market types did not load: their series wait, the rest go on
                self._load_attempt += 1
                delay = getattr(self._load_retry.decide(self._load_attempt, next(iter(failed.values()))), "delay", 60.0)
                self.log.warning("market_types_failed", types=sorted(failed), retry_in=round(delay, 2))
                self._markets_retry_at = self.runtime.clock() + delay
                self.schedule(delay, _LOAD)
            else:
                self._load_attempt = 0
                self.schedule(self.settings.markets_refresh, _LOAD)
        else:
            error = done.error or ccxt.BadResponse("exchange listed no markets")
            self._load_attempt += 1
            decision = self._load_retry.decide(self._load_attempt, error)
            delay = getattr(decision, "delay", 60.0)
            self.log.warning("markets_failed", error=describe(error), retry_in=round(delay, 2))
            self._markets_retry_at = self.runtime.clock() + delay
            if self._markets is not None:
                self.schedule(delay, _LOAD)  # the old list serves meanwhile
            else:
                self._pump_later(delay)

    # -- credentials refused (a configuration problem: see the module docstring) -----------

    def _credentials_refused(self, error: BaseException) -> None:
        """The exchange refused our credentials: stop asking until a re-check or a `reset`."""
        first = self._refused is None
        self._refused, self._verify = error, False
        self._refused_checks += 1
        delay = min(AUTH_RECHECK_S[1], AUTH_RECHECK_S[0] * 2 ** (self._refused_checks - 1))
        self._markets_retry_at = self.runtime.clock() + delay
        self.schedule(delay, _LOAD)
        log = self.log.error if first else self.log.warning
        log("credentials_refused", error=describe(error), recheck_in=round(delay),
            hint="a configuration problem: fix the credentials and restart, or `ctl reset` the exchange")
        self._report(force=True)

    def _credentials_accepted(self) -> None:
        """A market load succeeded: the credentials work (again)."""
        self._verify = False
        refused, self._refused_series = self._refused_series, {}
        if self._refused is None:
            return  # a series refused alone was refused for itself (a symbol the token may not read)
        self._refused, self._refused_checks = None, 0
        self.log.info("credentials_accepted", series_refused=len(refused))
        self._report(force=True)
        for ref in refused.values():
            try:
                ref.tell(Reset())  # invalid for our credentials, not for anything of its own
            except pykka.ActorDeadError:
                pass  # restarted meanwhile: the new one asks by itself

    def _refuse_queued(self) -> None:
        """Answer every waiting request with the refusal, without asking the exchange."""
        assert self._refused is not None
        while self._queue:
            _, req = self._queue.popitem(last=False)
            self._refused_series[req.key] = req.reply_to
            try:
                req.reply_to.tell(FetchResult(req.req_id, error=self._refused))
            except pykka.ActorDeadError:
                self.log.debug("reply_dropped", series=str(req.key))

    def _refused_reason(self) -> str | None:
        return None if self._refused is None else describe(self._refused)

    # -- heartbeat -----------------------------------------------------------------------

    def _schedule_heartbeat(self) -> None:
        if self.settings.heartbeat <= 0 or self._beat_timer is not None:
            return
        idle_for = self.runtime.clock() - self._last_sent
        self._beat_timer = self.schedule(max(0.0, self.settings.heartbeat - idle_for), _BEAT)

    def _heartbeat(self) -> None:
        """Nothing was sent for `heartbeat` seconds: ask the exchange how it is (and what time)."""
        if self.loop is None or self._markets is None or self._refused is not None:
            return
        idle_for = self.runtime.clock() - self._last_sent
        idle = idle_for >= self.settings.heartbeat - 0.001 and self._busy == 0 and not self._queue
        if idle and self._admit("heartbeat"):
            self._submit("heartbeat", self._heartbeat_call(), None)
            return
        self._schedule_heartbeat()

    def _ask_exchange(self) -> None:
        """Send the heartbeat now: as the half-open breaker's probe (whether the exchange is back
        is its question, not one series' request, which may fail for reasons of its own), or to
        tell a series failing again from the exchange failing (`_record_outcome`)."""
        if self._beating or self._busy >= self.concurrency or self.loop is None:
            return
        if self._admit("heartbeat"):
            self._ask_due = False
            self._submit("heartbeat", self._heartbeat_call(), None)

    # -- results -------------------------------------------------------------------------

    def _on_done(self, done: _Done) -> None:
        self._busy -= 1
        if done.kind == "heartbeat":
            self._beating = self._measuring = False
        key = done.request.key if done.request is not None else None
        if key is not None:
            self._in_flight.discard(key)
        self._learn(done)
        if self.metrics is not None:
            self.metrics.request(self.settings.name, done.error, done.duration)
        self._record_outcome(done.error, done.duration, done.retry_after, key, sent_at=done.sent_at)
        if done.kind == "markets":
            self._on_markets(done)
        elif done.kind == "ohlcv":
            assert done.request is not None
            error = done.error
            if isinstance(error, ccxt.BadSymbol) and key is not None:
                listed = self.lists(key.symbol)
                if listed:
                    error = self._refused_but_listed(key.symbol, error)
                elif listed is False:  # a list refreshed while the request was out: it decides, as at _enqueue
                    error = ccxt.BadSymbol(f"{self.settings.name} does not list {key.symbol} ({describe(error)})")
            result = done.result if error is None else FetchResult(
                done.request.req_id, error=error, retry_after=done.retry_after)
            try:
                done.request.reply_to.tell(result)
            except pykka.ActorDeadError:  # the series restarted meanwhile; it will ask again
                self.log.debug("reply_dropped", series=str(done.request.key))
        elif isinstance(done.error, ccxt.AuthenticationError):
            if self._refused is None:  # else already refused: the re-check is scheduled
                self._credentials_refused(done.error)
        elif done.error is not None:
            self.log.info("heartbeat_failed", error=describe(done.error))
        if done.kind == "ohlcv" and isinstance(done.error, ccxt.AuthenticationError):
            assert done.request is not None
            self._refused_series[done.request.key] = done.request.reply_to
            if self._refused is None:
                self._verify = self._refresh_due = True  # this market, or the credentials? one market load says
        self._pump()

    def _refused_but_listed(self, symbol: str, error: BaseException) -> BaseException:
        """The exchange says it does not know a symbol its own market list has (Binance's -1121,
        even with HTTP 200): a glitch, or a delisting the list does not show yet. Transient for
        the series (it retries); the list, refreshed now, decides: a symbol it no longer has is
        refused from then on, and the series is `invalid`."""
        if not self._loading and self.runtime.clock() - self._last_load >= REFUSED_REFRESH_S:
            self._refresh_due = True
        return ListedSymbolRefused(f"{describe(error)}; but {self.settings.name}'s market list has {symbol}: "
                                   "asking again, until a refreshed list says otherwise")

    def _learn(self, done: _Done) -> None:
        """What the answer said of the exchange's clock and budget."""
        answer = done.answer
        self._in_flight_cost = max(0.0, self._in_flight_cost - done.charged)
        if answer.server_ms is not None:
            precise = done.kind == "heartbeat"
            mid_ms = (done.sent_wall + done.duration / 2) * 1000
            self.clock.measure(answer.server_ms, mid_ms, precise=precise, rtt_ms=done.duration * 1000)
        governor = self._lanes.get(done.lane)
        if governor is None or self.governor is None:
            return
        if answer.cost is not None:
            # ccxt's charge for the endpoint this request used (OKX's two candle endpoints differ)
            self._costs[(done.kind, done.lane)] = answer.cost
        paced_by_cost = self.settings.rate_limit is None
        governor.answered(done.ticket, answer.cost if paced_by_cost else None)
        rate = answer.rate
        if rate is not None:
            remaining = rate.remaining
            if remaining is None and rate.used is not None and rate.limit is not None:
                remaining = rate.limit - rate.used
            reset_in = (rate.reset_ms - self.runtime.wall() * 1000) / 1000 if rate.reset_ms is not None else None
            if self.governor.report(remaining=remaining, limit=rate.limit, reset_in=reset_in,
                                    in_flight=self._in_flight_cost):
                self._log_exchange_hold(self.governor, 1.0)

    def _record_outcome(self, error: BaseException | None, duration: float, retry_after: float | None,
                        key: SeriesKey | None = None, *, sent_at: float | None = None) -> None:
        kind = classify(error)
        if self.governor is not None:
            if kind.rate_limited and error is not None:
                # the exchange's own counts said there was room (or it reports none): another
                # client on this address, a request in flight meanwhile, or a budget set too high
                view = self.governor.view()
                hold = 0.0
                for governor in self._governors():  # a ban, or a limit: nothing goes meanwhile
                    hold = governor.penalize(retry_after, sent_at=sent_at)
                self.log.warning("rate_limited", error=describe(error), retry_after=retry_after,
                                 hold_s=round(hold, 2), **view)
            elif error is None:
                for governor in self._governors():
                    governor.cleared()
        now = self.runtime.clock()
        if not kind.against_exchange:
            self._last_ok = now
            if key is not None:
                if self._streaks.pop(key, None) is not None and key in self._answered:
                    self._answered_failing -= 1
                self._answered.add(key)
                self.breaker.record_success(duration)
            elif self.breaker.state != "closed" or not self._streaks:
                # the heartbeat (or a market list): the half-open breaker's probe, or nothing
                # failing. While series fail it says the exchange is reachable, not that it
                # serves them: it does not clear their failures
                self.breaker.record_success(duration)
            return
        if key is None:
            self.breaker.record_failure(duration)
            return
        # One series' requests failing (its symbol's answers trickle, say) while the exchange
        # answers the rest must not open the breaker and stall every other series. A series that
        # fails again with nothing answered since gets the exchange asked directly (a heartbeat);
        # once the exchange has answered since its failures began, they are its own, for a while,
        # as long as another series is not failing too: every series failing while the server's
        # clock answers is the exchange failing its candle requests.
        if key not in self._streaks:
            self._streaks[key] = now
            self._answered_failing += key in self._answered
        began = self._streaks[key]
        window = max(ISOLATION_S, 3 * self.settings.timeout, self.settings.heartbeat)
        others_fine = len(self._answered) - self._answered_failing > 0  # answered once, not failing now
        if self.breaker.state == "closed" and began < self._last_ok and now - self._last_ok <= window and others_fine:
            return
        self.breaker.record_failure(duration)
        if began < now:
            self._ask_due = True

    # -- status --------------------------------------------------------------------------

    def _status_word(self) -> str:
        if self._refused is not None:
            return "invalid"
        state = self.breaker.state
        if state == "open":
            return "down"
        if state == "half_open":
            return "recovering"
        if self._markets is None:
            return "starting"
        return "ok"

    def _report(self, *, force: bool = False) -> None:
        offset = self.clock.offset_ms
        reason = self._refused_reason()
        # the openings count too: open, probed and open again is news (the probe went out)
        now = (self.breaker.state, self._status_word(), offset if offset is None else round(offset / 1000), reason,
               self.breaker.snapshot()["openings"])
        if (now != self._last_report or force) and self.status_to is not None:
            if self._last_report is not None and now[0] != self._last_report[0]:
                self.log.warning("breaker_" + now[0], previous=self._last_report[0])
            self._last_report = now
            detail = {**self.breaker.snapshot(), "clock_offset_ms": offset, "reason": reason}
            self.status_to.tell(ExchangeStatus(name=self.settings.name, breaker=now[0], status=now[1], detail=detail))


def _leave_out(rows: list[Any], skip: tuple[tuple[int, int], ...]) -> tuple[list[Any], list[int]]:
    """The rows outside the stretches an operator accepted as lost (`ctl accept-gap`: the exchange
    serves invalid candles there, which would fail the whole answer), and the open times of
    those left out. Only rows with a numeric open time can be placed; the rest stay in, to be
    judged by validation."""
    if not skip:
        return rows, []
    kept: list[Any] = []
    left: list[int] = []
    for row in rows:
        ts = row[0] if isinstance(row, list | tuple) and row else None
        if isinstance(ts, int | float) and not isinstance(ts, bool) and any(lo <= ts < hi for lo, hi in skip):
            left.append(int(ts))
        else:
            kept.append(row)
    return kept, left


def _closed_spans(source: Source, symbol: str, lo: int, hi: int, tf_ms: int) -> tuple[tuple[int, int], ...]:
    """The candles of [lo, hi) during which the market was closed throughout, as the source tells
    it (none for crypto). A candle is wholly closed only when the market is closed at its open and
    stays closed until its close (`closed_until(t) >= t + tf`): Sunday's daily candle and the 2h-12h
    candles that span the reopening hold the week's first ticks, so they are never in a span (a
    served candle is stored whatever the spans say; a missing one there is an ordinary gap)."""
    spans: list[tuple[int, int]] = []
    t = lo
    while t < hi:
        reopens = source.closed_until(symbol, t)
        if reopens is None or reopens < t + tf_ms:
            t += tf_ms
            continue
        end = t + (reopens - t) // tf_ms * tf_ms  # the open of the candle the market reopens in
        spans.append((t, min(end, hi)))
        t = end
    return tuple(spans)
