"""PostgreSQL candle store: the same contract as the SQLite ``Store``, shared by many daemons.

Same tables, columns, key and semantics as ``actors.store.Store`` (candles, gaps, series), plus
``nodes`` and ``leases`` for clustering: each series is owned by one live daemon through a lease
whose fencing token grows by one on every change of owner. A fenced ``upsert`` checks the tokens
in the same transaction as the write, so a daemon that lost a lease (paused, partitioned, slow)
can never overwrite the new owner's work. Expiry uses the database's clock only.

Like ``Store``, it never logs, never sleeps and never retries a fault. Faults map onto the
store's exceptions so the storage actor can keep one policy for both back ends:

* ``StoreUnavailable`` (a ``StoreError``): transient. Connection lost or refused, server
  restarting or shutting down, read-only server (``default_transaction_read_only``, a standby),
  disk full and other out-of-resources errors, lock or statement timeouts, serialization
  failures and deadlocks. Nothing of the failed call was committed; answer the write with an
  error, and ``reopen()`` to reconnect before writing again (a broken connection keeps raising
  ``StoreUnavailable`` until then).
* ``StoreGone``: a table we need was dropped while open. ``reopen()`` recreates it (and
  ``check()`` notices a table recreated by someone else), as with a deleted SQLite file.
* ``StoreError``: not open, a read-only store asked to write, bad URL or credentials, missing
  database, or anything else the store cannot do.
* Rows that break the schema (a NULL price) raise psycopg's ``IntegrityError`` unchanged, as the
  SQLite store lets ``sqlite3.IntegrityError`` through: that is a bug, not a fault.

The password (from the URL, ``PGPASSWORD`` or a ``.pgpass`` file, all handled by libpq) never
appears in ``repr()``, ``url`` or any exception text: messages are redacted and an exception is
chained to the driver's only when the driver's text holds no secret.

TimescaleDB: when the server offers the extension (``pg_available_extensions``) and the candles
table is created by this store, the table becomes a hypertable partitioned on ``ts`` (integer
milliseconds, ``timescale_chunk_ms`` per chunk). If that fails (the extension is not preloaded,
or no privilege) a plain table is used and ``hypertable_note`` says why; ``timescale=False``
never tries, ``timescale=True`` makes failure a ``StoreError``.
"""

from __future__ import annotations

import functools
import os
import re
from itertools import groupby
from operator import itemgetter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, overload
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql

from actors.store import Candle, Row, StoreError, StoreGone, _append, _subtract

__all__ = [
    "PostgresStore",
    "StoreUnavailable",
    "FencedWrite",
    "Lease",
    "Strategy",
]

Key = tuple[str, str, str]
Strategy = Literal["auto", "copy", "values"]
Conn = psycopg.Connection[tuple[Any, ...]]


class StoreUnavailable(StoreError):
    """The server cannot take this now (connection lost, restarting, read-only, disk full, lock
    timeout): nothing was committed. Answer with an error; ``reopen()`` before writing again."""


@dataclass(frozen=True)
class FencedWrite:
    """What a fenced ``upsert`` did: rows inserted or changed, and the fence keys refused
    because their lease now has another owner or a newer token (nothing of those was stored)."""

    changed: int
    refused: frozenset[Any]


@dataclass(frozen=True)
class Lease:
    """One row of ``leases`` as ``ctl cluster`` shows it; ``remaining_s`` by the database clock
    (negative once expired); ``owner`` None once released."""

    exchange: str
    symbol: str
    timeframe: str
    owner: str | None
    token: int
    expires_at: datetime
    remaining_s: float

    @property
    def live(self) -> bool:
        return self.owner is not None and self.remaining_s > 0


# -- schema ------------------------------------------------------------------------------------

_TABLES = ("candles", "gaps", "series", "nodes", "leases")

