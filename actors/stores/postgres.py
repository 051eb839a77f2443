"""PostgreSQL candle store: the same contract as the SQLite ``Store``, shared by many daemons.

Same tables, columns, key and semantics as ``stores.sqlite.Store`` (candles, gaps, series; the
protocols both meet are in ``stores.base``), plus ``nodes`` and ``leases`` for clustering
(``stores.postgres_leases``): each series is owned by one live
daemon through a lease whose fencing token grows by one on every change of owner, and a fenced
``upsert`` (candles and confirmed gaps, or gaps alone) checks the tokens in the write's own
transaction, so a daemon that lost a lease (paused, partitioned, slow) can never overwrite the
new owner's work.

Like ``Store``, it never logs, never sleeps and never retries a fault; reconnecting is
``reopen()``. Faults map onto the store's exceptions (``stores.postgres_errors``):

* ``StoreUnavailable(StoreError)``: transient. Connection lost or refused, server restarting or
  shutting down, read-only server (``default_transaction_read_only``, a standby), disk full and
  other out-of-resources errors, lock timeout, serialization failure, deadlock. Nothing of the
  failed call was committed: answer the write with an error, ``reopen()``, then write again (a
  lost connection keeps raising ``StoreUnavailable`` until ``reopen()`` succeeds).
* ``StoreGone``: a table was dropped while open. ``reopen()`` recreates it (and ``check()`` /
  ``verify()`` notice a candles table recreated by another daemon), as with a deleted SQLite file.
* ``StoreError``: not open, a read-only store asked to write, bad URL, credentials or database.
* A row that breaks the schema (a NULL price) raises psycopg's ``IntegrityError``, as the
  SQLite store lets ``sqlite3.IntegrityError`` through: a bug, not a fault.

The password (from the URL, ``PGPASSWORD`` or a ``.pgpass`` file, all read by libpq) never
appears in ``repr()``, ``url`` or any exception text.

Bulk writes: "copy" (binary COPY; series with no stored candle in the batch's span go straight
into candles, the others through a temporary staging table and INSERT ... SELECT ... ON
CONFLICT) or "values" (multi-row INSERT ... ON CONFLICT, 1000 rows a statement). "auto", the
default, uses values below ``COPY_FROM_ROWS`` rows and copy from there (bench/store.py).

TimescaleDB: when the server offers the extension (``pg_available_extensions``) and this store
creates the candles table, the table becomes a hypertable on ``ts`` (integer milliseconds,
``timescale_chunk_ms`` per chunk). If that fails (extension not preloaded, no privilege) a plain
table is used and ``hypertable_note`` says why; ``timescale=False`` never tries,
``timescale=True`` makes failure a ``StoreError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Literal, overload

import psycopg
from psycopg import sql

from ..market.candles import Candle, Row
from .coverage import Coverage
from .errors import StoreError, StoreGone
from .postgres_errors import Redactor, StoreUnavailable, connect_error, translate
from .postgres_leases import FencedWrite, Lease, LeasesMixin
from .postgres_lock import holder_name, take_lock
from .postgres_sql import (
    CHUNK_ROWS,
    COPY_CANDLES,
    COPY_FENCE,
    COPY_GAPS,
    COPY_STAGE,
    DDL,
    FENCE_STAGE,
    FENCE_TYPES,
    FENCED_COMMIT,
    GAP_TYPES,
    OVERLAP,
    RECORD_GAP,
    SCHEMA_LOCK,
    SERIES,
    STAGE_DDL,
    STAGE_UPSERT,
    TABLES,
    Conn,
    GapRow,
    Key,
    copy_rows,
    copy_typed,
    dedupe,
    key_columns,
    key_of,
    merge_gaps,
    spans,
    values_sql,
)
from .ranges import append_range, subtract_ranges

__all__ = ["COPY_FROM_ROWS", "FencedWrite", "Lease", "PostgresStore", "StoreUnavailable", "Strategy"]

Strategy = Literal["auto", "copy", "values"]

COPY_FROM_ROWS = 100  # "auto": batches this large go through COPY (the crossover in bench/store.py)
TIMESCALE = "timescaledb"  # the extension whose hypertables the candles table becomes, if offered
DUPLICATE_CODES = frozenset({"23505", "21000"})  # unique_violation; ON CONFLICT hit a row twice


class _Duplicate(Exception):
    """The optimistic write met a duplicate key (inside the batch, or a racing writer)."""


class PostgresStore(LeasesMixin):
    """Candles, genuine gaps, run-time series, nodes and leases in one PostgreSQL database.

    Not thread-safe: one ``PostgresStore`` (one connection) per thread, like ``Store``.
    ``url`` is a libpq URL or conninfo string; tables live in its search_path (use
    ``?options=-csearch_path%3Dname`` to keep several stores in one database).
    """

    def __init__(
        self,
        url: str,
        readonly: bool = False,
        *,
        strategy: Strategy = "auto",
        lock_timeout_s: float = 5.0,
        connect_timeout_s: int = 10,
        timescale: bool | None = None,
        timescale_chunk_ms: int = 7 * 86_400_000,
        idle_in_transaction_s: float = 5.0,
        exclusive: bool = False,
    ) -> None:
        self._url = url
        self._redact = Redactor(url)
        self.readonly = readonly
        self.strategy: Strategy = strategy
        self.lock_timeout_s = lock_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.timescale = timescale
        self.timescale_chunk_ms = timescale_chunk_ms
        # A client frozen inside a transaction (SIGSTOP, a swapped-out VM) would hold its row
        # locks, the leases' share locks included, for as long as it is frozen: the server ends
        # such a session after this long, so the others' failover never waits for a stalled node.
        self.idle_in_transaction_s = idle_in_transaction_s
        self.hypertable = False
        self.hypertable_note: str | None = None
        # One daemon per database (no clustering): a writing store holds the database's
        # advisory lock on a session of its own (`stores.postgres_lock`) while it is open.
        self.exclusive = exclusive and not readonly
        self._lock_conn: Conn | None = None
        #: fenced writes refused since this object was made: series refused, rows not stored
        self.refused_writes = 0
        self.refused_rows = 0
        self._conn: Conn | None = None
        self._candles_oid: int | None = None
        self._stage_ready = False  # the staging table exists on this connection
        self._stage_used = False
        self._opened_before = False
        self._wanted = False  # open() was asked for and close() was not: lost = unavailable
        self._recreated: tuple[str, ...] = ()

    # -- identity ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL with its password replaced by ``***``."""
        return self._redact(self._url)

    @property
    def path(self) -> str:
        """Alias of ``url`` (the storage actor names its store by ``path``)."""
        return self.url

    @property
    def memory(self) -> bool:
        return False

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        mode = "ro" if self.readonly else "rw"
        return f"<PostgresStore {self.url!r} {mode} {state}>"

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> PostgresStore:
        """Connect, and create missing tables (idempotent, safe with several daemons at once).

        Raises StoreUnavailable when the server cannot be reached (or is read-only and the
        schema is missing), StoreError for a bad URL, bad credentials or a missing database.
        """
        if self._conn is not None:
            return self
        self._wanted = True
        self._stage_ready = False
        if self.exclusive:
            self._hold_lock()
        failed: StoreError | None = None
        try:
            conn: Conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=self.connect_timeout_s,
                application_name="candlekeeper",
            )
        except psycopg.Error as exc:
            failed = connect_error(exc, self.url, self._redact)
        if failed is not None:  # raised outside the handler: the driver's error (which may
            self._wanted = isinstance(failed, StoreUnavailable)  # quote the URL) is not even
            raise failed  # its __context__
        with self._closed_on_error(conn, "cannot open"):
            conn.execute("SET jit = off")  # JIT compiles big upserts for longer than they run
            conn.execute("SET temp_buffers = '64MB'")  # COPY staging stays in memory
            conn.execute(sql.SQL("SET lock_timeout = {}").format(int(self.lock_timeout_s * 1000)))
            conn.execute(sql.SQL("SET idle_in_transaction_session_timeout = {}").format(
                max(1, int(self.idle_in_transaction_s * 1000))))
            if self.readonly:
                conn.execute("SET default_transaction_read_only = on")
            created = self._ensure_schema(conn)
            row = conn.execute("SELECT to_regclass('candles')::oid").fetchone()
            self._candles_oid = int(row[0]) if row and row[0] is not None else None
            if "candles" not in created and self.timescale is not False:
                self.hypertable = self._is_hypertable(conn)
        self._conn = conn
        self._recreated = created if self._opened_before else ()
        self._opened_before = True
        return self

    def _hold_lock(self) -> None:
        """Hold the database's lock (kept across ``reopen()``; taken again when its session was
        lost, e.g. by a server restart): raises DatabaseInUse while another daemon holds it."""
        held = self._lock_conn
        if held is not None:
            try:
                held.execute("SELECT 1")
                return
            except psycopg.Error:
                self._release_lock()
        failed: StoreError | None = None
        try:
            conn: Conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=self.connect_timeout_s, application_name=holder_name(),
            )
        except psycopg.Error as exc:
            failed = connect_error(exc, self.url, self._redact)
        if failed is not None:
            raise failed  # outside the handler: the driver's error may quote the URL
        with self._closed_on_error(conn, "cannot lock"):
            take_lock(conn, self.url)
        self._lock_conn = conn

    @contextmanager
    def _closed_on_error(self, conn: Conn, what: str) -> Iterator[None]:
        """A connection being set up: closed if setting it up fails, the driver's error
        translated into the store's (its message may quote the URL: not chained)."""
        try:
            yield
        except psycopg.Error as exc:
            conn.close()
            raise translate(exc, self.url, what, self._redact, conn.broken) from None
        except StoreError:
            conn.close()
            raise

    def _release_lock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            try:
                conn.close()  # the session's end releases the lock
            except psycopg.Error:
                pass

    def _ensure_schema(self, conn: Conn) -> tuple[str, ...]:
        """Create the missing tables; returns their names. Skips all DDL when nothing is
        missing, so a read-only server (or store) can still be opened for reading."""
        missing = self._missing_tables(conn)
        if not missing:
            return ()
        if self.readonly:
            raise StoreError(f"{self.url} has no candlekeeper schema (missing: {', '.join(missing)})")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            missing = self._missing_tables(conn)  # another daemon may have just made them
            for table in missing:
                conn.execute(DDL[table])
            if "candles" in missing and self.timescale is not False:
                self._make_hypertable(conn)
        return tuple(missing)

    @staticmethod
    def _missing_tables(conn: Conn) -> list[str]:
        rows = conn.execute(
            "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL", (list(TABLES),)
        ).fetchall()
        return [r[0] for r in rows]

    @staticmethod
    def _is_hypertable(conn: Conn) -> bool:
        """Whether another daemon (or an earlier run) made candles a hypertable."""
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = %s", (TIMESCALE,)).fetchone() is None:
            return False
        row = conn.execute(
            "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'candles'"
        ).fetchone()
        return row is not None

    def _make_hypertable(self, conn: Conn) -> None:
        """Turn the new candles table into a TimescaleDB hypertable where the server offers it."""
        avail = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", (TIMESCALE,)).fetchone()
        if avail is None:
            self.hypertable_note = f"{TIMESCALE} is not available on this server"
            if self.timescale:
                raise StoreError(f"{self.url}: timescale=True but {self.hypertable_note}")
            return
        try:
            with conn.transaction():  # a savepoint: failure leaves the plain table
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(TIMESCALE)))
                conn.execute(
                    "SELECT create_hypertable('candles', 'ts', chunk_time_interval => %s::bigint,"
                    " if_not_exists => TRUE, migrate_data => TRUE)",
                    (self.timescale_chunk_ms,),
                )
            self.hypertable, self.hypertable_note = True, None
        except psycopg.Error as exc:
            self.hypertable_note = f"plain table: {TIMESCALE} failed: {self._redact(str(exc)).strip()}"
            if self.timescale:
                raise StoreError(f"{self.url}: {self.hypertable_note}") from None

    def close(self) -> None:
        """Close the connection; errors are swallowed since the server may be gone."""
        self._wanted = False
        self._disconnect()
        self._release_lock()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._stage_ready = False
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def __enter__(self) -> PostgresStore:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- resilience ----------------------------------------------------------------------

    def check(self) -> bool:
        """True while the connection works and ``candles`` is the table we opened (one round
        trip). False after a lost connection, a dropped table, or one recreated by another
        daemon's ``reopen()`` (its stored candles are gone: re-read resume points)."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return False
        try:
            row = conn.execute("SELECT to_regclass('candles')::oid").fetchone()
        except psycopg.Error:
            return False
        return row is not None and row[0] is not None and int(row[0]) == self._candles_oid

    def reopen(self) -> str | None:
        """Close and connect again, recreating dropped tables.

        Returns a note when the candles table had to be recreated (its data is gone, as with a
        deleted SQLite file), else None. Raises like ``open()``: StoreUnavailable while the
        server is still down, so the caller tries again later.
        """
        self._disconnect()
        self.open()
        if "candles" in self._recreated:
            return f"recreated tables: {', '.join(self._recreated)}"
        return None

    def verify(self) -> None:
        """Raise StoreUnavailable when the connection is lost (``reopen()`` once the server is
        back; the data is all there), StoreGone when ``candles`` was dropped or recreated by
        another daemon (re-read resume points), else nothing: one round trip."""
        conn = self._conn
        if conn is None:
            if self._wanted:
                raise StoreUnavailable(f"{self.url}: not connected; reopen() to reconnect")
            return
        if conn.closed or conn.broken:
            raise StoreUnavailable(f"{self.url}: connection lost; reopen() to reconnect")
        with self._db("verify") as c:
            row = c.execute("SELECT to_regclass('candles')::oid").fetchone()
        if row is None or row[0] is None:
            raise StoreGone(f"{self.url}: the candles table was dropped; reopen() recreates it")
        if int(row[0]) != self._candles_oid:
            raise StoreGone(f"{self.url}: the candles table was recreated by another daemon")

    @property
    def identity(self) -> int | None:
        """The oid of the candles table opened: another one after a ``reopen()`` means the data
        series remember is gone."""
        return self._candles_oid

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a statement waits for another session's lock (``lock_timeout``) before it
        fails as unavailable; for this connection and the next ones."""
        self.lock_timeout_s = seconds
        if self.is_open:
            with self._db("set lock_timeout") as conn:
                conn.execute(sql.SQL("SET lock_timeout = {}").format(max(0, int(seconds * 1000))))

    def probe_write(self) -> None:
        """Commit a write that changes nothing: raises StoreUnavailable when the server cannot
        take writes now (read-only, a standby, gone)."""
        with self._db("probe_write", write=True) as conn, conn.transaction():
            conn.execute("UPDATE series SET active = active WHERE false")

    @contextmanager
    def _db(self, what: str = "query", write: bool = False) -> Iterator[Conn]:
        """The connection, with driver errors translated onto the store's exceptions."""
        conn = self._conn
        if conn is None:
            if self._wanted:  # a reopen() failed: still a passing fault
                raise StoreUnavailable(f"{self.url}: not connected; reopen() to reconnect")
            raise StoreError(f"store {self.url} is not open")
        if write and self.readonly:
            raise StoreError(f"store {self.url} is read-only")
        if conn.closed or conn.broken:
            raise StoreUnavailable(f"{self.url}: connection lost; reopen() to reconnect")
        try:
            yield conn
        except psycopg.Error as exc:
            self._stage_ready = False
            err = translate(exc, self.url, what, self._redact, conn.broken)
            if err is exc:
                raise
            raise err from err.__cause__

    # -- candles -------------------------------------------------------------------------

    @overload
    def upsert(
        self, rows: Sequence[Row], fence: None = None, *, strategy: Strategy | None = None,
        gaps: Sequence[GapRow] = (),
    ) -> int: ...

    @overload
    def upsert(
        self, rows: Sequence[Row], fence: Mapping[Any, int], *, strategy: Strategy | None = None,
        gaps: Sequence[GapRow] = (),
    ) -> FencedWrite: ...

    def upsert(
        self,
        rows: Sequence[Row],
        fence: Mapping[Any, int] | None = None,
        *,
        strategy: Strategy | None = None,
        gaps: Sequence[GapRow] = (),
    ) -> int | FencedWrite:
        """Insert or correct candles, and record confirmed ``gaps`` (exchange, symbol,
        timeframe, from, to, reason: as ``record_gap``), in one transaction; returns candle
        rows inserted or changed.

        Idempotent: the same rows again change nothing and return 0. Several rows with one key
        in a batch: the last one is stored (counted once). With ``fence`` ({series key: token},
        one entry per series in ``rows`` and ``gaps``), series whose lease row no longer
        carries that token (another owner took it, or it was released) are refused in the same
        transaction, under a share lock on their lease rows: nothing of them is stored, gaps
        included (a write of gaps alone is fenced the same way), and a ``FencedWrite`` says
        which were refused.
        """
        for g in gaps:
            if g[4] <= g[3]:
                raise ValueError(f"empty gap [{g[3]}, {g[4]})")
        if fence is None and not rows and not gaps:
            return 0
        how = strategy or self.strategy
        if how not in ("auto", "copy", "values"):
            raise ValueError(f"unknown strategy {how!r}")
        fenced: dict[Key, int] | None = None
        given: dict[Key, Any] = {}
        if fence is not None:
            given = {key_of(k): k for k in fence}
            fenced = {key_of(k): int(tok) for k, tok in fence.items()}
            unfenced = ({(r[0], r[1], r[2]) for r in rows} | {(g[0], g[1], g[2]) for g in gaps}) - fenced.keys()
            if unfenced:
                raise ValueError(f"fenced upsert has rows of series without a token: {sorted(unfenced)[:3]}")
        with self._db("upsert", write=True) as conn:
            try:
                changed, refused = self._upsert_tx(conn, rows, gaps, fenced, how, safe=False)
            except _Duplicate:
                changed, refused = self._upsert_tx(conn, dedupe(rows), gaps, fenced, how, safe=True)
        if fenced is None:
            return changed
        self.refused_writes += len(refused)
        self.refused_rows += sum(1 for r in rows if (r[0], r[1], r[2]) in refused) if refused else 0
        return FencedWrite(changed, frozenset(given[k] for k in refused))

    def _upsert_tx(
        self, conn: Conn, rows: Sequence[Row], gaps: Sequence[GapRow], fenced: dict[Key, int] | None, how: str,
        safe: bool,
    ) -> tuple[int, set[Key]]:
        refused: set[Key] = set()
        changed = 0
        try:
            if fenced:
                return self._fenced_tx(conn, rows, gaps, fenced)
            with conn.transaction():
                if not rows and not gaps:
                    return 0, refused
                self._stage_used = False
                if rows:
                    copy = how == "copy" or (how == "auto" and len(rows) >= COPY_FROM_ROWS)
                    changed = self._write_copy(conn, rows, safe) if copy else self._write_values(conn, rows)
                if gaps:
                    conn.cursor().executemany(RECORD_GAP, gaps)
        except (psycopg.errors.UniqueViolation, psycopg.errors.CardinalityViolation) as exc:
            if safe or exc.sqlstate not in DUPLICATE_CODES:
                raise
            raise _Duplicate() from None
        if self._stage_used:
            self._stage_ready = True  # committed, so the temporary table exists from now on
        return changed, refused

    def _fenced_tx(
        self, conn: Conn, rows: Sequence[Row], gaps: Sequence[GapRow], fenced: dict[Key, int]
    ) -> tuple[int, set[Key]]:
        """Stage the rows, gaps and tokens (no lock held), then check the tokens and write in
        one message ending with COMMIT (`FENCED_COMMIT`): a writer stopped at any moment never
        holds the lease rows while the server waits for it. Rows of refused series are not
        written; several rows of one key raise (the caller writes the batch again deduplicated)."""
        conn.execute("BEGIN")
        try:
            conn.execute(STAGE_DDL + "; " + FENCE_STAGE, prepare=False)
            copy_typed(conn, COPY_FENCE, FENCE_TYPES, [(*k, tok) for k, tok in fenced.items()])
            if rows:
                copy_rows(conn, COPY_STAGE, rows)
            if gaps:
                copy_typed(conn, COPY_GAPS, GAP_TYPES, merge_gaps(gaps))
            cur = conn.cursor()
            cur.execute(FENCED_COMMIT, prepare=False)
            refused = {(e, s, t) for e, s, t in cur.fetchall()}
            cur.nextset()
            changed = max(0, cur.rowcount)
        except BaseException:
            if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):  # the first error is the one to tell
                    conn.execute("ROLLBACK")
            raise
        return changed, refused

    def _write_copy(self, conn: Conn, rows: Sequence[Row], safe: bool) -> int:
        """COPY new series straight into candles, the others through the staging table.

        A duplicate key among the COPYed rows (inside the batch, or a writer racing us) raises
        and the caller writes the deduplicated batch again with ``safe``: everything through
        the staging table's ON CONFLICT.
        """
        if safe:
            return self._copy_upsert(conn, rows)
        span = spans(rows)
        cols = key_columns(span)
        overlap = {(e, s, t) for e, s, t in conn.execute(
            OVERLAP, (*cols, [lo for lo, _ in span.values()], [hi for _, hi in span.values()])
        )}
        fresh: Sequence[Row]
        old: Sequence[Row]
        if not overlap:
            fresh, old = rows, ()
        elif len(overlap) == len(span):
            fresh, old = (), rows
        else:
            fresh = [r for r in rows if (r[0], r[1], r[2]) not in overlap]
            old = [r for r in rows if (r[0], r[1], r[2]) in overlap]
        changed = 0
        if fresh:
            copy_rows(conn, COPY_CANDLES, fresh)
            changed = len(fresh)
        if old:
            changed += self._copy_upsert(conn, old)
        return changed

    def _copy_upsert(self, conn: Conn, rows: Sequence[Row]) -> int:
        if not self._stage_ready:
            conn.execute(STAGE_DDL)
            self._stage_used = True
        copy_rows(conn, COPY_STAGE, rows)
        return conn.execute(STAGE_UPSERT).rowcount

    def _write_values(self, conn: Conn, rows: Sequence[Row]) -> int:
        """Multi-row INSERT ... ON CONFLICT, 1000 rows a statement (prepared after a few)."""
        cur = psycopg.RawCursor(conn)
        changed = 0
        for i in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[i : i + CHUNK_ROWS]
            cur.execute(values_sql(len(chunk)), [v for row in chunk for v in row])
            changed += cur.rowcount
        return changed

    def last_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None:
        """Open time of the newest stored candle, or None."""
        return self._one(f"SELECT max(ts) FROM candles WHERE {SERIES}", (exchange, symbol, timeframe))

    def first_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None:
        """Open time of the oldest stored candle, or None."""
        return self._one(f"SELECT min(ts) FROM candles WHERE {SERIES}", (exchange, symbol, timeframe))

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
        return int(self._one(
            f"SELECT count(*) FROM candles WHERE {SERIES} AND ts >= %s AND ts < %s",
            (exchange, symbol, timeframe, lo, hi),
        ))

    def stored_ts(self, exchange: str, symbol: str, timeframe: str, start_ms: int, end_ms: int) -> list[int]:
        """Open times stored in [start_ms, end_ms)."""
        with self._db("stored_ts") as conn:
            return [r[0] for r in conn.execute(
                f"SELECT ts FROM candles WHERE {SERIES} AND ts >= %s AND ts < %s ORDER BY ts",
                (exchange, symbol, timeframe, start_ms, end_ms),
            )]

    def stored_keys(self, ranges: Sequence[tuple[str, str, str, int, int]]) -> set[tuple[str, str, str, int]]:
        """(exchange, symbol, timeframe, ts) of the stored candles in each (exchange, symbol,
        timeframe, start_ms, end_ms) range: one statement for all ranges."""
        if not ranges:
            return set()
        cols: list[list[Any]] = [[], [], [], [], []]
        for r in ranges:
            for c, v in zip(cols, r, strict=True):
                c.append(v)
        with self._db("stored_keys") as conn:
            return set(conn.execute(
                "SELECT c.exchange, c.symbol, c.timeframe, c.ts"
                " FROM unnest(%s::text[], %s::text[], %s::text[], %s::int8[], %s::int8[]) AS r(e, s, t, lo, hi)"
                " JOIN candles c ON c.exchange = r.e AND c.symbol = r.s AND c.timeframe = r.t"
                " AND c.ts >= r.lo AND c.ts < r.hi",
                cols,
            ).fetchall())

    def latest(self, exchange: str, symbol: str, timeframe: str, n: int = 1) -> list[Candle]:
        """The ``n`` newest candles as (ts, open, high, low, close, volume), newest first."""
        with self._db("latest") as conn:
            return conn.execute(
                f"SELECT ts, open, high, low, close, volume FROM candles WHERE {SERIES}"
                " ORDER BY ts DESC LIMIT %s",
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
        with self._db("candles") as conn:
            return conn.execute(
                f"SELECT ts, open, high, low, close, volume FROM candles WHERE {SERIES}"
                " AND ts >= %s AND ts < %s ORDER BY ts",
                (exchange, symbol, timeframe, lo, hi),
            ).fetchall()

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
        ``batch``: keyset pages, each its own short statement (as ``Store.iter_candles``), so
        memory stays constant and no long transaction holds back vacuum."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        lo = start_ms if start_ms is not None else -(2**63)
        hi = end_ms if end_ms is not None else 2**63 - 1
        while lo < hi:
            with self._db("iter_candles") as conn:
                page = conn.execute(
                    f"SELECT ts, open, high, low, close, volume FROM candles WHERE {SERIES}"
                    " AND ts >= %s AND ts < %s ORDER BY ts LIMIT %s",
                    (exchange, symbol, timeframe, lo, hi, batch),
                ).fetchall()
            if not page:
                return
            yield page
            if len(page) < batch:
                return
            lo = page[-1][0] + 1

    def coverage(
        self,
        exchange: str,
        symbol: str,
        timeframe: str,
        timeframe_ms: int,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Coverage:
        """What is stored of a series and what is not; the same contract as ``Store.coverage``."""
        with self._db("coverage") as conn:
            row = conn.execute(
                f"SELECT min(ts), max(ts), count(*) FROM candles WHERE {SERIES}", (exchange, symbol, timeframe)
            ).fetchone()
        first, last, n = row if row is not None else (None, None, 0)
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
            count=int(n),
            missing=tuple(missing),
            gaps=tuple(self.gap_reasons(exchange, symbol, timeframe)),
        )

    def series_keys(self) -> list[tuple[str, str, str]]:
        """Every (exchange, symbol, timeframe) with stored candles or recorded gaps, sorted: one
        index probe per series (a recursive skip scan), not a pass over every candle."""
        with self._db("series_keys") as conn:
            rows = conn.execute(
                "WITH RECURSIVE k AS ("
                " (SELECT exchange, symbol, timeframe FROM candles ORDER BY exchange, symbol, timeframe LIMIT 1)"
                " UNION ALL SELECT n.exchange, n.symbol, n.timeframe FROM k CROSS JOIN LATERAL"
                " (SELECT c.exchange, c.symbol, c.timeframe FROM candles c"
                " WHERE (c.exchange, c.symbol, c.timeframe) > (k.exchange, k.symbol, k.timeframe)"
                " ORDER BY c.exchange, c.symbol, c.timeframe LIMIT 1) n)"
                " SELECT exchange, symbol, timeframe FROM k"
                " UNION SELECT DISTINCT exchange, symbol, timeframe FROM gaps"
            ).fetchall()
        return sorted((e, s, t) for e, s, t in rows)

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

        Same contract as ``Store.missing_ranges`` (recorded genuine gaps are subtracted).
        PostgreSQL counts rows one by one (no counted b-tree), so instead of SQLite's
        bisection (a count per level) one pass counts candles per stretch of ``_LEAF``
        candle times, and only stretches short of candles are scanned: about one index-only
        scan of the range in all (bench/store.py: 1,000,000 candles).
        """
        if end_ms <= start_ms:
            return []
        key = (exchange, symbol, timeframe)
        with self._db("missing_ranges") as conn:
            first: int | None
            last: int
            first, last = conn.execute(  # two index probes
                f"SELECT min(ts), max(ts) FROM candles WHERE {SERIES} AND ts >= %s AND ts < %s",
                (*key, start_ms, end_ms),
            ).fetchone() or (None, 0)
            if first is None:
                missing = [(start_ms, end_ms)]
            else:
                missing = []
                if first - start_ms >= timeframe_ms:
                    missing.append((start_ms, first))
                _holes(conn, key, timeframe_ms, first, last + timeframe_ms, missing)
                if last + timeframe_ms < end_ms:
                    missing.append((last + timeframe_ms, end_ms))
            if not missing:
                return []
            known = conn.execute(
                f"SELECT ts_from, ts_to FROM gaps WHERE {SERIES} AND ts_to > %s AND ts_from < %s ORDER BY ts_from",
                (*key, start_ms, end_ms),
            ).fetchall()
        return subtract_ranges(missing, known) if known else missing

    # -- genuine gaps --------------------------------------------------------------------

    def record_gap(
        self, exchange: str, symbol: str, timeframe: str, ts_from: int, ts_to: int, reason: str = "exchange_hole"
    ) -> None:
        """Remember that the exchange has no candles in [ts_from, ts_to), and why, so it is not refetched."""
        if ts_to <= ts_from:
            raise ValueError(f"empty gap [{ts_from}, {ts_to})")
        with self._db("record_gap", write=True) as conn:
            conn.execute(RECORD_GAP, (exchange, symbol, timeframe, ts_from, ts_to, reason))

    def gaps(self, exchange: str, symbol: str, timeframe: str) -> list[tuple[int, int]]:
        """Recorded confirmed gaps of a series as [from, to) ranges, oldest first."""
        return [(a, b) for a, b, _ in self.gap_reasons(exchange, symbol, timeframe)]

    def gap_reasons(self, exchange: str, symbol: str, timeframe: str) -> list[tuple[int, int, str]]:
        """Recorded confirmed gaps of a series as (from, to, reason), oldest first."""
        with self._db("gaps") as conn:
            return conn.execute(
                f"SELECT ts_from, ts_to, reason FROM gaps WHERE {SERIES} ORDER BY ts_from",
                (exchange, symbol, timeframe),
            ).fetchall()

    # -- run-time series -----------------------------------------------------------------

    def add_series(self, exchange: str, symbol: str, timeframe: str, added_at_ms: int | None = None) -> bool:
        """Persist a series added at run time; False if it was already active."""
        return self._set_series(exchange, symbol, timeframe, added_at_ms, 1)

    def remove_series(self, exchange: str, symbol: str, timeframe: str, removed_at_ms: int | None = None) -> bool:
        """Persist that a series was removed at run time (a configured one too, so a restart
        does not bring it back); its candles stay. False if it was already removed."""
        return self._set_series(exchange, symbol, timeframe, removed_at_ms, 0)

    def _set_series(self, exchange: str, symbol: str, timeframe: str, at: int | None, active: int) -> bool:
        with self._db("series", write=True) as conn:
            cur = conn.execute(
                "INSERT INTO series (exchange, symbol, timeframe, added_at, active) VALUES (%s, %s, %s,"
                " COALESCE(%s, (extract(epoch FROM clock_timestamp()) * 1000)::bigint), %s)"
                " ON CONFLICT (exchange, symbol, timeframe)"
                " DO UPDATE SET active = excluded.active, added_at = excluded.added_at"
                " WHERE series.active <> excluded.active",
                (exchange, symbol, timeframe, at, active),
            )
            return cur.rowcount > 0

    def list_series(self) -> list[tuple[str, str, str, int, bool]]:
        """Run-time changes as (exchange, symbol, timeframe, changed_at_ms, active), oldest first."""
        with self._db("list_series") as conn:
            return [
                (e, s, t, at, bool(active))
                for e, s, t, at, active in conn.execute(
                    "SELECT exchange, symbol, timeframe, added_at, active FROM series"
                    " ORDER BY added_at, exchange, symbol, timeframe"
                )
            ]

    # -- helpers ---------------------------------------------------------------------------

    def _one(self, query: str, params: Sequence[Any] = (), what: str = "query") -> Any:
        with self._db(what) as conn:
            row = conn.execute(query, params).fetchone()
        return None if row is None else row[0]


_LEAF = 2048  # candle times per counted stretch; stretches short of candles are scanned


def _holes(conn: Conn, key: Key, tf: int, lo: int, hi: int, out: list[tuple[int, int]]) -> None:
    """Append the holes in [lo, hi) (``lo`` and ``hi - tf`` stored candle times) to ``out``.

    Stretches of ``_LEAF`` candle times are aligned on ``lo``, so a stretch whose count
    matches its length has no hole (as in the SQLite store's bisection); stretches with no
    candle at all are holes whole; the others are scanned, as SQLite's leaves are.
    """
    width = _LEAF * tf
    counts = conn.execute(
        f"SELECT (ts - %s) / %s AS b, count(*) FROM candles WHERE {SERIES} AND ts >= %s AND ts < %s"
        " GROUP BY b ORDER BY b",
        (lo, width, *key, lo, hi),
    ).fetchall()
    found: list[tuple[int, int]] = []
    scan: list[tuple[int, int]] = []  # stretches short of candles, adjacent ones merged
    next_b = 0
    for b, n in counts:
        if b > next_b:  # stretches without a single candle
            found.append((lo + next_b * width, lo + b * width))
        s_lo, s_hi = lo + b * width, min(lo + (b + 1) * width, hi)
        if n != (s_hi - s_lo) // tf:
            if scan and scan[-1][1] == s_lo:
                scan[-1] = (scan[-1][0], s_hi)
            else:
                scan.append((s_lo, s_hi))
        next_b = b + 1
    for s_lo, s_hi in scan:
        prev = s_lo - tf
        for (ts,) in conn.execute(
            f"SELECT ts FROM candles WHERE {SERIES} AND ts >= %s AND ts < %s ORDER BY ts", (*key, s_lo, s_hi)
        ):
            if ts - prev > tf:
                found.append((prev + tf, ts))
            prev = ts
        if s_hi - prev > tf:
            found.append((prev + tf, s_hi))
    for h_lo, h_hi in sorted(found):
        append_range(out, h_lo, h_hi)
