"""The series actor: one (exchange, symbol, timeframe), from its configured start to now, forever.

It owns its cursor, its retry state and its quarantine, and holds nothing the store does not:
on start it asks the storage actor where to resume (after the last stored candle, plus the
holes inside the stored range), so a crash, a restart or `kill -9` loses and duplicates nothing.

The loop: ask the exchange actor for the next page -> validate (done by the exchange's worker)
-> write to storage -> on the storage's ack, move the cursor -> next page at once while
backfilling, or a little after the next candle closes once caught up. Every wait is a
scheduled message, so the mailbox always answers `reset`, `pause` and `stop` at once.

Live stream (when its exchange streams, `actors/stream.py`): the series joins the exchange's
stream actor; once caught up, its closed candles are stored by the stream and it is told
afterwards (`StreamedCandles`), so it stops polling after each close. It still uses REST for its
backfill, for the gap after every (re)subscription, for a periodic audit, for any candle the
stream skipped, and whenever the stream is down or silent for it (see "live stream" below).

Failures: retryable errors are retried with full-jitter backoff (`RetryPolicy`), honouring a
server's Retry-After; when a round of attempts is exhausted the failure counts toward the
series' quarantine, which after `quarantine_after` failed rounds probes only on a slow schedule
until one success releases it. A symbol the exchange does not list, or credentials the
exchange refuses, make the series `invalid` (asked again at every market refresh of its exchange,
and at once on an operator's `reset`); none of this touches other series or the exchange's breaker.

A market with trading hours (forex) is not polled while it is closed: a caught-up series waits
for the first candle that closes after the market reopens, and says so (`reopens_ms`).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import ccxt

from ..resilience.quarantine import QuarantineConfig
from ..resilience.retry import GiveUp, RetryConfig
from ..supervisors.child import Address, Child
from ..supervisors.clock import wall_ms
from .market.candles import InvalidCandles, timeframe_ms
from .market.closing import NO_MEASUREMENT_MARGIN_MS
from .market.errors import EmptyAnswer, describe, is_retryable
from .market.gaps import BEFORE_LISTING, EXCHANGE_HOLE, OPERATOR_ACCEPTED, GapTotals, add_gaps, gaps_note
from .market.progress import Gap, ListingSearch, Outcome, take
from .market.streamed import STREAM_WRITE_PATIENCE_S, StreamLedger
from .messages import (
    AcceptedGaps,
    AcceptedGapsQuery,
    Candle,
    FetchRequest,
    FetchResult,
    Pause,
    Reset,
    ResumePoint,
    ResumeQuery,
    SeriesKey,
    SeriesStatus,
    StoreChanged,
    StreamedCandles,
    StreamJoin,
    StreamLeave,
    StreamState,
    Write,
    Written,
)
from .stores.ranges import subtract_ranges

STORE_RETRY_S = 1.0
STREAM_REJOIN_S = 1.0  # the stream actor was between incarnations: join again this much later
STREAM_BUFFER = 1000  # streamed candles kept while the series is busy or behind (the oldest kept)
AUDIT_OVERLAP = 2  # an audit also re-reads this many candles of the previous one
AUDIT_MAX = 1000  # candles in one audit at most
LIVE_LAG_S = 180.0  # a candle stored within this of its close counts in close-to-store lag


@dataclass(frozen=True)
class _Tick:
    """Time to make the next request (a retry, a poll, a probe)."""


@dataclass(frozen=True)
class _Watchdog:
    """No answer in time from the exchange or the store: ask again (both are idempotent)."""

    token: int


@dataclass(frozen=True)
class _Audit:
    """Time to re-read the candles stored since the last audit over REST."""


@dataclass(frozen=True)
class _Rejoin:
    """Join the stream again (the last join found no stream actor)."""


_TICK = _Tick()
_AUDIT = _Audit()
_REJOIN = _Rejoin()


@dataclass(frozen=True)
class SeriesSettings:
    """What a series needs, built from its exchange's section by `candlekeeper.app.settings`."""

    lookback: float = 86400.0  # seconds back from now to start a first backfill, unless since_ms
    since_ms: int | None = None  # where a first backfill starts, when set
    poll_interval: float = 10.0
    page_limit: int = 1000
    request_timeout: float = 10.0  # the exchange's; an unanswered request is re-sent after 3x + 5 s
    # the time the exchange needs to serve one poll of each of its series at its rate limit: the
    # series' polls after each close are spread over it (see SeriesActor.poll_offset)
    poll_spread: float = 0.0
    retry: RetryConfig = RetryConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    # an `invalid` series (a symbol the exchange does not list) asks again this often: its
    # exchange's market refresh, so a new listing is picked up within one or two of those
    invalid_recheck: float = 300.0
    # live stream: after a close, wait this long for the stream's candle before polling REST
    stream_grace: float = 10.0
    # re-read the candles stored since the last audit this often (streamed series only)
    audit_interval: float = 7200.0


