"""The storage actor: the one writer of the store (SQLite, or PostgreSQL: `stores.base`).

Series tell it `Write`s; it batches every write already in its mailbox into one transaction
(a `Flush` it tells itself goes to the back of the mailbox), then acks each writer with
`Written`. A series moves its cursor only on that ack, so a write lost in a crash is simply
fetched again. The ack carries the store's generation: it changes whenever the database had
to be recreated (file deleted or corrupt) or this actor restarted, and a series that sees it
change re-reads its resume point, so the store is refilled instead of left with holes.

When the store cannot write (disk full, another process holding the lock, a read-only file,
an I/O error: `StoreUnavailable`, or any other `StoreError`) nothing crashes: the batch is
answered with the error (each series keeps its place and writes again), health is told
storage is failing (the notifier's alert follows from that), and the actor probes on a
backoff (0.5 s doubling to 5 s, scheduled messages, never a sleep). Writes that arrive while
failing wait for the next probe, which writes them for real: they are answered with the
outcome, so the first probe that succeeds stores them and ends the failure by itself. A resume
query that cannot be read waits for the next probe too; `latest` and the other questions get
the error at once. PostgreSQL's faults are the same exceptions (a server restarting or
unreachable, a lost connection, a read-only or full server: `StoreUnavailable`; a dropped table:
`StoreGone`, recreated by a reopen, a new generation), so they take the same paths.

Clustering (`fences` given): every write of a series (candles, confirmed gaps, gaps alone, an
operator's accepted gap) carries the writer's fencing token of its series (`actors.fencing`),
checked by the database in the write's own transaction. A write
whose lease has moved to another node (or that this node no longer holds at all) is refused:
nothing of it is stored, the series is answered with the refusal, the refusal is counted
(`candlekeeper_refused_writes_total`) and the cluster actor is told (`LeaseLost`), which
stops the series here.

Every row the store inserts or changes counts as stored; a row it held before with other values
(a later answer corrected a candle) also counts as corrected, and says so in a log line.
Subscribers get each candle once, when it is first stored.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast

import pykka

from ..supervisors.child import Address, Child
from ..supervisors.clock import wall_ms
from ..supervisors.events import EventBus
from ..supervisors.scheduler import Timer
from .fencing import Fences, LeaseNotHeld
from .market.gaps import OPERATOR_ACCEPTED, add_gaps
from .messages import (
    AcceptedGaps,
    AcceptedGapsQuery,
    LeaseLost,
    ResumePoint,
    ResumeQuery,
    Row,
    SeriesKey,
    StorageStatus,
    StoreChanged,
    StoredCandle,
    Write,
    Written,
)
from .stores import sqlite as sqlite_store
from .stores.base import make_store
from .stores.errors import StoreError, StoreGone, StoreUnavailable

T = TypeVar("T")


class _Flush:
    pass


class _CheckFile:
    pass


class _Probe:
    pass


_FLUSH = _Flush()
_CHECK_FILE = _CheckFile()
_PROBE = _Probe()
CHECK_FILE_S = 2.0  # how often the database is checked while idle (a stat, or one round trip)
PROBE_FIRST_S = 0.5  # first retry after the store failed; doubles while it keeps failing
PROBE_MAX_S = 5.0  # the longest wait between retries: how late recovery is noticed at most
# While failing, a write waits this long (not sqlite's BUSY_TIMEOUT_S) for another process's lock, so
# the mailbox keeps answering resume queries and `latest` between probes.
PROBE_BUSY_S = 1.0


class StorageActor(Child):
    """`path`: a SQLite file or a ``postgresql://`` URL (`stores.base.make_store`, with
    `store_options`); `fences` and `cluster` only when clustering."""

    def __init__(
        self, path: str, health: Any = None, *, candles: EventBus | None = None, metrics: Any = None,
        fences: Fences | None = None, cluster: Address | None = None, store_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.store = make_store(path, **(store_options or {}))
        self.fences = fences
        self.cluster = cluster
        self.health = health
        self.candles = candles
        self.metrics = metrics
        self._pending: list[Write] = []
        self._generations = itertools.count()
        self.generation = f"{uuid.uuid4().hex[:8]}-0"
        self.healthy = True  # what health was last told
        # the series this incarnation has heard from, told when the store is recreated
        self._series: dict[SeriesKey, pykka.ActorRef[Any]] = {}
        # -- while the store fails --
        self.failing: str | None = None  # the error, while the store cannot write
        self._probe_delay = PROBE_FIRST_S
        self._probe_timer: Timer | None = None
        self._held: dict[tuple[str | None, int], Write] = {}  # writes for the next probe, by writer and token
        self._held_queries: dict[SeriesKey, ResumeQuery] = {}  # resume queries that could not be read
        self._reopen = False  # the next probe reopens the connection first (read-only, I/O, closed)
        self._resync = False  # the file was lost: the next open store is a new generation

    def on_start(self) -> None:
        try:
            self.store.open()
        except StoreGone as exc:  # corrupt at start: move it aside and start a fresh file
            self.store.close()
            try:
                self._recover(exc)
            except StoreError as err:
                self._fail(err)
        except StoreError as exc:  # e.g. locked or full while the schema is checked: probe later
            self._fail(exc)
        if self.failing is None:
            try:  # a read-only or full store opens fine: find out now, not at the first write
                self._briefly(self.store.probe_write)
            except StoreError as exc:
                self._fail(exc)
        self._report(force=True)
        self.schedule(CHECK_FILE_S, _CHECK_FILE)

    def on_stop(self) -> None:
        writes = list(self._held.values()) + self._pending
        self._held, self._pending = {}, []
        if writes:
            self._attempt(writes)  # one last try; every writer is answered either way
        self.store.close()

    def on_failure(self, *_: Any) -> None:
        self.store.close()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Write):
            if not self._pending:
                self.actor_ref.tell(_FLUSH)
            self._pending.append(message)
        elif message is _FLUSH:
            self._flush()
        elif isinstance(message, AcceptedGapsQuery):
            self._answer_accepted(message)
        elif isinstance(message, ResumeQuery):
            self._series[message.key] = message.reply_to
            self._answer_resume(message)
        elif message is _PROBE:
            self._probe()
        elif message is _CHECK_FILE:
            self.schedule(CHECK_FILE_S, _CHECK_FILE)
            self._check_store()
        else:
            return super().on_receive(message)
        return None

    # -- queries (asked through the proxy by the control plane and tests) -----------------
    # A store that cannot answer raises a StoreError back to the asker (an ask's failure is
    # the asker's, not a crash of this actor).

    def latest(self, exchange: str, symbol: str, timeframe: str, n: int = 1) -> list[tuple[Any, ...]]:
        return self._with_store(lambda: self.store.latest(exchange, symbol, timeframe, n))

    def last_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None:
        return self._with_store(lambda: self.store.last_ts(exchange, symbol, timeframe))

    def count(self, exchange: str, symbol: str, timeframe: str) -> int:
        return self._with_store(lambda: self.store.count(exchange, symbol, timeframe))

    def set_series_active(self, exchange: str, symbol: str, timeframe: str, active: bool) -> bool:
        """Persist a run-time `add` (active) or `remove` so a restart keeps it."""
        at = wall_ms(self.runtime.wall)
        if active:
            return self._ask_write(lambda: self.store.add_series(exchange, symbol, timeframe, at))
        return self._ask_write(lambda: self.store.remove_series(exchange, symbol, timeframe, at))

    def accept_gap(self, exchange: str, symbol: str, timeframe: str, start_ms: int, end_ms: int) -> None:
        """Record an operator's accepted gap (`ctl accept-gap`): [start_ms, end_ms) is confirmed
        empty, never fetched again (a refusal carries the store's error, as for `add`).
        Clustering: a write of the series like any other, fenced by this node's token in its
        own transaction; `LeaseNotHeld` (naming the owner) when this node does not hold it."""
        gap = (exchange, symbol, timeframe, start_ms, end_ms, OPERATOR_ACCEPTED)
        if self.fences is None:
            self._ask_write(lambda: self.store.record_gap(*gap))
            return
        from .stores.postgres import PostgresStore

        store = cast(PostgresStore, self.store)
        key = (exchange, symbol, timeframe)
        token = self.fences.get(key)
        if token is not None:
            result = self._ask_write(lambda: store.upsert([], fence={key: token}, gaps=[gap]))
            if not result.refused:
                return
            self._refused([Write(rows=(), gaps=(gap,), token=0, reply_to=None)],
                          {0: f"refused: the lease of {_name(key)} moved to another node"
                              f" (fencing token {token} is stale)"}, {key: token})
        owner = self._with_store(lambda: store.owner_of(key))
        where = f"node {owner!r} owns it" if owner else "no node holds its lease right now"
        raise LeaseNotHeld(f"this node does not hold the lease of {_name(key)} ({where}):"
                           " accept the gap on the node that runs the series")

    def status(self) -> dict[str, Any]:
        """Whether the store can write now, and why not."""
        return {"ok": self.failing is None, "detail": self.failing, "held_writes": len(self._held),
                "generation": self.generation, "store": self.store.path}

    def sync(self) -> None:
        """Write the writes already received now (the cluster actor asks this after stopping a
        series and before releasing its lease, so nothing it wrote is refused as stale)."""
        self._flush()

    def _ask_write(self, fn: Callable[[], T]) -> T:
        """An operator's write: refused with the store's error, which is also storage failing (a
        read that fails is only the asker's answer: the next write or probe judges the store)."""
        try:
            return self._with_store(fn)
        except StoreUnavailable as exc:
            self._fail(exc)
            raise

    # -- resume points ---------------------------------------------------------------------

    def _answer_resume(self, q: ResumeQuery) -> bool:
        """Answer a resume query, or keep it for the next probe when the store cannot be read.
        False when it could not be read."""
        try:
            point = self._resume_point(q)
        except StoreError as exc:
            self._held_queries[q.key] = q
            self._fail(exc)
            return False
        self._held_queries.pop(q.key, None)
        try:
            q.reply_to.tell(point)
        except pykka.ActorDeadError:
            # the series stopped or restarted while its query waited here (a long queue at
            # start with 10,000 series, or a stop during start): its replacement asks again.
            # Raising would crash the store and make every series resync.
            self._series.pop(q.key, None)
        return True

    def _resume_point(self, q: ResumeQuery) -> ResumePoint:
        k = q.key

        def read() -> ResumePoint:
            last = self.store.last_ts(k.exchange, k.symbol, k.timeframe)
            missing: list[tuple[int, int]] = []
            if last is not None and last > q.start_ms:
                missing = self.store.missing_ranges(
                    k.exchange, k.symbol, k.timeframe, q.timeframe_ms, q.start_ms, last
                )
            totals = add_gaps({}, self.store.gap_reasons(k.exchange, k.symbol, k.timeframe), q.timeframe_ms)
            return ResumePoint(last_ts=last, missing=tuple(missing), generation=self.generation,
                               gap_totals=tuple((why, n, candles) for why, (n, candles) in totals.items()))

        return self._with_store(read)

    def _answer_accepted(self, q: AcceptedGapsQuery) -> None:
        """The stretches an operator accepted as lost that end after `q.after_ms`: a series whose
        candles fail validation asks, to leave them out of its requests (best effort: a store
        that cannot answer now answers none, and the series asks again at its next failure)."""
        k = q.key
        try:
            gaps = self._with_store(lambda: self.store.gap_reasons(k.exchange, k.symbol, k.timeframe))
        except StoreError as exc:
            self.log.info("accepted_gaps_unreadable", series=str(k), error=str(exc))
            gaps = []
        try:
            q.reply_to.tell(AcceptedGaps(tuple((lo, hi) for lo, hi, why in gaps
                                               if why == OPERATOR_ACCEPTED and hi > q.after_ms)))
        except pykka.ActorDeadError:
            pass  # restarted meanwhile: the new incarnation asks when it needs to

    # -- the store lost, recreated ---------------------------------------------------------

    def _check_store(self) -> None:
        """The periodic check: a file deleted or replaced, a table dropped (recover: a new
        generation), a server that cannot be reached (failing, probed on the backoff)."""
        if not self.store.is_open:
            return
        try:
            self.store.verify()
        except StoreGone as exc:
            try:
                self._recover(exc)
            except StoreError as err:
                self._fail(err)
        except StoreError as exc:
            self._fail(exc)

    def _with_store(self, fn: Callable[[], T]) -> T:
        """Run a store call; if the file vanished or is corrupt, reopen a fresh one and retry once."""
        try:
            return fn()
        except StoreGone as exc:
            self._recover(exc)
            return fn()

    def _recover(self, exc: Exception) -> None:
        """Reopen after the file was lost (a fresh file, or the corrupt one moved aside): a new
        generation. Raises StoreError when no file can be opened; the probe tries again."""
        try:
            moved = self.store.reopen()
        except StoreError:
            self._resync = True  # whatever the probe opens later is not what series remember
            raise
        self._new_generation(str(exc), moved)

    def _new_generation(self, reason: str, moved: str | None) -> None:
        self._resync = False
        self.generation = f"{self.generation.split('-')[0]}-{next(self._generations) + 1}"
        self.log.error("store_recreated", reason=reason, moved_aside=moved, generation=self.generation)
        for key, ref in list(self._series.items()):
            try:
                ref.tell(StoreChanged(self.generation))
            except pykka.ActorDeadError:
                del self._series[key]  # restarted: its replacement resumes from the store anyway

    # -- writing ---------------------------------------------------------------------------

    def _flush(self) -> None:
        writes, self._pending = self._pending, []
        if not writes:
            return
        if self.failing is not None:
            for w in writes:  # written for real by the next probe; a resent write is kept once
                self._held[(w.reply_to.actor_urn if w.reply_to is not None else None, w.token)] = w
            return
        self._attempt(writes)

    def _attempt(self, writes: list[Write]) -> bool:
        """Write these in one batch and answer each writer; True when stored (refused writes
        included: the store did its job, their series are told why)."""
        error: str | None = None
        refused: dict[int, str] = {}
        try:
            refused = self._with_store(lambda: self._write(writes))
        except StoreError as exc:  # disk full, locked, read-only...: ack with the error, series retry
            error = self._fail(exc)
            self.log.error("store_write_failed", error=error, rows=sum(len(w.rows) for w in writes))
        else:
            self._recovered()
        self._answer(writes, error, refused)
        return error is None

    def _answer(self, writes: list[Write], error: str | None, refused: dict[int, str] | None = None) -> None:
        for i, w in enumerate(writes):
            if w.reply_to is not None:
                why = refused.get(i) if refused else None
                try:
                    w.reply_to.tell(Written(token=w.token, generation=self.generation, error=why or error))
                except pykka.ActorDeadError:
                    pass  # the series restarted meanwhile; it resumes from the store

    def _write(self, writes: list[Write]) -> dict[int, str]:
        """Store the batch; returns the writes refused for want of a current fencing token (by
        index, with why). Without fences nothing is refused."""
        refused: dict[int, str] = {}
        fence: dict[tuple[str, str, str], int] | None = None
        if self.fences is not None:
            tokens = self.fences.snapshot()
            fence = {}
            for i, w in enumerate(writes):
                key = _key_of(w)
                if key is None:
                    continue
                if key in tokens:
                    fence[key] = tokens[key]
                else:
                    refused[i] = f"refused: this node holds no lease of {_name(key)} (another node owns it)"
        live = [w for i, w in enumerate(writes) if i not in refused]
        rows: list[Row] = [r for w in live for r in w.rows]
        publish = self.candles is not None and self.candles.has_subscribers
        # what the store held before: new rows go to subscribers, the other changed ones are corrections
        have = self._stored_before(live) if rows and (publish or self.metrics is not None) else None
        if fence is None:
            # the gaps in the candles' transaction: a reader sees both or neither
            changed = self.store.upsert(rows, gaps=[g for w in live for g in w.gaps])
        elif fence:
            from .stores.postgres import PostgresStore

            # the gaps go in the candles' transaction: fenced by the same check
            result = cast(PostgresStore, self.store).upsert(rows, fence=fence, gaps=[g for w in live for g in w.gaps])
            changed = result.changed
            for i, w in enumerate(writes):
                key = _key_of(w)
                if i not in refused and key in result.refused:
                    assert key is not None
                    refused[i] = (f"refused: the lease of {_name(key)} moved to another node"
                                  f" (fencing token {fence[key]} is stale)")
        else:
            changed = 0
        stored = [w for i, w in enumerate(writes) if i not in refused]
        if have is not None:
            stored_rows = rows if len(stored) == len(live) else [r for w in stored for r in w.rows]
            corrected = changed - _new_rows(stored, stored_rows, have)
            if corrected > 0:
                self.log.info("candles_corrected", count=corrected,
                              reason="a later answer had other values for candles already stored")
                if self.metrics is not None:
                    self.metrics.candles_corrected.inc(corrected)
        if self.metrics is not None:
            self.metrics.candles_stored.inc(changed)
            for i, w in enumerate(writes):
                if w.rows and i not in refused:
                    self.metrics.written(w.rows[0][0], len(w.rows))
        if publish and have is not None and self.candles is not None:
            for w in stored:
                for row in w.rows:
                    if not have or row[:4] not in have:
                        self.candles.publish(StoredCandle(*row))
        if refused:
            self._refused(writes, refused, fence or {})
        return refused

    def _refused(self, writes: list[Write], refused: dict[int, str], fence: dict[tuple[str, str, str], int]) -> None:
        """Count the refusals, say so, and tell the cluster actor to let those series go."""
        keys = sorted({k for i in refused if (k := _key_of(writes[i])) is not None})
        if self.fences is not None:
            self.fences.count_refused(len(refused))
            # what comes next for them is refused here, not by the database
            self.fences.drop_stale({k: fence[k] for k in keys if k in fence})
        if self.metrics is not None:
            self.metrics.refused_writes.inc(len(refused))
        self.log.warning("writes_refused", writes=len(refused), count=len(keys),
                         series=[_name(k) for k in keys[:10]], reason=next(iter(refused.values())))
        if self.cluster is not None:
            self.cluster.tell(LeaseLost(tuple(SeriesKey(*k) for k in keys)))

    def _stored_before(self, writes: list[Write]) -> set[tuple[str, str, str, int]]:
        """The keys of these writes' rows that the store holds already (one range per write, all
        ranges asked in a few statements: see `Store.stored_keys`)."""
        ranges = [(*w.rows[0][:3], w.rows[0][3], w.rows[-1][3] + 1) for w in writes if w.rows]
        return self.store.stored_keys(ranges)

    # -- failing and recovering ------------------------------------------------------------

    def _fail(self, exc: StoreError) -> str:
        """The store cannot do its job: say so once, and probe on a backoff. Returns the error text."""
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, StoreUnavailable) or exc.needs_reopen or not self.store.is_open:
            self._reopen = True  # SQLite keeps a read-only connection read-only: open a new one
        first = self.failing is None
        self.failing = error
        if first:
            self.log.error("storage_failing", error=error)
            self._probe_delay = PROBE_FIRST_S
            self._set_busy_timeout(PROBE_BUSY_S)
        if self._probe_timer is None:
            # Said again at every probe, not only on the change: a report told before health was
            # up (a store failing at start) or while it restarted is not lost for long.
            self._report(force=True)
            self._probe_timer = self.schedule(self._probe_delay, _PROBE)
            self._probe_delay = min(PROBE_MAX_S, self._probe_delay * 2)
        return error

    def _recovered(self) -> None:
        if self.failing is None:
            return
        self.log.info("storage_recovered", was=self.failing)
        self.failing = None
        self._probe_delay = PROBE_FIRST_S
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        self._set_busy_timeout(sqlite_store.BUSY_TIMEOUT_S)
        self._report()

    def _probe(self) -> None:
        """Try again: reopen if needed, write what waited (or a no-op write), answer what waited."""
        self._probe_timer = None
        if self.failing is None:
            return
        writes = list(self._held.values())
        self._held = {}
        if self._reopen or not self.store.is_open:
            try:
                old = self.store.identity
                moved = self.store.reopen()
                self._reopen = False
                if self._resync or moved is not None or (old is not None and self.store.identity != old):
                    self._new_generation("reopened after failing", moved)
            except StoreError as exc:
                error = self._fail(exc)
                self._answer(writes, error)
                return
        if writes:
            self._attempt(writes)
        else:
            try:
                self._with_store(self.store.probe_write)
            except StoreError as exc:
                self._fail(exc)
            else:
                self._recovered()
        for q in list(self._held_queries.values()):
            if not self._answer_resume(q):
                break

    def _briefly(self, fn: Callable[[], T]) -> T:
        """Run a store call with the short busy timeout: a lock held elsewhere fails it in a second."""
        self._set_busy_timeout(PROBE_BUSY_S)
        try:
            return fn()
        finally:
            self._set_busy_timeout(sqlite_store.BUSY_TIMEOUT_S if self.failing is None else PROBE_BUSY_S)

    def _set_busy_timeout(self, seconds: float) -> None:
        try:
            self.store.set_busy_timeout(seconds)
        except StoreError:
            pass  # the connection is in trouble anyway; the next open uses the new value

    def _report(self, *, force: bool = False) -> None:
        ok = self.failing is None
        if (ok != self.healthy or force) and self.health is not None:
            self.health.tell(StorageStatus(ok=ok, detail=self.failing))
        self.healthy = ok


def _key_of(w: Write) -> tuple[str, str, str] | None:
    """The series a write is of (one write is always of one series)."""
    if w.rows:
        e, s, t = w.rows[0][:3]
        return (e, s, t)
    if w.gaps:
        e, s, t = w.gaps[0][:3]
        return (e, s, t)
    return None


def _name(key: tuple[str, str, str]) -> str:
    return f"{key[0]}:{key[1]}@{key[2]}"


def _new_rows(writes: list[Write], rows: list[Row], have: set[tuple[str, str, str, int]]) -> int:
    """How many distinct candles of these writes the store did not hold (`have`: the stored keys
    in their ranges). A write's rows are distinct and ascending; two writes of one series may
    overlap (a write resent while the store was failing). Cheap in the common cases, a backfill
    of new candles (nothing stored there) and polls (a row or two): no key set of every row."""
    spans: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for w in writes:
        if w.rows:
            spans.setdefault(w.rows[0][:3], []).append((w.rows[0][3], w.rows[-1][3]))
    for ranges in spans.values():
        ranges.sort()
        if any(later[0] <= earlier[1] for earlier, later in itertools.pairwise(ranges)):
            return len({r[:4] for r in rows} - have)
    if not have:
        return len(rows)
    return sum(1 for r in rows if r[:4] not in have)

