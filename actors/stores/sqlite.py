"""SQLite candle store: the plain class the storage actor owns.

One writer (the storage actor's thread) holds a read-write ``Store``; any other
thread that wants to read (health checks, ``latest``) opens its own
``Store(path, readonly=True)``. WAL mode lets those readers run while the
writer commits.

The store never logs and never retries by itself, and no ``sqlite3`` error
ever leaves it: each is mapped onto ``candlekeeper.actors.stores.errors``.
``StoreGone`` (the file was deleted or replaced under us) or its subclass
``StoreCorrupt`` (the file is not a usable database) ask for ``reopen()``,
which starts a fresh file so ingestion can refill it::

    try:
        store.upsert(rows)
    except StoreGone as exc:          # also StoreCorrupt, from open() too
        moved = store.reopen()        # path of the corrupt file moved aside, or None
        log.error("store_reopened", reason=str(exc), moved_to=moved)
        store.upsert(rows)

``StoreUnavailable`` (disk full, locked by another process, read-only, an I/O
error on a file that is still ours) means "not now": nothing needs
recreating, the same write succeeds once the cause goes away (its ``reason``
says which, and whether the connection should be reopened first).
Anything else is a plain ``StoreError``.
"""

from __future__ import annotations

import errno
import functools
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from ..market.candles import Candle, GapRow, Row
from .coverage import Coverage
from .errors import StoreCorrupt, StoreError, StoreGone, StoreUnavailable
from .ranges import append_range, subtract_ranges

__all__ = ["Coverage", "Store", "StoreCorrupt", "StoreError", "StoreGone", "StoreUnavailable"]