# Exactly the SQLite contract (BIGINT for INTEGER, DOUBLE PRECISION for REAL).
_DDL: dict[str, str] = {
    "candles": """CREATE TABLE IF NOT EXISTS candles (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    ts BIGINT NOT NULL,
    open DOUBLE PRECISION NOT NULL,
    high DOUBLE PRECISION NOT NULL,
    low DOUBLE PRECISION NOT NULL,
    close DOUBLE PRECISION NOT NULL,
    volume DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe, ts))""",
    "gaps": """CREATE TABLE IF NOT EXISTS gaps (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    ts_from BIGINT NOT NULL,
    ts_to BIGINT NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe, ts_from))""",
    "series": """CREATE TABLE IF NOT EXISTS series (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (exchange, symbol, timeframe))""",
    # heartbeat_at/expires_at come from the database clock, never a node's
    "nodes": """CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    rate_budget DOUBLE PRECISION NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ NOT NULL)""",
    # rows are never deleted, so a series' token never goes back; owner NULL = released
    "leases": """CREATE TABLE IF NOT EXISTS leases (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    owner TEXT,
    token BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe))""",
}

# Serialises schema creation between daemons opening one empty database at once.
_SCHEMA_LOCK = 0x636B_7363  # "ckcs"

_TS = itemgetter(3)
_SERIES_OF = itemgetter(0, 1, 2)
_COLS = "exchange, symbol, timeframe, ts, open, high, low, close, volume"
_TYPES = ["text", "text", "text", "int8", "float8", "float8", "float8", "float8", "float8"]
_SERIES = "exchange = %s AND symbol = %s AND timeframe = %s"

# Rewrite a row only when a value changed (the same rule as SQLite's IS NOT): re-fetched
# closed candles then cost an index probe, not a new row version, and rowcount says how many
# rows really changed.
_ON_CONFLICT = (
    " ON CONFLICT (exchange, symbol, timeframe, ts) DO UPDATE SET"
    " open = excluded.open, high = excluded.high, low = excluded.low,"
    " close = excluded.close, volume = excluded.volume"
    " WHERE (candles.open, candles.high, candles.low, candles.close, candles.volume)"
    " IS DISTINCT FROM (excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume)"
)

# The COPY strategy. Series of the batch with no stored candle inside the batch's time span
# cannot conflict: their rows are COPYed straight into candles (as fast as a raw COPY). The
# rest go through a staging table (per connection, emptied by every commit) and one
# INSERT ... SELECT ... ON CONFLICT. Measured in bench/store.py.
_OVERLAP = (
    "SELECT k.e, k.s, k.t FROM unnest(%s::text[], %s::text[], %s::text[], %s::int8[], %s::int8[])"
    " AS k(e, s, t, lo, hi) WHERE EXISTS (SELECT 1 FROM candles c WHERE c.exchange = k.e"
    " AND c.symbol = k.s AND c.timeframe = k.t AND c.ts >= k.lo AND c.ts <= k.hi)"
)
_COPY_CANDLES = f"COPY candles ({_COLS}) FROM STDIN (FORMAT BINARY)"
_STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS _ck_stage (exchange TEXT, symbol TEXT, timeframe TEXT,"
    " ts BIGINT, open DOUBLE PRECISION, high DOUBLE PRECISION, low DOUBLE PRECISION,"
    " close DOUBLE PRECISION, volume DOUBLE PRECISION) ON COMMIT DELETE ROWS"
)
_COPY_STAGE = f"COPY _ck_stage ({_COLS}) FROM STDIN (FORMAT BINARY)"
_STAGE_UPSERT = f"INSERT INTO candles ({_COLS}) SELECT {_COLS} FROM _ck_stage" + _ON_CONFLICT
_IN_KEYS = "(exchange, symbol, timeframe) IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))"

_CHUNK_ROWS = 1000  # rows per multi-row INSERT (9,000 parameters; the protocol allows 65,535)
_COPY_FROM_ROWS = 200  # "auto": batches this large go through COPY (bench/store.py)

# SQLSTATEs (class or full code) after which writing again later can succeed.
_TRANSIENT_CLASSES = ("08", "53", "57", "40", "58")  # connection, resources, operator, rollback, system
_TRANSIENT_CODES = {"25006", "55P03", "55006", "25P03", "XX000"}
_GONE_CODES = {"42P01"}  # undefined_table: dropped while we ran
_DUPLICATE_CODES = {"23505", "21000"}  # unique_violation, cardinality_violation (ON CONFLICT twice)
# Connection failures without SQLSTATE that writing again will not fix.
_PERMANENT_CONNECT = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "pg_hba.conf",
    "invalid port",
    "invalid URI",
    "invalid connection option",
    "invalid sslmode",
    "could not translate host name",
)


