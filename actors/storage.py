"""The storage actor: the one writer of the SQLite store.

Series tell it `Write`s; it batches every write already in its mailbox into one transaction
(a `Flush` it tells itself goes to the back of the mailbox), then acks each writer with
`Written`. A series moves its cursor only on that ack, so a write lost in a crash is simply
fetched again. The ack carries the store's generation: it changes whenever the database had
to be recreated (file deleted or corrupt) or this actor restarted, and a series that sees it
change re-reads its resume point, so the store is refilled instead of left with holes.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pykka

from ..supervisors.child import Child
from ..supervisors.clock import wall_ms
from ..supervisors.events import EventBus
from .messages import (
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
from .stores.errors import StoreError, StoreGone
from .stores.sqlite import Store


class _Flush:
    pass


class _CheckFile:
    pass


_FLUSH = _Flush()
_CHECK_FILE = _CheckFile()
CHECK_FILE_S = 2.0  # how often the database file is checked while idle (one stat)


class StorageActor(Child):
    def __init__(self, path: str, health: Any = None, *, candles: EventBus | None = None, metrics: Any = None) -> None:
        super().__init__()
        self.store = Store(path)
        self.health = health
        self.candles = candles
        self.metrics = metrics
        self._pending: list[Write] = []
        self._generations = itertools.count()
        self.generation = f"{uuid.uuid4().hex[:8]}-0"
        self.healthy = True
        # the series this incarnation has heard from, told when the store is recreated
        self._series: dict[SeriesKey, pykka.ActorRef[Any]] = {}

    def on_start(self) -> None:
        try:
            self.store.open()
        except StoreGone as exc:  # corrupt at start: move it aside and start a fresh file
            self.store.close()
            self._recover(exc)
        self._report(True, force=True)
        self.schedule(CHECK_FILE_S, _CHECK_FILE)

    def on_stop(self) -> None:
        if self._pending:
            self._flush()
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
        elif isinstance(message, ResumeQuery):
            self._series[message.key] = message.reply_to
            try:
                message.reply_to.tell(self._resume_point(message))
            except pykka.ActorDeadError:
                # the series stopped or restarted while its query waited here (a long queue at
                # start with 10,000 series, or a stop during start): its replacement asks again.
                # Raising would crash the store and make every series resync.
                self._series.pop(message.key, None)
        elif message is _CHECK_FILE:
            self.schedule(CHECK_FILE_S, _CHECK_FILE)
            if not self.store.check():
                self._recover(StoreGone(f"{self.store.path} was deleted or replaced while open"))
        else:
            return super().on_receive(message)
        return None

    # -- queries (asked through the proxy by the control plane and tests) -----------------

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
            return self._with_store(lambda: self.store.add_series(exchange, symbol, timeframe, at))
        return self._with_store(lambda: self.store.remove_series(exchange, symbol, timeframe, at))

    # -- internals -----------------------------------------------------------------------

    def _resume_point(self, q: ResumeQuery) -> ResumePoint:
        k = q.key

        def read() -> ResumePoint:
            last = self.store.last_ts(k.exchange, k.symbol, k.timeframe)
            missing: list[tuple[int, int]] = []
            if last is not None and last > q.start_ms:
                missing = self.store.missing_ranges(
                    k.exchange, k.symbol, k.timeframe, q.timeframe_ms, q.start_ms, last
                )
            return ResumePoint(last_ts=last, missing=tuple(missing), generation=self.generation)

        return self._with_store(read)

    def _with_store(self, fn: Any) -> Any:
        """Run a store call; if the file vanished or is corrupt, reopen a fresh one and retry once."""
        try:
            return fn()
        except StoreGone as exc:
            self._recover(exc)
            return fn()

    def _recover(self, exc: Exception) -> None:
        moved = self.store.reopen()
        self.generation = f"{self.generation.split('-')[0]}-{next(self._generations) + 1}"
        self.log.error("store_recreated", reason=str(exc), moved_aside=moved, generation=self.generation)
        for key, ref in list(self._series.items()):
            try:
                ref.tell(StoreChanged(self.generation))
            except pykka.ActorDeadError:
                del self._series[key]  # restarted: its replacement resumes from the store anyway

    def _flush(self) -> None:
        writes, self._pending = self._pending, []
        rows: list[Row] = []
        for w in writes:
            rows.extend(w.rows)
        error: str | None = None
        try:
            self._with_store(lambda: self._write(rows, writes))
        except (StoreError, OSError) as exc:  # e.g. disk full or read-only: ack with the error, series retry
            error = f"{type(exc).__name__}: {exc}"
            self.log.error("store_write_failed", error=error, rows=len(rows))
        self._report(error is None, error)
        for w in writes:
            if w.reply_to is not None:
                try:
                    w.reply_to.tell(Written(token=w.token, generation=self.generation, error=error))
                except pykka.ActorDeadError:
                    pass  # the series restarted meanwhile; it resumes from the store

    def _write(self, rows: list[Row], writes: list[Write]) -> None:
        fresh = self._not_yet_stored(writes) if self.candles is not None and self.candles.has_subscribers else None
        changed = self.store.upsert(rows)
        for w in writes:
            for gap in w.gaps:
                self.store.record_gap(*gap)
        if self.metrics is not None:
            self.metrics.candles_stored.inc(changed)
            for w in writes:
                if w.rows:
                    self.metrics.written(w.rows[0][0], len(w.rows))
        if fresh and self.candles is not None:
            for row in fresh:
                self.candles.publish(StoredCandle(*row))

    def _not_yet_stored(self, writes: list[Write]) -> list[Row]:
        """The rows of these writes that the store does not hold yet (one range per write, all
        ranges asked in a few statements: see `Store.stored_keys`)."""
        ranges = [(*w.rows[0][:3], w.rows[0][3], w.rows[-1][3] + 1) for w in writes if w.rows]
        have = self.store.stored_keys(ranges)
        return [r for w in writes for r in w.rows if r[:4] not in have]

    def _report(self, ok: bool, detail: str | None = None, *, force: bool = False) -> None:
        if (ok != self.healthy or force) and self.health is not None:
            self.health.tell(StorageStatus(ok=ok, detail=detail))
        self.healthy = ok