# WITHOUT ROWID: the primary key *is* the table, so inserts touch one b-tree
# instead of two, range scans by (series, ts) are clustered and the file is
# about a third smaller. Columns and key are exactly the contract.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS candles (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    ts INTEGER NOT NULL,
    open REAL NOT NULL,
    high REAL NOT NULL,
    low REAL NOT NULL,
    close REAL NOT NULL,
    volume REAL NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    ts_from INTEGER NOT NULL,
    ts_to INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT 'exchange_hole',
    PRIMARY KEY (exchange, symbol, timeframe, ts_from)
);
CREATE TABLE IF NOT EXISTS series (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (exchange, symbol, timeframe)
);
"""

# Rewrite a row only when a value changed: re-fetched closed candles (the
# common case) then cost a key lookup, not a page write, and the rowcount
# tells how many rows really changed.
_UPSERT = (
    "INSERT INTO candles (exchange, symbol, timeframe, ts, open, high, low, close, volume)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (exchange, symbol, timeframe, ts) DO UPDATE SET"
    " open = excluded.open, high = excluded.high, low = excluded.low,"
    " close = excluded.close, volume = excluded.volume"
    " WHERE open IS NOT excluded.open OR high IS NOT excluded.high"
    " OR low IS NOT excluded.low OR close IS NOT excluded.close"
    " OR volume IS NOT excluded.volume"
)

_SERIES = "exchange = ? AND symbol = ? AND timeframe = ?"

# Rows per multi-row statement. One statement runs in one sqlite3_step call; executemany steps
# once per row, and every step releases and retakes the GIL: with thousands of busy actor
# threads, retaking it can wait a whole switch interval (5 ms), so a flush of a few thousand
# one-candle writes took seconds. 500 rows x 9 values stays under SQLite's default variable
# limit (32766 since 3.32); older libraries get smaller chunks (see _chunk_rows).
_CHUNK_ROWS = 500


@functools.lru_cache(maxsize=16)
def _upsert_many(n: int) -> str:
    """_UPSERT for n rows in one statement (same conflict rule, same changes count)."""
    head, _, tail = _UPSERT.partition(" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    return head + " VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?)"] * n) + tail


@functools.lru_cache(maxsize=16)
def _stored_many(n: int) -> str:
    """The stored open times of n (series, ts range)s, in one compound statement."""
    one = "SELECT exchange, symbol, timeframe, ts FROM candles WHERE " + _SERIES + " AND ts >= ? AND ts < ?"
    return " UNION ALL ".join([one] * n)

# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_ERROR = 1
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_NOMEM = 7
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_PROTOCOL = 15
_SQLITE_NOLFS = 22
_SQLITE_NOTADB = 26
_SQLITE_READONLY_DBMOVED = 1032

# Failures that are about the world outside the process and may pass by themselves: the data
# is kept and written again later (see StoreUnavailable).
_UNAVAILABLE = {
    _SQLITE_FULL: "full",
    _SQLITE_BUSY: "locked",  # another connection holds the write lock past our busy timeout
    _SQLITE_LOCKED: "locked",
    _SQLITE_PROTOCOL: "locked",  # WAL lock protocol race with another process
    _SQLITE_READONLY: "readonly",
    _SQLITE_PERM: "readonly",
    _SQLITE_IOERR: "io",
    _SQLITE_CANTOPEN: "io",  # e.g. the -wal or -shm file cannot be opened
    _SQLITE_NOMEM: "io",
    _SQLITE_NOLFS: "io",
}
_WHY = {
    "full": "cannot grow: disk or quota full",
    "locked": "is locked by another process",
    "readonly": "is read-only",
    "io": "had an I/O error",
}
# By message, for a library that does not say its error code.
_BY_TEXT = (
    ("disk is full", "full"),
    ("database is locked", "locked"),
    ("table is locked", "locked"),
    ("readonly database", "readonly"),
    ("disk I/O error", "io"),
    ("unable to open", "io"),
)

#: How long a write waits for another connection's lock before it fails as ``locked``.
BUSY_TIMEOUT_S = 5.0


def _code(exc: sqlite3.Error) -> int | None:
    return getattr(exc, "sqlite_errorcode", None)


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "full"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "readonly"
    return "io"


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = _code(exc)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _unavailable_reason(exc: sqlite3.Error) -> str | None:
    code = _code(exc)
    if code is not None:
        return _UNAVAILABLE.get(code & 0xFF)
    text = str(exc)
    return next((reason for needle, reason in _BY_TEXT if needle in text), None)


class Store:
    """Candles, genuine exchange gaps and run-time series in one SQLite file.

    Not thread-safe: use one ``Store`` per thread. ``path`` may be
    ``":memory:"`` for tests. ``readonly=True`` opens with ``mode=ro`` and
    never creates or changes anything.
    """

    def __init__(
        self, path: str | os.PathLike[str], readonly: bool = False, *, busy_timeout: float | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        # None: BUSY_TIMEOUT_S as it is when the store is made (tests shorten it)
        self.busy_timeout = BUSY_TIMEOUT_S if busy_timeout is None else busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._corrupt = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def memory(self) -> bool:
        return self.path in (":memory:", "")

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def open(self) -> Store:
        """Connect and create the schema idempotently.

        Raises StoreCorrupt if the file is not a database (``reopen()`` then
        moves it aside), StoreUnavailable if it cannot be opened for a reason
        that may pass (full, locked, I/O), StoreError if it cannot be opened.
        """
        if self._conn is not None:
            return self
        self._corrupt = False
        try:
            if self.readonly:
                uri = "file:" + quote(str(Path(self.path).absolute())) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                       check_same_thread=False, timeout=self.busy_timeout)
            else:
                if not self.memory:
                    parent = os.path.dirname(os.path.abspath(self.path))
                    os.makedirs(parent, exist_ok=True)
                conn = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=self.busy_timeout)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            if self.readonly:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            else:
                conn.execute("PRAGMA journal_mode=WAL").fetchone()
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                _migrate(conn)
            self._identity = self._stat()
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error) and _is_corrupt(exc):
                self._corrupt = True
                raise StoreCorrupt(f"{self.path} is not a usable database: {exc}") from exc
            reason = _unavailable_reason(exc) if isinstance(exc, sqlite3.Error) else None
            if reason is not None:
                raise StoreUnavailable(f"cannot open {self.path}: {exc}", reason) from exc
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._conn = conn
        return self

    def close(self) -> None:
        """Close the connection; errors are swallowed since the file may be gone."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    @property
    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file as it was opened: changes when it is replaced."""
        return self._identity

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a statement waits for another connection's lock before failing as
        ``locked``; for this connection and the next ones this store opens."""
        self.busy_timeout = seconds
        if self._conn is not None:
            try:
                self._conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._conn else "closed"
        mode = "ro" if self.readonly else "rw"
        return f"<Store {self.path!r} {mode} {state}>"

    # -- resilience --------------------------------------------------------

    def _stat(self) -> tuple[int, int] | None:
        if self.memory:
            return None
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino)

    def check(self) -> bool:
        """True if the file at ``path`` is still the one we have open (one ``stat``)."""
        if self._conn is None:
            return False
        if self.memory:
            return True
        try:
            return self._stat() == self._identity
        except OSError:
            return False

    def verify(self) -> None:
        """Raise StoreGone when the file at ``path`` is not the one we have open (deleted or
        replaced); a store that is not open is not verified."""
        if self._conn is not None and not self.check():
            raise StoreGone(f"{self.path} was deleted or replaced while open")

    def reopen(self) -> str | None:
        """Close and open again, starting a fresh file if the old one is gone or corrupt.

        Returns the path the corrupt file was moved aside to, or None. If the
        file was deleted or replaced, the old database's ``-wal``/``-shm`` are
        removed first: SQLite would otherwise replay our stale WAL into the
        new file. A replacement must therefore be a cleanly closed database.
        Raises what ``open()`` raises, and StoreUnavailable when the files
        cannot be moved or removed (a read-only or full filesystem).
        """
        try:
            return self._reopen()
        except OSError as exc:
            raise StoreUnavailable(f"cannot reopen {self.path}: {exc}", _os_reason(exc)) from exc

    def _reopen(self) -> str | None:
        old = self._identity
        self.close()
        moved = None
        if self.memory:
            self.open()
            return None
        if self._corrupt:
            moved = self._move_aside()
        else:
            try:
                replaced = old is not None and self._stat() != old
            except FileNotFoundError:
                replaced = True
            if replaced:
                self._remove_side_files()
        try:
            self.open()
        except StoreCorrupt:
            if self.readonly:
                raise
            moved = self._move_aside()
            self.open()
        return moved

    def _remove_side_files(self) -> None:
        if self.readonly:
            return
        for suffix in ("-wal", "-shm"):
            try:
                os.remove(self.path + suffix)
            except FileNotFoundError:
                pass

    def _move_aside(self) -> str | None:
        if self.readonly:
            raise StoreCorrupt(f"{self.path} is corrupt and this store is read-only")
        base = f"{self.path}.corrupt-{int(time.time())}"
        target, n = base, 1
        while os.path.exists(target):
            target, n = f"{base}.{n}", n + 1
        moved = None
        if os.path.exists(self.path):
            os.replace(self.path, target)
            moved = target
        for suffix in ("-wal", "-journal"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, target + suffix)
        try:
            os.remove(self.path + "-shm")
        except FileNotFoundError:
            pass
        self._corrupt = False
        return moved

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The connection, after a cheap identity check; translates SQLite errors."""
        conn = self._conn
        if conn is None:
            raise StoreError(f"store {self.path} is not open")
        if not self.memory and not self.check():
            raise StoreGone(f"{self.path} was deleted or replaced while open")
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        """The store's exception for a SQLite error: what the caller can do about it."""
        if _is_corrupt(exc):
            self._corrupt = True
            return StoreCorrupt(f"{self.path} is corrupt: {exc}")
        code = _code(exc)
        if code == _SQLITE_READONLY_DBMOVED:
            return StoreGone(f"{self.path} is gone: {exc}")
        if "no such table" in str(exc):  # emptied or replaced by a database without our schema
            return StoreGone(f"{self.path} lost its schema: {exc}")
        reason = _unavailable_reason(exc)
        if reason is not None and self.readonly:
            return StoreError(f"{self.path}: this store is read-only: {exc}")
        if reason in ("io", "readonly") and not self.memory and not self.check():
            return StoreGone(f"{self.path} is gone: {exc}")  # the error came from losing the file
        if reason is not None:
            return StoreUnavailable(f"{self.path} {_WHY[reason]}: {exc}", reason)
        return StoreError(f"{self.path}: {exc}")

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._db() as conn:
            return conn.execute(sql, params)

    # -- candles -----------------------------------------------------------

    def upsert(self, rows: Sequence[Row], *, gaps: Sequence[GapRow] = ()) -> int:
        """Insert or correct candles, and record confirmed ``gaps`` (as ``record_gap``), in one
        transaction; returns candle rows inserted or changed. (A reader never sees the candles
        after a gap without the gap's record.)

        Idempotent: writing the same rows again changes nothing and returns 0.
        StoreGone means the rows may not be stored: reopen() and write them again.
        """
        for g in gaps:
            if g[4] <= g[3]:
                raise ValueError(f"empty gap [{g[3]}, {g[4]})")
        if not rows and not gaps:
            return 0
        with self._db() as conn, _transaction(conn):
            changed = 0
            step = _chunk_rows(conn, 9)
            for i in range(0, len(rows), step):
                chunk = rows[i : i + step]
                cur = conn.execute(_upsert_many(len(chunk)), [v for row in chunk for v in row])
                changed += cur.rowcount
            for g in gaps:
                conn.execute(_RECORD_GAP, g)
        # SQLite writes on into a deleted file's WAL without complaint, so look
        # again: if the file went away during the batch, the batch is lost.
        if not self.memory and not self.check():
            raise StoreGone(
                f"{self.path} was deleted or replaced during the write;"
                " write again after reopen()"
            )
        return changed

    def probe_write(self) -> None:
        """Commit a write that changes nothing (the header's user_version, rewritten as it is):
        raises StoreUnavailable when the store cannot write now (read-only, locked, full)."""
        with self._db() as conn, _transaction(conn, "BEGIN IMMEDIATE"):
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute(f"PRAGMA user_version = {version}")

    def last_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None:
        """Open time of the newest stored candle, or None."""
        with self._db() as conn:
            return conn.execute(
                f"SELECT max(ts) FROM candles WHERE {_SERIES}", (exchange, symbol, timeframe)
            ).fetchone()[0]

    def first_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None:
        """Open time of the oldest stored candle, or None."""
        with self._db() as conn:
            return conn.execute(
                f"SELECT min(ts) FROM candles WHERE {_SERIES}", (exchange, symbol, timeframe)
            ).fetchone()[0]

    def count(
        self,
        exchange: str,
        symbol: str,
        timeframe: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> int:
        """Number of stored candles of a series, optionally with open time in [start_ms, end_ms)."""
        lo = start_ms if start_ms is not None else -(2**63)
        hi = end_ms if end_ms is not None else 2**63 - 1
        with self._db() as conn:
            return conn.execute(
                f"SELECT count(*) FROM candles WHERE {_SERIES} AND ts >= ? AND ts < ?",
                (exchange, symbol, timeframe, lo, hi),
            ).fetchone()[0]

    def stored_keys(self, ranges: Sequence[tuple[str, str, str, int, int]]) -> set[tuple[str, str, str, int]]:
        """(exchange, symbol, timeframe, ts) of the stored candles in each (exchange, symbol,
        timeframe, start_ms, end_ms) range: one statement per 100 ranges, not one per range."""
        out: set[tuple[str, str, str, int]] = set()
        with self._db() as conn:
            step = min(100, _chunk_rows(conn, 5))  # also under SQLite's 500-term compound limit
            for i in range(0, len(ranges), step):
                chunk = ranges[i : i + step]
                out.update(conn.execute(_stored_many(len(chunk)), [v for r in chunk for v in r]))
        return out

    def latest(self, exchange: str, symbol: str, timeframe: str, n: int = 1) -> list[Candle]:
        """The ``n`` newest candles as (ts, open, high, low, close, volume), newest first."""
        with self._db() as conn:
            return conn.execute(
                "SELECT ts, open, high, low, close, volume FROM candles"
                f" WHERE {_SERIES} ORDER BY ts DESC LIMIT ?",
                (exchange, symbol, timeframe, n),
            ).fetchall()

    def candles(
        self,
        exchange: str,
        symbol: str,
        timeframe: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[Candle]:
        """Candles with open time in [start_ms, end_ms), oldest first."""
        lo = start_ms if start_ms is not None else -(2**63)
        hi = end_ms if end_ms is not None else 2**63 - 1
        with self._db() as conn:
            return conn.execute(
                "SELECT ts, open, high, low, close, volume FROM candles"
                f" WHERE {_SERIES} AND ts >= ? AND ts < ? ORDER BY ts",
                (exchange, symbol, timeframe, lo, hi),
            ).fetchall()

    def missing_ranges(
        self,
        exchange: str,
        symbol: str,
        timeframe: str,
        timeframe_ms: int,
        start_ms: int,
        end_ms: int,
    ) -> list[tuple[int, int]]:
        """Half-open [from, to) ranges of open times in [start_ms, end_ms) with no candle.

        Recorded genuine gaps are subtracted. Bounds are either the caller's
        or neighbouring candle times, so pass ``end_ms`` = open time of the
        still-open candle to leave it out.

        Cost: one min/max/count over the key range settles the common no-gap
        case (~0.05 s per million rows); holes are then found by bisecting
        with counts and scanning only small stretches that have holes.
        """
        if end_ms <= start_ms:
            return []
        key = (exchange, symbol, timeframe)
        with self._db() as conn:
            first, last, n = conn.execute(
                f"SELECT (SELECT min(ts) FROM candles WHERE {_SERIES} AND ts >= ? AND ts < ?),"
                f" (SELECT max(ts) FROM candles WHERE {_SERIES} AND ts >= ? AND ts < ?),"
                f" (SELECT count(*) FROM candles WHERE {_SERIES} AND ts >= ? AND ts < ?)",
                (*key, start_ms, end_ms) * 3,
            ).fetchone()
            if first is None:
                missing = [(start_ms, end_ms)]
            else:
                missing = []
                if first - start_ms >= timeframe_ms:
                    missing.append((start_ms, first))
                _holes(conn, key, timeframe_ms, first, last + timeframe_ms, n, missing)
                if last + timeframe_ms < end_ms:
                    missing.append((last + timeframe_ms, end_ms))
            if not missing:
                return []
            known = conn.execute(
                f"SELECT ts_from, ts_to FROM gaps WHERE {_SERIES} AND ts_to > ? AND ts_from < ?"
                " ORDER BY ts_from",
                (*key, start_ms, end_ms),
            ).fetchall()
        return subtract_ranges(missing, known) if known else missing

    def iter_candles(
        self,
        exchange: str,
        symbol: str,
        timeframe: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
        batch: int = 50_000,
    ) -> Iterator[list[Candle]]:
        """Candles with open time in [start_ms, end_ms), oldest first, in lists of at most
        ``batch``: memory stays constant whatever the range.

        Keyset pages (``ts >= last + 1 ... LIMIT batch``), each its own short statement: no read
        transaction stays open across a long export, so the writer's checkpoints go on, and any
        database pages the same way."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        lo = start_ms if start_ms is not None else -(2**63)
        hi = end_ms if end_ms is not None else 2**63 - 1
        while lo < hi:
            with self._db() as conn:
                rows = conn.execute(
                    "SELECT ts, open, high, low, close, volume FROM candles"
                    f" WHERE {_SERIES} AND ts >= ? AND ts < ? ORDER BY ts LIMIT ?",
                    (exchange, symbol, timeframe, lo, hi, batch),
                ).fetchall()
            if not rows:
                return
            yield rows
            if len(rows) < batch:
                return
            lo = rows[-1][0] + 1

    def coverage(
        self,
        exchange: str,
        symbol: str,
        timeframe: str,
        timeframe_ms: int,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Coverage:
        """What is stored of a series and what is not: first and last stored candle, the count,
        the missing stretches in [start_ms, end_ms) (``missing_ranges``: confirmed gaps left out)
        and every confirmed gap with its reason. ``start_ms`` defaults to the first stored candle;
        without an ``end_ms`` nothing is reported missing after the last stored candle."""
        with self._db() as conn:
            first, last, n = conn.execute(
                f"SELECT min(ts), max(ts), count(*) FROM candles WHERE {_SERIES}", (exchange, symbol, timeframe)
            ).fetchone()
        lo = start_ms if start_ms is not None else first
        hi = end_ms if end_ms is not None else (None if last is None else last + timeframe_ms)
        missing = (
            self.missing_ranges(exchange, symbol, timeframe, timeframe_ms, lo, hi)
            if lo is not None and hi is not None
            else []
        )
        return Coverage(
            first_ts=first,
            last_ts=last,
            count=n,
            missing=tuple(missing),
            gaps=tuple(self.gap_reasons(exchange, symbol, timeframe)),
        )

    def series_keys(self) -> list[tuple[str, str, str]]:
        """Every (exchange, symbol, timeframe) with stored candles or recorded gaps, sorted. One
        index seek per series (a skip scan), not a pass over every candle."""
        out: set[tuple[str, str, str]] = set()
        with self._db() as conn:
            key = conn.execute(
                "SELECT exchange, symbol, timeframe FROM candles ORDER BY exchange, symbol, timeframe LIMIT 1"
            ).fetchone()
            while key is not None:
                out.add(tuple(key))
                key = conn.execute(
                    "SELECT exchange, symbol, timeframe FROM candles WHERE (exchange, symbol, timeframe) > (?, ?, ?)"
                    " ORDER BY exchange, symbol, timeframe LIMIT 1",
                    tuple(key),
                ).fetchone()
            out.update(conn.execute("SELECT DISTINCT exchange, symbol, timeframe FROM gaps"))
        return sorted(out)

    # -- genuine gaps ------------------------------------------------------

    def record_gap(
        self, exchange: str, symbol: str, timeframe: str, ts_from: int, ts_to: int, reason: str = "exchange_hole"
    ) -> None:
        """Remember that the exchange has no candles in [ts_from, ts_to), and why (see
        `candlekeeper.actors.market.gaps`), so it is not refetched."""
        if ts_to <= ts_from:
            raise ValueError(f"empty gap [{ts_from}, {ts_to})")
        self._write(_RECORD_GAP, (exchange, symbol, timeframe, ts_from, ts_to, reason))

    def gaps(self, exchange: str, symbol: str, timeframe: str) -> list[tuple[int, int]]:
        """Recorded confirmed gaps of a series as [from, to) ranges, oldest first."""
        return [(a, b) for a, b, _ in self.gap_reasons(exchange, symbol, timeframe)]

    def gap_reasons(self, exchange: str, symbol: str, timeframe: str) -> list[tuple[int, int, str]]:
        """Recorded confirmed gaps of a series as (from, to, reason), oldest first."""
        with self._db() as conn:
            return conn.execute(
                f"SELECT ts_from, ts_to, reason FROM gaps WHERE {_SERIES} ORDER BY ts_from",
                (exchange, symbol, timeframe),
            ).fetchall()

    # -- run-time series ---------------------------------------------------

    def add_series(
        self, exchange: str, symbol: str, timeframe: str, added_at_ms: int | None = None
    ) -> bool:
        """Persist a series added at run time; False if it was already active."""
        at = int(time.time() * 1000) if added_at_ms is None else added_at_ms
        cur = self._write(
            "INSERT INTO series (exchange, symbol, timeframe, added_at, active) VALUES (?, ?, ?, ?, 1)"
            " ON CONFLICT (exchange, symbol, timeframe)"
            " DO UPDATE SET active = 1, added_at = excluded.added_at WHERE active = 0",
            (exchange, symbol, timeframe, at),
        )
        return cur.rowcount > 0

    def remove_series(self, exchange: str, symbol: str, timeframe: str, removed_at_ms: int | None = None) -> bool:
        """Persist that a series was removed at run time (a configured one too, so a restart
        does not bring it back); its candles stay. False if it was already removed."""
        at = int(time.time() * 1000) if removed_at_ms is None else removed_at_ms
        cur = self._write(
            "INSERT INTO series (exchange, symbol, timeframe, added_at, active) VALUES (?, ?, ?, ?, 0)"
            " ON CONFLICT (exchange, symbol, timeframe)"
            " DO UPDATE SET active = 0, added_at = excluded.added_at WHERE active = 1",
            (exchange, symbol, timeframe, at),
        )
        return cur.rowcount > 0

    def list_series(self) -> list[tuple[str, str, str, int, bool]]:
        """Run-time changes as (exchange, symbol, timeframe, changed_at_ms, active), oldest first."""
        with self._db() as conn:
            return [
                (e, s, t, at, bool(active))
                for e, s, t, at, active in conn.execute(
                    "SELECT exchange, symbol, timeframe, added_at, active FROM series"
                    " ORDER BY added_at, exchange, symbol, timeframe"
                )
            ]


_LEAF = 2048  # expected candles below which a stretch is scanned, not bisected


def _holes(
    conn: sqlite3.Connection,
    key: tuple[str, str, str],
    tf: int,
    lo: int,
    hi: int,
    n: int,
    out: list[tuple[int, int]],
) -> None:
    """Append the holes in [lo, hi) (``lo`` a candle time, ``n`` candles in it) to ``out``.

    A stretch whose count matches its length has no holes, so bisecting on
    counts skips the (usually huge) complete stretches; small stretches are
    scanned. Faster than a LAG() window over all rows, which SQLite runs at
    ~0.7 us/row against ~0.05 us/row for count(*).
    """
    expected = (hi - lo) // tf
    if n == expected:
        return
    if n == 0:
        append_range(out, lo, hi)
        return
    if expected <= _LEAF:
        prev = lo - tf
        for (ts,) in conn.execute(
            f"SELECT ts FROM candles WHERE {_SERIES} AND ts >= ? AND ts < ? ORDER BY ts",
            (*key, lo, hi),
        ):
            if ts - prev > tf:
                append_range(out, prev + tf, ts)
            prev = ts
        if hi - prev > tf:
            append_range(out, prev + tf, hi)
        return
    mid = lo + (expected // 2) * tf
    left = conn.execute(
        f"SELECT count(*) FROM candles WHERE {_SERIES} AND ts >= ? AND ts < ?", (*key, lo, mid)
    ).fetchone()[0]
    _holes(conn, key, tf, lo, mid, left, out)
    _holes(conn, key, tf, mid, hi, n - left, out)


_RECORD_GAP = (
    "INSERT INTO gaps (exchange, symbol, timeframe, ts_from, ts_to, reason) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (exchange, symbol, timeframe, ts_from)"
    " DO UPDATE SET ts_to = max(ts_to, excluded.ts_to), reason = excluded.reason"
)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """One transaction: committed, or rolled back whatever went wrong (the original error is
    the one raised, also when the rollback fails too)."""
    if conn.in_transaction:  # left open by a failed rollback: start clean
        conn.execute("ROLLBACK")
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an older version up to this schema (additive changes only)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(gaps)")}
    if "reason" not in columns:
        conn.execute("ALTER TABLE gaps ADD COLUMN reason TEXT NOT NULL DEFAULT 'exchange_hole'")


def _chunk_rows(conn: sqlite3.Connection, values_per_row: int) -> int:
    """Rows per multi-row statement within this SQLite library's bound-variable limit."""
    try:
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    except (AttributeError, sqlite3.Error):  # Python < 3.11
        limit = 999
    return max(1, min(_CHUNK_ROWS, limit // values_per_row))