class _Duplicate(Exception):
    """The optimistic write met a duplicate key (inside the batch, or a racing writer)."""


def _key(k: Any) -> Key:
    if isinstance(k, tuple):
        e, s, t = k
        return (e, s, t)
    return (k.exchange, k.symbol, k.timeframe)


def _columns(keys: Iterable[Key]) -> tuple[list[str], list[str], list[str]]:
    es: list[str] = []
    ss: list[str] = []
    ts: list[str] = []
    for e, s, t in keys:
        es.append(e)
        ss.append(s)
        ts.append(t)
    return es, ss, ts


@functools.lru_cache(maxsize=16)
def _values_sql(n: int) -> str:
    """A multi-row INSERT ... ON CONFLICT for n rows, with $n placeholders (no client parsing)."""
    rows = ",".join("(" + ",".join(f"${i * 9 + j + 1}" for j in range(9)) + ")" for i in range(n))
    return f"INSERT INTO candles ({_COLS}) VALUES {rows}{_ON_CONFLICT}"


def _spans(rows: Sequence[Row]) -> dict[Key, tuple[int, int]]:
    """{series: (min ts, max ts)} of a batch. Rows come in runs of one series (one write each),
    so the work per row is done by C code (itemgetter, groupby, min, max), per run in Python."""
    spans: dict[Key, tuple[int, int]] = {}
    times = list(map(_TS, rows))
    i = 0
    for key, run in groupby(map(_SERIES_OF, rows)):
        n = len(list(run))
        lo, hi = min(times[i : i + n]), max(times[i : i + n])
        if key in spans:
            lo, hi = min(lo, spans[key][0]), max(hi, spans[key][1])
        spans[key] = (lo, hi)
        i += n
    return spans


def _copy(conn: Conn, statement: str, rows: Iterable[Row]) -> None:
    with conn.cursor().copy(statement) as copy:  # type: ignore[arg-type]
        copy.set_types(_TYPES)
        for row in rows:
            copy.write_row(row)


def _dedupe(rows: Sequence[Row]) -> list[Row]:
    """One row per key, the last one winning (what SQLite's row-by-row upsert leaves stored)."""
    return list({(r[0], r[1], r[2], r[3]): r for r in rows}.values())


# -- redaction ---------------------------------------------------------------------------------

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def _secrets(url: str) -> list[str]:
    found: list[str] = []
    try:
        raw = urlsplit(url).password if "://" in url else None
    except ValueError:
        raw = None
    if raw:
        found += [raw, unquote(raw)]
    m = _KV_PASSWORD.search(url)
    if m:
        found.append(m.group(2).strip("'"))
    env = os.environ.get("PGPASSWORD")
    if env:
        found.append(env)
    return sorted({s for s in found if s}, key=len, reverse=True)