class SeriesActor(Child):
    pooled = True  # thousands of them, and no handler waits: on the runtime's dispatcher

    def __init__(
        self,
        key: SeriesKey,
        settings: SeriesSettings,
        *,
        exchange: Address,
        storage: Address,
        health: Address | None = None,
        alerts: Address | None = None,
        metrics: Any = None,
        stream: Address | None = None,
        stream_ledger: StreamLedger | None = None,
    ) -> None:
        super().__init__()
        self.key = key
        # Where in [0, poll_spread) s after each close this series polls: fixed per series (a
        # hash of its key), so an exchange's series do not all wake at the same instant.
        self.poll_offset = settings.poll_spread * (zlib.crc32(str(key).encode()) / 2**32)
        self.log = self.log.bind(exchange=key.exchange, symbol=key.symbol, timeframe=key.timeframe)
        self.tf_ms = timeframe_ms(key.timeframe)
        self.settings = settings
        self.exchange = exchange
        self.storage = storage
        self.health = health
        self.alerts = alerts  # told status changes only: a poll's new last_ts is no alert's business
        self.metrics = metrics
        self.watchdog_s = 3 * settings.request_timeout + 5.0
        self.retry = settings.retry.policy(rng=self.runtime.rng, retryable=is_retryable)
        self.quarantine = settings.quarantine.machine(clock=self.runtime.clock)
        self.start_ms = self._start_ms()
        self.cursor = self.start_ms
        self.last_ts: int | None = None
        self.gaps_todo: list[tuple[int, int]] = []
        self.generation: str | None = None
        self.attempt = 0
        self.failures = 0
        self.paused = False
        self.status = "starting"
        self.detail: str | None = None
        self.reopens_ms: int | None = None  # the market was (or is) closed until then
        self._tokens = itertools.count(1)
        self._waiting_for: int | None = None  # token of the outstanding request/write/query
        self._outstanding: Any = None  # the message to resend if the watchdog fires
        # rows, next cursor, the answer, and whether the backfill goes on at once
        self._pending: tuple[tuple[Candle, ...], int, FetchResult, bool] | None = None
        self._pending_gaps: list[Gap] = []  # the confirmed gaps that write records
        self._gaps: GapTotals = {}  # confirmed gaps in the store, by reason: said in `detail`
        self._stored_any = False  # this incarnation stored a candle (first_ever then no longer holds)
        self.search: ListingSearch | None = None
        # stretches an operator accepted as lost (`ctl accept-gap`), left out of every request;
        # learnt from the command, or from the store after candles failed validation
        self._skip: list[tuple[int, int]] = []
        self._ask_accepted = False
        self._timer: Any = None
        self._phase = "backfilling"  # the last of `ok` (caught up) or `backfilling` it was in
        self._watchdog: Any = None
        self._reported: tuple[Any, ...] | None = None
        # -- live stream (see "live stream" below) --
        self.stream = stream
        self.source: str | None = None if stream is None else "rest"
        self._stream_up = False
        self._stream_why: str | None = None  # why the stream does not serve it, when it says
        self._stream_from: int | None = None  # open time of the first candle the stream can carry
        self._stream_buf: dict[int, tuple[Candle, bool]] = {}  # open time -> (candle, stored)
        self._stream_live = False  # the stream was told it is caught up
        self._writing_streamed = False  # the write in flight holds candles the stream could not store
        self._audit_from: int | None = None  # the cursor when the last audit was taken
        self._hole_at: int | None = None  # the cursor a hole before streamed candles was last asked from
        self._gap_at: int | None = None  # the cursor a gap before the subscription was counted at
        self._fell_back = False  # the stream said nothing of a closed candle: on REST until it does
        self.stream_ledger = stream_ledger  # what the stream took (its word to this series may lag)

    def _start_ms(self) -> int:
        if self.settings.since_ms is not None:
            start = self.settings.since_ms
        else:
            start = wall_ms(self.runtime.wall) - int(self.settings.lookback * 1000)
        return -(-start // self.tf_ms) * self.tf_ms  # the first open time at or after it

    # -- lifecycle -----------------------------------------------------------------------

    def on_start(self) -> None:
        self._set_status("backfilling")
        self._resume()
        self._stream_start()

    def on_stop(self) -> None:
        self._stream_stop()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FetchResult):
            self._on_result(message)
        elif isinstance(message, Written):
            self._on_written(message)
        elif isinstance(message, ResumePoint):
            self._on_resume_point(message)
        elif isinstance(message, AcceptedGaps):
            self._on_accepted(message)
        elif isinstance(message, StoreChanged):
            self._on_store_changed(message)
        elif message is _TICK or isinstance(message, _Tick):
            self._timer = None
            if self._stream_word_on_its_way():
                return
            self._stream_fallback("silent")
            self._next()
        elif isinstance(message, StreamedCandles):
            self._on_streamed(message)
        elif isinstance(message, StreamState):
            self._on_stream_state(message)
        elif message is _AUDIT or isinstance(message, _Audit):
            self._on_audit()
        elif message is _REJOIN or isinstance(message, _Rejoin):
            self._stream_join(self._stream_live)
        elif isinstance(message, _Watchdog):
            self._on_watchdog(message)
        elif isinstance(message, Reset):
            self.reset()
        elif isinstance(message, Pause):
            self.pause() if message.paused else self.resume()
        else:
            return super().on_receive(message)
        return None

    # -- public API (told or asked through the proxy) ------------------------------------

    def reset(self) -> dict[str, Any]:
        """Operator reset: forget retry state and quarantine, and try again now."""
        self.attempt = 0
        self.failures = 0
        self.quarantine.reset()
        if self.status in ("quarantined", "retrying", "invalid"):
            # back to what it was doing: a caught-up series is still judged by its lag, not by
            # a backfill's stall bound (which would call it lagging long before the lag bound)
            self._set_status(self._phase)
        if self._waiting_for is None:
            self._cancel_timer()
            self._next(priority=True)  # an operator is waiting: ahead of the exchange's queue
        self._report()
        return self.snapshot()

    def accept_gap(self, start_ms: int, end_ms: int) -> dict[str, Any]:
        """The operator accepted [start_ms, end_ms) as lost (a confirmed gap, already in the
        store): leave it out from now on, and try again at once with a fresh retry state and
        quarantine, so a series stuck on invalid candles there moves on."""
        self._add_skip([(start_ms, end_ms)])
        self._gaps = add_gaps(self._gaps, [(start_ms, end_ms, OPERATOR_ACCEPTED)], self.tf_ms)
        self.log.info("gap_accepted", gap_from=_iso(start_ms), gap_to=_iso(end_ms))
        return self.reset()

    def _add_skip(self, gaps: Iterable[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([*self._skip, *gaps]):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self._skip = merged

    def _move_past_skipped(self) -> None:
        """Never ask for a stretch an operator accepted as lost: the cursor jumps over it, holes
        leave it out (done before a request, never while one is out: its answer is matched to
        the request as it was)."""
        for lo, hi in self._skip:
            if lo <= self.cursor < hi:
                self.cursor = hi
        self.gaps_todo = subtract_ranges(self.gaps_todo, self._skip)

    def pause(self) -> dict[str, Any]:
        self.paused = True
        self._cancel_timer()
        self._set_status("paused")
        if self._stream_live:
            self._stream_join(False)  # the stream stores nothing for a paused series
        return self.snapshot()

    def resume(self) -> dict[str, Any]:
        if self.paused:
            self.paused = False
            self._set_status("backfilling")
            if self._waiting_for is None:
                self._next()
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        return {
            "exchange": self.key.exchange,
            "symbol": self.key.symbol,
            "timeframe": self.key.timeframe,
            "status": self.status,
            "last_ts": self.last_ts,
            "failures": self.failures,
            "cursor": self.cursor,
            "detail": self._detail(),
            "quarantine": self.quarantine.snapshot(),
            "source": self.source,
            "stream_up": self._stream_up,
            "stream_detail": self._stream_why,
        }

    # -- resume --------------------------------------------------------------------------

    def _resume(self) -> None:
        token = next(self._tokens)
        self._await(token, ResumeQuery(self.key, self.tf_ms, self.start_ms, self.actor_ref), self.storage)

    def _on_resume_point(self, rp: ResumePoint) -> None:
        if self._outstanding is None or not isinstance(self._outstanding[0], ResumeQuery):
            return
        self._clear_wait()
        self.generation = rp.generation
        self.last_ts = rp.last_ts
        self.cursor = self.start_ms if rp.last_ts is None else max(self.start_ms, rp.last_ts + self.tf_ms)
        self.gaps_todo = [g for g in rp.missing if g[1] > self.start_ms]
        self._gaps = {why: (n, candles) for why, n, candles in rp.gap_totals}
        if self.gaps_todo:
            self.log.info("refetching_holes", holes=len(self.gaps_todo))
        self._report()
        self._next()

    def _on_accepted(self, msg: AcceptedGaps) -> None:
        if self._outstanding is None or not isinstance(self._outstanding[0], AcceptedGapsQuery):
            return
        self._clear_wait()
        if msg.gaps:
            self._add_skip(msg.gaps)
            self.log.info("accepted_gaps_skipped", gaps=[f"{_iso(a)} to {_iso(b)}" for a, b in msg.gaps[:5]])
        self._next()

    def _on_store_changed(self, msg: StoreChanged) -> None:
        """Resync now when idle; a request or write in flight resyncs on its ack's generation."""
        if self.generation is None or msg.generation == self.generation or self._waiting_for is not None:
            return
        self.log.info("store_generation_changed_resyncing", generation=msg.generation,
                      reason="storage restarted or the database was recreated: re-reading where to resume")
        self.generation = None
        self._cancel_timer()
        self._resume()

    # -- requests ------------------------------------------------------------------------

    def _next(self, *, priority: bool = False) -> None:
        if self.paused or self._waiting_for is not None:
            return
        if self._ask_accepted:  # candles failed validation: has an operator accepted them as lost?
            self._ask_accepted = False
            token = next(self._tokens)
            self._await(token, AcceptedGapsQuery(self.key, self.cursor, self.actor_ref), self.storage)
            return
        if self._skip:
            self._move_past_skipped()
        until: int | None = None
        if self.gaps_todo:
            since, until = self.gaps_todo[0]
        elif self.search is not None:
            since = self.search.probe()
        else:
            since = self.cursor
        token = next(self._tokens)
        skip = tuple((lo, hi) for lo, hi in self._skip if hi > since)
        req = FetchRequest(self.key, since, self.settings.page_limit, token, self.actor_ref, priority=priority,
                           until=until, skip=skip)
        self._await(token, req, self.exchange)

    def _on_result(self, res: FetchResult) -> None:
        if res.req_id != self._waiting_for or self._outstanding is None:
            return  # an answer to a request we already gave up on
        req = self._outstanding[0]
        self._clear_wait()
        if res.error is not None:
            self._on_failure(res.error, res.retry_after)
            return
        self._on_success(req, res)

    def _on_success(self, req: FetchRequest, res: FetchResult) -> None:
        assert res.served is not None
        tf = self.tf_ms
        in_hole = bool(self.gaps_todo) and req.until is not None
        if self.search is not None and not in_hole:
            self._on_probe(req, res)
            return
        # nothing stored before `since`: what precedes the first candle the exchange shows is a listing
        first_ever = req.since == self.start_ms if in_hole else (self.last_ts is None and not self._stored_any)
        if not res.candles and not first_ever and res.served.missing == EXCHANGE_HOLE \
                and req.since + tf + res.settle_ms <= res.horizon_ms:
            # an exchange that fills quiet minutes answered nothing for a stretch it has: not a gap
            self._on_failure(EmptyAnswer(f"no candles from {_iso(req.since)} on, where the exchange has some"
                                         " (a glitch, a trading halt or a delisting?)"), None)
            return
        out = take(res.candles, res.served, since=req.since, bound=req.until if in_hole else None, tf_ms=tf,
                   now_ms=res.now_ms, settle_ms=res.settle_ms, first_ever=first_ever, closed_spans=res.closed_spans)
        if in_hole:
            lo, hi = self.gaps_todo.pop(0)
            rest = [(out.covered_to, hi)] if out.progressed and out.covered_to < hi else []
            if not out.progressed:
                self.log.info("hole_not_served_yet", hole_from=_iso(lo), hole_to=_iso(hi))
            self.gaps_todo[:0] = out.refetch + rest
            self._commit(out, self.cursor, res, more=True)  # the next hole, or the cursor's turn
            return
        self.gaps_todo[:0] = out.refetch
        if (first_ever and not out.rows and out.gaps and not out.refetch
                and out.covered_to + res.served.end - req.since < res.horizon_ms):
            # a whole window before the market's first candle: find it, do not page to it
            if res.listed_ms is not None and res.listed_ms > out.covered_to:
                listed = res.listed_ms // tf * tf
                out = replace(out, gaps=[*out.gaps, (out.covered_to, listed, BEFORE_LISTING)], covered_to=listed)
            else:
                self.search = ListingSearch(out.covered_to, res.horizon_ms, max(tf, res.served.end - req.since))
        self._commit(out, max(self.cursor, out.covered_to), res, more=out.covered_to > self.cursor or out.progressed)

    def _on_probe(self, req: FetchRequest, res: FetchResult) -> None:
        """An answer to a listing-search probe: narrow the search; when found, page from there."""
        assert self.search is not None and res.served is not None
        first = res.candles[0][0] if res.candles else None
        self.search.record(req.since, first, res.served.end)
        if not self.search.done:
            self._succeeded()
            self._next()
            return
        start, found = self.start_ms, self.search.empty_to
        self.search = None
        self.log.info("listing_found", listed_from=_iso(found), searched_from=_iso(start))
        gaps = [(start, found, BEFORE_LISTING)] if found > start else []
        self._commit(Outcome(gaps=gaps, covered_to=found), max(self.cursor, found), res, more=True)

    def _commit(self, out: Outcome, next_cursor: int, res: FetchResult, *, more: bool) -> None:
        """Store what the answer gave, then move on: at once while `more` (the backfill goes on),
        else poll after the next close."""
        if out.rows or out.gaps:
            self._write(out.rows, out.gaps, next_cursor, res, more)
        else:
            self._advance(next_cursor, res, more)

    def _write(self, rows: list[Candle], gaps: list[Gap], next_cursor: int, res: FetchResult, more: bool) -> None:
        k = self.key
        token = next(self._tokens)
        if self._skip:  # an accepted stretch is recorded as such already: never as another reason
            gaps = [(a, b, why) for lo, hi, why in gaps for a, b in subtract_ranges([(lo, hi)], self._skip)]
        msg = Write(
            rows=tuple((k.exchange, k.symbol, k.timeframe, *c) for c in rows),
            gaps=tuple((k.exchange, k.symbol, k.timeframe, a, b, why) for a, b, why in gaps),
            token=token,
            reply_to=self.actor_ref,
        )
        if gaps:
            self.log.info("exchange_gaps_recorded", count=len(gaps),
                          gaps=[f"{_iso(a)} to {_iso(b)} ({why})" for a, b, why in gaps[:5]])
        self._pending = (tuple(rows), next_cursor, res, more)
        self._pending_gaps = list(gaps)
        self._await(token, msg, self.storage)

    def _on_written(self, ack: Written) -> None:
        if ack.token != self._waiting_for or self._pending is None:
            return
        self._clear_wait()
        rows, next_cursor, res, more = self._pending
        self._pending = None
        if ack.error is not None:
            self.detail = f"store: {ack.error}"
            self._schedule(STORE_RETRY_S)  # refetch and rewrite: idempotent
            return
        if self.generation is not None and ack.generation != self.generation:
            self.log.info("store_generation_changed_resyncing", generation=ack.generation,
                          reason="storage restarted or the database was recreated: re-reading where to resume")
            self.generation = None
            self._resume()
            return
        if self._pending_gaps:
            self._gaps = add_gaps(self._gaps, self._pending_gaps, self.tf_ms)
            self._pending_gaps = []
        if rows:
            self._stored_any = True
            self.last_ts = max(self.last_ts or rows[-1][0], rows[-1][0])
            self._observe_lag(rows)
        self._advance(next_cursor, res, more)

    def _advance(self, next_cursor: int, res: FetchResult, more: bool) -> None:
        self._succeeded()
        self.cursor = max(self.cursor, next_cursor)
        if self.gaps_todo or self.search is not None or (self.cursor < res.horizon_ms and more):
            self._set_status("backfilling")
            self._next()
        else:
            self._caught_up(res)

    def _caught_up(self, res: FetchResult) -> None:
        """Nothing more is closed: poll again a little after the next candle closes (or when the
        market reopens); or, when the stream serves the series, wait for its candles."""
        self._succeeded()
        now_ms = self.runtime.wall() * 1000
        next_close = max(self.cursor, res.horizon_ms) + self.tf_ms
        reopens = res.market_reopens_ms
        if reopens is not None and self.cursor >= res.horizon_ms:
            # a closed market, and nothing before its close left to fetch: the next candle to close
            # is the one it reopens in
            self.reopens_ms = reopens
            next_close = max(next_close, reopens // self.tf_ms * self.tf_ms + self.tf_ms)
            if reopens > now_ms:
                self.detail = f"market closed until {_iso(reopens)}"
        self._set_status("ok")
        if self._stream_caught_up():
            return
        if next_close <= now_ms:
            if res.now_ms < next_close + NO_MEASUREMENT_MARGIN_MS:
                # the answer was taken before that candle closed, or too soon after for the
                # clock's margin (a request that crossed the close): ask again once the
                # exchange's clock is surely past it, not a whole poll interval later; each
                # answer's clock is later, so this ends
                wait = min((next_close + NO_MEASUREMENT_MARGIN_MS - res.now_ms) / 1000, self.settings.poll_interval)
                delay = wait + min(1.0, self.settings.poll_interval) + self.poll_offset
            else:
                # that candle is closed by our clock but the exchange has not published it yet
                delay = self.settings.poll_interval
        else:
            # The exchange serves its series one by one at its rate limit anyway: waking them
            # spread over that time, not all in the same millisecond (thousands of threads
            # wanting the GIL at once, ahead of the exchange's workers), loses no time.
            # On the wall clock: a poll for a close follows the clock if it moves (a test's).
            self._schedule_at(next_close / 1000 + min(1.0, self.settings.poll_interval) + self.poll_offset)
            return
        self._schedule(delay)

    # -- failures ------------------------------------------------------------------------

    def _succeeded(self) -> None:
        self.attempt = 0
        self.failures = 0
        self.detail = None
        if self.quarantine.record_success():
            self.log.info("series_released")

    def _on_failure(self, error: BaseException, retry_after: float | None) -> None:
        self.failures += 1
        self.detail = describe(error)[:300]
        if isinstance(error, ccxt.BadSymbol | ccxt.AuthenticationError):
            # asking again gets the same answer: a symbol the exchange does not list, or credentials
            # it refuses (a configuration problem; the exchange actor stops asking for them)
            if self.status != "invalid":  # not again at every re-check
                bad_symbol = isinstance(error, ccxt.BadSymbol)
                self.log.error("symbol_not_listed" if bad_symbol else "credentials_refused", error=self.detail)
            self._set_status("invalid")
            self._schedule(self.settings.invalid_recheck)
            return
        if isinstance(error, InvalidCandles):
            self._ask_accepted = True  # before the next attempt (see _next)
        self.attempt += 1
        decision = self.retry.decide(self.attempt, error, retry_after)
        if not isinstance(decision, GiveUp):
            self.log.info("retrying", attempt=self.attempt, delay=round(decision.delay, 3), error=self.detail)
            if self.metrics is not None:
                self.metrics.retries.labels(self.key.exchange).inc()
            self._set_status("retrying")
            self._schedule(decision.delay)
            return
        self.attempt = 0
        if self.quarantine.record_failure():
            self.log.error("series_quarantined", failures=self.quarantine.consecutive_failures, error=self.detail)
        if self.quarantine.quarantined:
            self._set_status("quarantined")
            self._schedule(self.quarantine.time_until_probe() or self.quarantine.probe_interval)
        else:
            self.log.warning("round_failed", reason=decision.reason)
            self._set_status("retrying")
            self._schedule(max(self.settings.poll_interval, retry_after or 0.0))

    # -- waiting -------------------------------------------------------------------------

    def _await(self, token: int, message: Any, target: Address) -> None:
        self._waiting_for = token
        self._outstanding = (message, target)
        if not target.tell(message):
            self.log.warning("peer_down", peer=target.name)
        self._watchdog = self.schedule(self.watchdog_s, _Watchdog(token))

    def _clear_wait(self) -> None:
        self._waiting_for = None
        self._outstanding = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_watchdog(self, wd: _Watchdog) -> None:
        if wd.token != self._waiting_for or self._outstanding is None:
            return
        message, target = self._outstanding
        self.log.info("no_answer_resending", peer=target.name)
        target.tell(message)
        self._watchdog = self.schedule(self.watchdog_s, _Watchdog(wd.token))

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if not self.paused:
            self._timer = self.schedule(delay, _TICK)

    def _schedule_at(self, instant: float) -> None:
        """The poll timer for a wall-clock instant (after a close): it fires when the wall clock
        gets there, also when that clock moves (a test's, to run a close in milliseconds)."""
        self._cancel_timer()
        if not self.paused:
            self._timer = self.schedule_at(instant, _TICK)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- status --------------------------------------------------------------------------

    def _set_status(self, status: str) -> None:
        if self.paused and status != "paused":
            return
        self.status = status
        if status in ("ok", "backfilling"):
            self._phase = status
        self._report()

    def _detail(self) -> str | None:
        """What went wrong last, else where the market is closed, else the confirmed gaps."""
        return self.detail or gaps_note(self._gaps)

    def _report(self) -> None:
        # `_gaps` is replaced whole, never changed in place: the dict itself can be kept and compared
        now = (self.status, self.last_ts, self.failures, self.reopens_ms, self.source, self._gaps)
        if now == self._reported:
            return
        status_changed = self._reported is None or now[0] != self._reported[0]
        self._reported = now
        report = SeriesStatus(self.path, self.key, self.status, self.last_ts, self.failures, self._detail(),
                              self.start_ms, self.reopens_ms, source=self.source)
        if self.health is not None:
            self.health.tell(report)
        if self.alerts is not None and status_changed:
            self.alerts.tell(report)


    # -- live stream ---------------------------------------------------------------------
    #
    # The stream stores a caught-up series' closed candles and tells it (`StreamedCandles`);
    # the series takes them only where they continue its cursor, so its cursor and last_ts move
    # exactly as with REST: a streamed candle after a hole never moves them past the hole, which
    # REST fills from the cursor (and a restart finds it with the store's missing ranges).

    def _stream_start(self) -> None:
        if self.stream is None:
            return
        self._stream_join(False)
        # audits of an exchange's series spread over the interval (a hash of the key, as polls)
        first = self.settings.audit_interval * (1.0 + zlib.crc32(f"audit:{self.key}".encode()) / 2**32)
        self.schedule(first, _AUDIT)

    def _stream_stop(self) -> None:
        if self.stream is not None:
            self.stream.tell(StreamLeave(self.key, self.actor_ref))

    def _stream_join(self, live: bool) -> None:
        if self.stream is None:
            return
        self._stream_live = live
        if not self.stream.tell(StreamJoin(self.key, self.actor_ref, live)):
            self.schedule(STREAM_REJOIN_S, _REJOIN)

    def _set_source(self, source: str) -> None:
        if self.source != source:
            self.source = source
            self._report()

    def _idle_caught_up(self) -> bool:
        return (self._waiting_for is None and not self.paused and self.status == "ok" and not self.gaps_todo
                and self.search is None)

    def _on_stream_state(self, msg: StreamState) -> None:
        was = self._stream_up
        self._stream_up = msg.up
        self._stream_why = msg.reason
        self._stream_from = msg.now_ms // self.tf_ms * self.tf_ms if msg.up else None
        if not msg.up:
            self._set_source("rest")
            if was:
                self._count_fallback("down")
                if self._idle_caught_up():
                    self._stream_reschedule()  # poll after each close again
            return
        if not self._idle_caught_up():
            return  # busy, behind or paused: its caught-up step looks at the stream
        # (re)subscribed: a candle that closed while the stream did not serve it comes over REST
        if self._stream_drain():
            return
        if self._stream_cannot_carry():
            self._count_gap()
            self._cancel_timer()
            self._next()
            return
        self._set_source("stream")
        self._stream_reschedule()

    def _on_streamed(self, msg: StreamedCandles) -> None:
        buf = self._stream_buf
        for c in msg.candles:
            if c[0] >= self.cursor:
                before = buf.get(c[0])
                buf[c[0]] = (c, msg.stored or (before is not None and before[1]))
        if len(buf) > STREAM_BUFFER:
            for ts in sorted(buf)[STREAM_BUFFER:]:
                del buf[ts]  # far ahead of a series that is behind: REST reaches them anyway
        if self._stream_drain():
            return
        if self._idle_caught_up():
            self._stream_reschedule()

    def _stream_drain(self) -> bool:
        """Take the streamed candles that continue the cursor. True when that started a write
        or a REST request (the series is busy); False when it is still idle."""
        if self._waiting_for is not None or self.paused or self.gaps_todo or self.search is not None:
            return False
        buf, tf = self._stream_buf, self.tf_ms
        for ts in [t for t in buf if t < self.cursor]:
            del buf[ts]
        run: list[tuple[Candle, bool]] = []
        at = self.cursor
        while at in buf:
            run.append(buf.pop(at))
            at += tf
        if run:
            candles = [c for c, _ in run]
            if not all(stored for _, stored in run):
                # the stream could not store them: write them as REST answers are written
                now_ms = wall_ms(self.runtime.wall)
                self._writing_streamed = True
                self._write(candles, [], at, FetchResult(0, horizon_ms=at, now_ms=now_ms), False)
                return True
            self.cursor = at
            self._stored_any = True
            self.last_ts = max(self.last_ts or candles[-1][0], candles[-1][0])
            self.source = "stream"
            self._fell_back = False
            self._succeeded()
            self._set_status("ok")
            self._report()
        if buf and self.status == "ok" and self._hole_at != self.cursor:
            # a later candle came, not the one at the cursor (its final was missed): REST fills it
            # (once per cursor: if REST has nothing yet, the poll timer asks again)
            self._hole_at = self.cursor
            self._count_fallback("missed")
            self._cancel_timer()
            self._next()
            return True
        return False

    def _stream_caught_up(self) -> bool:
        """The caught-up step with a stream: True when the stream serves the series (or a
        write or request for it is under way), False to poll over REST as usual."""
        if self.stream is None:
            return False
        if not self._stream_live:
            self._stream_join(True)
        if self._audit_from is None:
            self._audit_from = self.cursor
        if self._stream_drain():
            return True
        if not self._stream_up:
            self._set_source("rest")
            return False
        if self._stream_cannot_carry():
            # busy when its subscription came up: the candle that closed before it comes over
            # REST now, not when the stream shows a later one at the next close
            self._count_gap()
            self._set_source("rest")
            return False
        if not self._fell_back:
            self._set_source("stream")
        self._stream_reschedule()
        return True

    def _stream_cannot_carry(self) -> bool:
        """The candle at the cursor closed before the stream's subscription came up and the
        stream did not take it: only REST can fill it (a stream carries candles from the one in
        progress when it subscribed)."""
        if self._stream_from is None or self.cursor >= self._stream_from:
            return False
        newest = self.stream_ledger.newest(self.key) if self.stream_ledger is not None else None
        return newest is None or newest < self.cursor

    def _stream_reschedule(self) -> None:
        """The next poll: while the stream serves the series, only if its candle has not come
        `stream_grace` after the close (plus the series' poll offset); otherwise as REST polls."""
        close = (self.cursor + self.tf_ms) / 1000  # when the candle at the cursor closes
        wait = self.settings.stream_grace if self._stream_up else min(1.0, self.settings.poll_interval)
        poll_at = close + wait + self.poll_offset
        if poll_at <= self.runtime.wall():
            self._schedule(self.settings.poll_interval)  # overdue: not published yet, ask at the usual pace
        else:
            self._schedule_at(poll_at)

    def _stream_word_on_its_way(self) -> bool:
        """The poll timer fired with the stream up: True when the series waits for the stream
        once more instead of asking REST, because
        - the stream took the candle at the cursor (or a later one): its write is queued or done
          and its word on the way; REST would only queue the same write again (up to
          `STREAM_WRITE_PATIENCE_S` after the close);
        - or the stream is behind: it has not yet shown a candle after the close for any series
          of this timeframe (parsing a backlog under load), or did so less than `stream_grace`
          ago and not yet for this series (up to 3 x `stream_grace` after the close).
        A stream that passed the close without the candle missed it, or is silent for this
        series: False, ask REST."""
        ledger = self.stream_ledger
        if ledger is None or not self._stream_up or not self._idle_caught_up() or self._stream_cannot_carry():
            return False
        now, grace = self.runtime.wall(), self.settings.stream_grace
        closed_for = now - (self.cursor + self.tf_ms) / 1000
        newest = ledger.newest(self.key)
        if newest is not None and newest >= self.cursor:
            if closed_for > STREAM_WRITE_PATIENCE_S:
                return False
            self._schedule(grace)
            return True
        seen = ledger.seen(self.key)
        if closed_for > 3 * grace or (seen is not None and seen > self.cursor):
            return False
        passed = ledger.passed_at(self.key.timeframe, self.cursor)
        left = grace if passed is None else passed + grace - now
        if left <= 0:
            return False
        self._schedule(left)
        return True

    def _stream_fallback(self, reason: str) -> None:
        """A poll timer fired: with the stream up, it is a fallback (the stream said nothing)."""
        if self.stream is not None and self._stream_up and self.status == "ok":
            if self._gap_at != self.cursor:  # a gap's request is counted once, as a gap
                self._count_fallback(reason)
            self._fell_back = True
            self._set_source("rest")

    def _count_gap(self) -> None:
        if self._gap_at != self.cursor:  # once per candle, however many times REST is asked for it
            self._gap_at = self.cursor
            self._count_fallback("gap")

    def _count_fallback(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.stream_fallbacks.labels(self.key.exchange, reason).inc()

    def _on_audit(self) -> None:
        """Re-read over REST the candles stored since the last audit (and a little before): a
        revised candle or a missed message is corrected by the same idempotent write."""
        self.schedule(self.settings.audit_interval, _AUDIT)
        if self._audit_from is None or not self._idle_caught_up():
            return  # not live yet, or busy: the next one covers this stretch too
        tf = self.tf_ms
        lo = max(self.start_ms, self._audit_from - AUDIT_OVERLAP * tf, self.cursor - AUDIT_MAX * tf)
        if lo >= self.cursor:
            return
        self._audit_from = self.cursor
        self.log.debug("audit", audit_from=_iso(lo), audit_to=_iso(self.cursor))
        self.gaps_todo.append((lo, self.cursor))
        self._cancel_timer()
        self._next()

    def _observe_lag(self, rows: tuple[Candle, ...]) -> None:
        """Close-to-store lag of candles this series wrote itself, while caught up."""
        streamed, self._writing_streamed = self._writing_streamed, False
        if self.metrics is None or self.status not in ("ok", "retrying"):
            return
        now = self.runtime.wall()
        tf_s = self.tf_ms / 1000
        hist = self.metrics.close_to_store.labels(self.key.exchange, "stream" if streamed else "rest")
        for c in rows:
            lag = now - c[0] / 1000 - tf_s
            if 0 <= lag <= LIVE_LAG_S:
                hist.observe(lag)


def _iso(ms: int) -> str:
    """An open time as a UTC timestamp for log lines (not raw epoch ms)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