class PostgresStore:
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
    ) -> None:
        self._url = url
        self._secrets = _secrets(url)
        self.readonly = readonly
        self.strategy: Strategy = strategy
        self.lock_timeout_s = lock_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.timescale = timescale
        self.timescale_chunk_ms = timescale_chunk_ms
        self.hypertable = False
        self.hypertable_note: str | None = None
        #: fenced writes refused (series, rows) since this object was made
        self.refused_writes = 0
        self.refused_rows = 0
        self._conn: Conn | None = None
        self._candles_oid: int | None = None
        self._stage_ready = False
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

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _URL_PASSWORD.sub(r"\1***@", text)
        return _KV_PASSWORD.sub(r"\1***", text)

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
        failed: StoreError | None = None
        try:
            conn: Conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=self.connect_timeout_s,
                application_name="candlekeeper",
            )
        except psycopg.Error as exc:
            failed = self._connect_error(exc)
        if failed is not None:  # raised outside the handler: the driver's error (which may
            raise failed  # quote the connection string) is not even its __context__
        try:
            conn.execute("SET jit = off")  # JIT compiles big upserts for longer than they run
            conn.execute("SET temp_buffers = '64MB'")  # COPY staging stays in memory
            conn.execute(sql.SQL("SET lock_timeout = {}").format(int(self.lock_timeout_s * 1000)))
            if self.readonly:
                conn.execute("SET default_transaction_read_only = on")
            created = self._ensure_schema(conn)
            row = conn.execute("SELECT to_regclass('candles')::oid").fetchone()
            self._candles_oid = int(row[0]) if row and row[0] is not None else None
        except psycopg.Error as exc:
            conn.close()
            raise self._translate(exc, "cannot open") from None
        except StoreError:
            conn.close()
            raise
        self._conn = conn
        self._recreated = created if self._opened_before else ()
        self._opened_before = True
        return self

    def _ensure_schema(self, conn: Conn) -> tuple[str, ...]:
        """Create the missing tables; returns their names. Skips all DDL when nothing is
        missing, so a read-only server (or store) can still be opened for reading."""
        missing = self._missing_tables(conn)
        if not missing:
            return ()
        if self.readonly:
            raise StoreError(f"{self.url} has no candlekeeper schema (missing: {', '.join(missing)})")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            missing = self._missing_tables(conn)  # another daemon may have just made them
            for table in missing:
                conn.execute(_DDL[table])  # type: ignore[arg-type]
            if "candles" in missing and self.timescale is not False:
                self._make_hypertable(conn)
        return tuple(missing)

    @staticmethod
    def _missing_tables(conn: Conn) -> list[str]:
        rows = conn.execute(
            "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL", (list(_TABLES),)
        ).fetchall()
        return [r[0] for r in rows]

    def _make_hypertable(self, conn: Conn) -> None:
        """Turn the new candles table into a TimescaleDB hypertable where the server offers it."""
        avail = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
        if avail is None:
            self.hypertable_note = "timescaledb is not available on this server"
            if self.timescale:
                raise StoreError(f"{self.url}: timescale=True but {self.hypertable_note}")
            return
        try:
            with conn.transaction():  # a savepoint: failure leaves the plain table
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                conn.execute(
                    "SELECT create_hypertable('candles', 'ts', chunk_time_interval => %s::bigint,"
                    " if_not_exists => TRUE, migrate_data => TRUE)",
                    (self.timescale_chunk_ms,),
                )
            self.hypertable, self.hypertable_note = True, None
        except psycopg.Error as exc:
            self.hypertable_note = f"plain table: timescaledb failed: {self._redact(str(exc)).strip()}"
            if self.timescale:
                raise StoreError(f"{self.url}: {self.hypertable_note}") from None

    def close(self) -> None:
        """Close the connection; errors are swallowed since the server may be gone."""
        self._wanted = False
        self._disconnect()

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

    def _connect_error(self, exc: psycopg.Error) -> StoreError:
        text = self._redact(str(exc)).strip()
        if isinstance(exc, psycopg.OperationalError) and not any(m in text for m in _PERMANENT_CONNECT):
            return StoreUnavailable(f"cannot connect to {self.url}: {text}")
        return StoreError(f"cannot open {self.url}: {text}")

    def _translate(self, exc: psycopg.Error, what: str) -> BaseException:
        """The store exception for a driver error (or the error itself when it is a bug)."""
        state = exc.sqlstate or ""
        text = self._redact(str(exc)).strip()
        if state in _GONE_CODES:
            out: BaseException = StoreGone(f"{self.url}: {what}: a table was dropped while open ({text}); reopen() recreates it")
        elif (
            state[:2] in _TRANSIENT_CLASSES
            or state in _TRANSIENT_CODES
            or (isinstance(exc, psycopg.OperationalError) and not state)
            or (self._conn is not None and self._conn.broken)
        ):
            out = StoreUnavailable(f"{self.url}: {what}: {text}")
        elif isinstance(exc, (psycopg.IntegrityError, psycopg.DataError)) and text == str(exc).strip():
            return exc  # a bad row: a bug, as in the SQLite store
        else:
            out = StoreError(f"{self.url}: {what}: {text}")
        if text == str(exc).strip():
            out.__cause__ = exc  # keep the driver's error when it holds no secret
        if state:
            out.sqlstate = state  # type: ignore[attr-defined]
        return out

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
            err = self._translate(exc, what)
            if err is exc:
                raise
            if err.__cause__ is None:  # the driver's text held a secret: scrub it there too
                exc.args = (self._redact(str(exc)),)
            raise err from err.__cause__

    # -- candles -------------------------------------------------------------------------

    @overload
    def upsert(self, rows: Sequence[Row], fence: None = None, *, strategy: Strategy | None = None) -> int: ...

    @overload
    def upsert(self, rows: Sequence[Row], fence: Mapping[Any, int], *, strategy: Strategy | None = None) -> FencedWrite: ...

    def upsert(
        self,
        rows: Sequence[Row],
        fence: Mapping[Any, int] | None = None,
        *,
        strategy: Strategy | None = None,
    ) -> int | FencedWrite:
        """Insert or correct candles in one transaction; returns rows inserted or changed.

        Idempotent: the same rows again change nothing and return 0. Several rows with one key
        in a batch: the last one is stored (counted once). With ``fence`` ({series key: token},
        one entry per series in ``rows``), series whose lease row no longer carries that token
        (another owner took it, or it was released) are refused in the same transaction,
        under a share lock on their lease rows: nothing of them is stored, and a
        ``FencedWrite`` says which were refused.
        """
        if fence is None and not rows:
            return 0
        how = strategy or self.strategy
        if how not in ("auto", "copy", "values"):
            raise ValueError(f"unknown strategy {how!r}")
        fenced: dict[Key, tuple[int, Any]] | None = None
        if fence is not None:
            fenced = {_key(k): (int(tok), k) for k, tok in fence.items()}
            unfenced = {(r[0], r[1], r[2]) for r in rows} - fenced.keys()
            if unfenced:
                raise ValueError(f"fenced upsert has rows of series without a token: {sorted(unfenced)[:3]}")
        with self._db("upsert", write=True) as conn:
            try:
                changed, refused = self._upsert_tx(conn, rows, fenced, how, safe=False)
            except _Duplicate:
                changed, refused = self._upsert_tx(conn, _dedupe(rows), fenced, how, safe=True)
        if fenced is None:
            return changed
        self.refused_writes += len(refused)
        self.refused_rows += sum(1 for r in rows if (r[0], r[1], r[2]) in refused) if refused else 0
        return FencedWrite(changed, frozenset(fenced[k][1] for k in refused))

    def _upsert_tx(
        self, conn: Conn, rows: Sequence[Row], fenced: dict[Key, tuple[int, Any]] | None, how: str, safe: bool
    ) -> tuple[int, set[Key]]:
        refused: set[Key] = set()
        try:
            with conn.transaction():
                if fenced:
                    refused = self._fence_check(conn, fenced)
                    if refused:
                        rows = [r for r in rows if (r[0], r[1], r[2]) not in refused]
                if not rows:
                    return 0, refused
                self._stage_used = False
                copy = how == "copy" or (how == "auto" and len(rows) >= _COPY_FROM_ROWS)
                changed = self._write_copy(conn, rows, safe) if copy else self._write_values(conn, rows)
        except (psycopg.errors.UniqueViolation, psycopg.errors.CardinalityViolation) as exc:
            if safe or exc.sqlstate not in _DUPLICATE_CODES:
                raise
            raise _Duplicate() from None
        if self._stage_used:
            self._stage_ready = True  # committed, so the temporary table exists from now on
        return changed, refused

    def _fence_check(self, conn: Conn, fenced: dict[Key, tuple[int, Any]]) -> set[Key]:
        """Series whose lease token is not the one given; their lease rows stay share-locked
        until commit, so no owner change can slip between this check and the write."""
        keys = sorted(fenced)
        held = conn.execute(
            "SELECT exchange, symbol, timeframe, token FROM leases"
            f" WHERE owner IS NOT NULL AND {_IN_KEYS}"
            " ORDER BY exchange, symbol, timeframe FOR SHARE",
            _columns(keys),
        ).fetchall()
        current = {(e, s, t): tok for e, s, t, tok in held}
        return {k for k in keys if current.get(k) != fenced[k][0]}

    def _write_copy(self, conn: Conn, rows: Sequence[Row], safe: bool) -> int:
        """COPY new series straight into candles, the others through the staging table.

        A duplicate key among the COPYed rows (inside the batch, or a writer racing us) raises
        and the caller writes the deduplicated batch again with ``safe``: everything through
        the staging table's ON CONFLICT.
        """
        if safe:
            return self._copy_upsert(conn, rows)
        spans = _spans(rows)
        cols = _columns(spans)
        overlap = {(e, s, t) for e, s, t in conn.execute(
            _OVERLAP, (*cols, [lo for lo, _ in spans.values()], [hi for _, hi in spans.values()])
        )}
        if not overlap:
            fresh, old = rows, ()
        elif len(overlap) == len(spans):
            fresh, old = (), rows
        else:
            fresh = [r for r in rows if (r[0], r[1], r[2]) not in overlap]
            old = [r for r in rows if (r[0], r[1], r[2]) in overlap]
        changed = 0
        if fresh:
            _copy(conn, _COPY_CANDLES, fresh)
            changed = len(fresh)
        if old:
            changed += self._copy_upsert(conn, old)
        return changed

    def _copy_upsert(self, conn: Conn, rows: Sequence[Row]) -> int:
        if not self._stage_ready:
            conn.execute(_STAGE_DDL)
            self._stage_used = True
        _copy(conn, _COPY_STAGE, rows)
        return conn.execute(_STAGE_UPSERT).rowcount

    def _write_values(self, conn: Conn, rows: Sequence[Row]) -> int:
        """Multi-row INSERT ... ON CONFLICT, 1000 rows a statement (prepared after a few)."""
        cur = psycopg.RawCursor(conn)
        changed = 0
        for i in range(0, len(rows), _CHUNK_ROWS):
            chunk = rows[i : i + _CHUNK_ROWS]
            cur.execute(_values_sql(len(chunk)), [v for row in chunk for v in row])  # type: ignore[arg-type]
            changed += cur.rowcount
        return changed

    def last_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None:
        """Open time of the newest stored candle, or None."""
        return self._one(f"SELECT max(ts) FROM candles WHERE {_SERIES}", (exchange, symbol, timeframe))

    def first_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None:
        """Open time of the oldest stored candle, or None."""
        return self._one(f"SELECT min(ts) FROM candles WHERE {_SERIES}", (exchange, symbol, timeframe))

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
            f"SELECT count(*) FROM candles WHERE {_SERIES} AND ts >= %s AND ts < %s",
            (exchange, symbol, timeframe, lo, hi),
        ))

    def stored_ts(self, exchange: str, symbol: str, timeframe: str, start_ms: int, end_ms: int) -> list[int]:
        """Open times stored in [start_ms, end_ms)."""
        with self._db("stored_ts") as conn:
            return [r[0] for r in conn.execute(
                f"SELECT ts FROM candles WHERE {_SERIES} AND ts >= %s AND ts < %s ORDER BY ts",
                (exchange, symbol, timeframe, start_ms, end_ms),
            )]

    def stored_keys(self, ranges: Sequence[tuple[str, str, str, int, int]]) -> set[tuple[str, str, str, int]]:
        """(exchange, symbol, timeframe, ts) of the stored candles in each (exchange, symbol,
        timeframe, start_ms, end_ms) range: one statement for all ranges."""
        if not ranges:
            return set()
        cols: list[list[Any]] = [[], [], [], [], []]
        for r in ranges:
            for c, v in zip(cols, r):
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
                f"SELECT ts, open, high, low, close, volume FROM candles WHERE {_SERIES}"
                " ORDER BY ts DESC LIMIT %s",
                (exchange, symbol, timeframe, n),
            ).fetchall()  # type: ignore[return-value]

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
                f"SELECT ts, open, high, low, close, volume FROM candles WHERE {_SERIES}"
                " AND ts >= %s AND ts < %s ORDER BY ts",
                (exchange, symbol, timeframe, lo, hi),
            ).fetchall()  # type: ignore[return-value]

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
            first, last = conn.execute(  # two index probes
                f"SELECT min(ts), max(ts) FROM candles WHERE {_SERIES} AND ts >= %s AND ts < %s",
                (*key, start_ms, end_ms),
            ).fetchone() or (None, None)
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
                f"SELECT ts_from, ts_to FROM gaps WHERE {_SERIES} AND ts_to > %s AND ts_from < %s ORDER BY ts_from",
                (*key, start_ms, end_ms),
            ).fetchall()
        return _subtract(missing, known) if known else missing  # type: ignore[arg-type]

    # -- genuine gaps --------------------------------------------------------------------

    def record_gap(self, exchange: str, symbol: str, timeframe: str, ts_from: int, ts_to: int) -> None:
        """Remember that the exchange has no candles in [ts_from, ts_to), so it is not refetched."""
        if ts_to <= ts_from:
            raise ValueError(f"empty gap [{ts_from}, {ts_to})")
        with self._db("record_gap", write=True) as conn:
            conn.execute(
                "INSERT INTO gaps (exchange, symbol, timeframe, ts_from, ts_to) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (exchange, symbol, timeframe, ts_from)"
                " DO UPDATE SET ts_to = GREATEST(gaps.ts_to, excluded.ts_to)",
                (exchange, symbol, timeframe, ts_from, ts_to),
            )

    def gaps(self, exchange: str, symbol: str, timeframe: str) -> list[tuple[int, int]]:
        """Recorded genuine gaps of a series as [from, to) ranges, oldest first."""
        with self._db("gaps") as conn:
            return conn.execute(
                f"SELECT ts_from, ts_to FROM gaps WHERE {_SERIES} ORDER BY ts_from", (exchange, symbol, timeframe)
            ).fetchall()  # type: ignore[return-value]

    # -- run-time series -----------------------------------------------------------------

    def add_series(self, exchange: str, symbol: str, timeframe: str, added_at_ms: int | None = None) -> bool:
        """Persist a series added at run time; False if it was already active."""
        return self._set_series(exchange, symbol, timeframe, added_at_ms, 1)

    def remove_series(self, exchange: str, symbol: str, timeframe: str) -> bool:
        """Persist that a series was removed at run time (a configured one too, so a restart
        does not bring it back); its candles stay. False if it was already removed."""
        return self._set_series(exchange, symbol, timeframe, None, 0)

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

    # -- cluster: nodes and leases -------------------------------------------------------

    def db_now(self) -> datetime:
        """The database's clock: the only clock leases and heartbeats are judged by."""
        return self._one("SELECT clock_timestamp()")  # type: ignore[no-any-return]

    def heartbeat(self, node: str, rate_budget: float, lease_seconds: float) -> None:
        """Say ``node`` is alive for ``lease_seconds`` more (database clock), with its budget."""
        _check_seconds(lease_seconds)
        with self._db("heartbeat", write=True) as conn:
            conn.execute(
                "INSERT INTO nodes (node, rate_budget, heartbeat_at, expires_at, started_at)"
                " VALUES (%s, %s, clock_timestamp(), clock_timestamp() + make_interval(secs => %s::float8), clock_timestamp())"
                " ON CONFLICT (node) DO UPDATE SET rate_budget = excluded.rate_budget,"
                " heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at",
                (node, rate_budget, lease_seconds),
            )

    def live_nodes(self, now: datetime | None = None) -> dict[str, float]:
        """{node: rate_budget} of the nodes whose heartbeat has not expired at ``now``
        (default: the database's clock now)."""
        with self._db("live_nodes") as conn:
            rows = conn.execute(
                "SELECT node, rate_budget FROM nodes WHERE expires_at > COALESCE(%s, clock_timestamp()) ORDER BY node",
                (now,),
            ).fetchall()
        return {n: float(b) for n, b in rows}

    def leave(self, node: str) -> int:
        """A graceful goodbye: the node stops counting as live and its leases are released.
        Returns how many leases it held."""
        with self._db("leave", write=True) as conn, conn.transaction():
            conn.execute("UPDATE nodes SET expires_at = clock_timestamp() WHERE node = %s", (node,))
            return conn.execute(
                "UPDATE leases SET owner = NULL, expires_at = clock_timestamp() WHERE (exchange, symbol, timeframe) IN"
                " (SELECT exchange, symbol, timeframe FROM leases WHERE owner = %s"
                " ORDER BY exchange, symbol, timeframe FOR UPDATE)",
                (node,),
            ).rowcount

    def acquire(self, key: Any, node: str, lease_seconds: float) -> int | None:
        """Take (or extend) the lease of a series; its fencing token, or None while another node
        holds it unexpired. The token grows by one on every change of owner (a release counts:
        the next holder, even the same node, gets a new token) and is never reused."""
        _check_seconds(lease_seconds)
        e, s, t = _key(key)
        with self._db("acquire", write=True) as conn:
            row = conn.execute(
                "INSERT INTO leases AS l (exchange, symbol, timeframe, owner, token, expires_at)"
                " VALUES (%s, %s, %s, %s, 1, clock_timestamp() + make_interval(secs => %s::float8))"
                " ON CONFLICT (exchange, symbol, timeframe) DO UPDATE SET owner = excluded.owner,"
                " token = l.token + CASE WHEN l.owner IS NOT DISTINCT FROM excluded.owner THEN 0 ELSE 1 END,"
                " expires_at = excluded.expires_at"
                " WHERE l.owner IS NULL OR l.owner = excluded.owner OR l.expires_at <= clock_timestamp()"
                " RETURNING token",
                (e, s, t, node, lease_seconds),
            ).fetchone()
        return None if row is None else int(row[0])

    def renew(self, keys: Iterable[Any], node: str, lease_seconds: float) -> set[Any]:
        """Extend the leases ``node`` still owns among ``keys``; returns those keys. A lease
        that expired but was not taken by anyone is renewed with its token unchanged (no
        other node can have written with a newer one)."""
        _check_seconds(lease_seconds)
        wanted = {_key(k): k for k in keys}
        if not wanted:
            return set()
        with self._db("renew", write=True) as conn:
            rows = conn.execute(
                "UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => %s::float8)"
                " WHERE (exchange, symbol, timeframe) IN (SELECT exchange, symbol, timeframe FROM leases"
                f" WHERE owner = %s AND {_IN_KEYS} ORDER BY exchange, symbol, timeframe FOR UPDATE)"
                " RETURNING exchange, symbol, timeframe",
                (lease_seconds, node, *_columns(sorted(wanted))),
            ).fetchall()
        return {wanted[(e, s, t)] for e, s, t in rows}

    def release(self, keys: Iterable[Any], node: str) -> set[Any]:
        """Give up ``node``'s leases among ``keys`` (they become free at once); returns the keys
        that were released. The token stays: the next owner gets token + 1."""
        wanted = {_key(k): k for k in keys}
        if not wanted:
            return set()
        with self._db("release", write=True) as conn:
            rows = conn.execute(
                "UPDATE leases SET owner = NULL, expires_at = clock_timestamp()"
                " WHERE (exchange, symbol, timeframe) IN (SELECT exchange, symbol, timeframe FROM leases"
                f" WHERE owner = %s AND {_IN_KEYS} ORDER BY exchange, symbol, timeframe FOR UPDATE)"
                " RETURNING exchange, symbol, timeframe",
                (node, *_columns(sorted(wanted))),
            ).fetchall()
        return {wanted[(e, s, t)] for e, s, t in rows}

    def leases(self) -> list[Lease]:
        """Every lease row (held, expired or released), by series."""
        with self._db("leases") as conn:
            rows = conn.execute(
                "SELECT exchange, symbol, timeframe, owner, token, expires_at,"
                " extract(epoch FROM expires_at - clock_timestamp())::float8"
                " FROM leases ORDER BY exchange, symbol, timeframe"
            ).fetchall()
        return [Lease(*r) for r in rows]

    # -- helpers -------------------------------------------------------------------------

    def _one(self, query: str, params: Sequence[Any] = (), what: str = "query") -> Any:
        with self._db(what) as conn:
            row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]


def _check_seconds(s: float) -> None:
    if not s >= 0:
        raise ValueError(f"lease_seconds must be >= 0, not {s!r}")


_LEAF = 2048  # candle times per counted stretch; stretches short of candles are scanned


def _holes(conn: Conn, key: Key, tf: int, lo: int, hi: int, out: list[tuple[int, int]]) -> None:
    """Append the holes in [lo, hi) (``lo`` and ``hi - tf`` stored candle times) to ``out``.

    Stretches of ``_LEAF`` candle times are aligned on ``lo``, so a stretch whose count
    matches its length has no hole (as in the SQLite store's bisection); stretches with no
    candle at all are holes whole; the others are scanned, as SQLite's leaves are.
    """
    width = _LEAF * tf
    counts = conn.execute(
        f"SELECT (ts - %s) / %s AS b, count(*) FROM candles WHERE {_SERIES} AND ts >= %s AND ts < %s"
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
            f"SELECT ts FROM candles WHERE {_SERIES} AND ts >= %s AND ts < %s ORDER BY ts", (*key, s_lo, s_hi)
        ):
            if ts - prev > tf:
                found.append((prev + tf, ts))
            prev = ts
        if s_hi - prev > tf:
            found.append((prev + tf, s_hi))
    for h_lo, h_hi in sorted(found):
        _append(out, h_lo, h_hi)
