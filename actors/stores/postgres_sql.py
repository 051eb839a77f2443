"""The PostgreSQL store's schema and statements, and the pure helpers the bulk writes use."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any, TypeAlias

import psycopg

from ..market.candles import GapRow, Row

Key = tuple[str, str, str]
Conn: TypeAlias = "psycopg.Connection[tuple[Any, ...]]"

TABLES = ("candles", "gaps", "series", "nodes", "leases")

# Exactly the SQLite contract (BIGINT for INTEGER, DOUBLE PRECISION for REAL).
DDL: dict[str, str] = {
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
    reason TEXT NOT NULL DEFAULT 'exchange_hole',
    PRIMARY KEY (exchange, symbol, timeframe, ts_from))""",
    "series": """CREATE TABLE IF NOT EXISTS series (
    exchange TEXT NOT NULL,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (exchange, symbol, timeframe))""",
    # heartbeat_at/expires_at come from the database clock, never a node's; incarnation tells
    # one run of a daemon from the next under the same node name
    "nodes": """CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    rate_budget DOUBLE PRECISION NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    incarnation TEXT)""",
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
SCHEMA_LOCK = 0x636B_7363

COLS = "exchange, symbol, timeframe, ts, open, high, low, close, volume"
TYPES = ["text", "text", "text", "int8", "float8", "float8", "float8", "float8", "float8"]
SERIES = "exchange = %s AND symbol = %s AND timeframe = %s"
IN_KEYS = "(exchange, symbol, timeframe) IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))"

# Rewrite a row only when a value changed (the SQLite store's IS NOT rule): re-fetched closed
# candles then cost an index probe, not a new row version, and rowcount says how many rows
# really changed.
ON_CONFLICT = (
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
OVERLAP = (
    "SELECT k.e, k.s, k.t FROM unnest(%s::text[], %s::text[], %s::text[], %s::int8[], %s::int8[])"
    " AS k(e, s, t, lo, hi) WHERE EXISTS (SELECT 1 FROM candles c WHERE c.exchange = k.e"
    " AND c.symbol = k.s AND c.timeframe = k.t AND c.ts >= k.lo AND c.ts <= k.hi)"
)
COPY_CANDLES = f"COPY candles ({COLS}) FROM STDIN (FORMAT BINARY)"
STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS _ck_stage (exchange TEXT, symbol TEXT, timeframe TEXT,"
    " ts BIGINT, open DOUBLE PRECISION, high DOUBLE PRECISION, low DOUBLE PRECISION,"
    " close DOUBLE PRECISION, volume DOUBLE PRECISION) ON COMMIT DELETE ROWS"
)
COPY_STAGE = f"COPY _ck_stage ({COLS}) FROM STDIN (FORMAT BINARY)"
STAGE_UPSERT = f"INSERT INTO candles ({COLS}) SELECT {COLS} FROM _ck_stage" + ON_CONFLICT

# A fenced write (clustering) stages everything first, holding no lock, then locks, checks and
# writes in ONE simple-protocol message that ends with COMMIT: once it is sent the server needs
# nothing more from the writer, so a writer stopped at any moment (SIGSTOP, a VM pause) never
# holds its share lock on the lease rows while the server waits for it. (A writer stopped in the
# middle of a COPY under that lock looked active to the server, which never ended it, and every
# takeover of its series waited for as long as it stayed stopped.)
FENCE_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS _ck_fence (exchange TEXT, symbol TEXT, timeframe TEXT, token BIGINT)"
    " ON COMMIT DELETE ROWS;"
    " CREATE TEMP TABLE IF NOT EXISTS _ck_gaps (exchange TEXT, symbol TEXT, timeframe TEXT, ts_from BIGINT,"
    " ts_to BIGINT, reason TEXT) ON COMMIT DELETE ROWS"
)
COPY_FENCE = "COPY _ck_fence (exchange, symbol, timeframe, token) FROM STDIN (FORMAT BINARY)"
FENCE_TYPES = ["text", "text", "text", "int8"]
COPY_GAPS = "COPY _ck_gaps (exchange, symbol, timeframe, ts_from, ts_to, reason) FROM STDIN (FORMAT BINARY)"
GAP_TYPES = ["text", "text", "text", "int8", "int8", "text"]
_HELD = ("JOIN _ck_fence f USING (exchange, symbol, timeframe) JOIN leases l USING (exchange, symbol, timeframe)"
         " WHERE l.owner IS NOT NULL AND l.token = f.token")
FENCED_COMMIT = (
    # the lease rows of the batch's series, share-locked (no change of owner commits until this
    # transaction ends); the series whose lease does not carry the writer's token come back
    "SELECT f.exchange, f.symbol, f.timeframe FROM _ck_fence f LEFT JOIN ("
    " SELECT exchange, symbol, timeframe, token FROM leases WHERE owner IS NOT NULL"
    " AND (exchange, symbol, timeframe) IN (SELECT exchange, symbol, timeframe FROM _ck_fence)"
    " ORDER BY exchange, symbol, timeframe FOR SHARE) l USING (exchange, symbol, timeframe)"
    " WHERE l.token IS DISTINCT FROM f.token;"
    f" INSERT INTO candles ({COLS}) SELECT {COLS} FROM _ck_stage {_HELD}" + ON_CONFLICT + ";"
    " INSERT INTO gaps (exchange, symbol, timeframe, ts_from, ts_to, reason)"
    f" SELECT exchange, symbol, timeframe, ts_from, ts_to, reason FROM _ck_gaps {_HELD}"
    " ON CONFLICT (exchange, symbol, timeframe, ts_from)"
    " DO UPDATE SET ts_to = GREATEST(gaps.ts_to, excluded.ts_to), reason = excluded.reason;"
    " COMMIT"
)


def merge_gaps(gaps: Iterable[GapRow]) -> list[GapRow]:
    """One row per (series, start), as recording them one by one leaves it: the widest end,
    the last reason (one INSERT cannot update a row twice)."""
    out: dict[tuple[str, str, str, int], GapRow] = {}
    for g in gaps:
        k = (g[0], g[1], g[2], g[3])
        before = out.get(k)
        out[k] = g if before is None else (g[0], g[1], g[2], g[3], max(g[4], before[4]), g[5])
    return list(out.values())


def copy_typed(conn: Conn, statement: str, types: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Binary COPY of rows of the given types."""
    with conn.cursor().copy(statement) as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)


# A confirmed gap: a later confirmation of the same start widens it and takes its reason.
RECORD_GAP = (
    "INSERT INTO gaps (exchange, symbol, timeframe, ts_from, ts_to, reason) VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (exchange, symbol, timeframe, ts_from)"
    " DO UPDATE SET ts_to = GREATEST(gaps.ts_to, excluded.ts_to), reason = excluded.reason"
)

CHUNK_ROWS = 1000  # rows per multi-row INSERT (9,000 parameters; the protocol allows 65,535)

_TS = itemgetter(3)
_SERIES_OF = itemgetter(0, 1, 2)


def key_of(k: Any) -> Key:
    """(exchange, symbol, timeframe) of a 3-tuple or a SeriesKey-like object."""
    if isinstance(k, tuple):
        e, s, t = k
        return (e, s, t)
    return (k.exchange, k.symbol, k.timeframe)


def key_columns(keys: Iterable[Key]) -> tuple[list[str], list[str], list[str]]:
    """Keys as three parallel lists, the parameters of ``IN_KEYS``."""
    es: list[str] = []
    ss: list[str] = []
    ts: list[str] = []
    for e, s, t in keys:
        es.append(e)
        ss.append(s)
        ts.append(t)
    return es, ss, ts


@functools.lru_cache(maxsize=16)
def values_sql(n: int) -> str:
    """A multi-row INSERT ... ON CONFLICT for n rows, with $n placeholders (a RawCursor then
    sends it as it is: psycopg would otherwise re-parse the long query text every call)."""
    rows = ",".join("(" + ",".join(f"${i * 9 + j + 1}" for j in range(9)) + ")" for i in range(n))
    return f"INSERT INTO candles ({COLS}) VALUES {rows}{ON_CONFLICT}"


def spans(rows: Sequence[Row]) -> dict[Key, tuple[int, int]]:
    """{series: (min ts, max ts)} of a batch. Rows come in runs of one series (one write each),
    so the work per row is done by C code (itemgetter, groupby, min, max), per run in Python."""
    out: dict[Key, tuple[int, int]] = {}
    times = list(map(_TS, rows))
    i = 0
    for key, run in groupby(map(_SERIES_OF, rows)):
        n = len(list(run))
        lo, hi = min(times[i : i + n]), max(times[i : i + n])
        if key in out:
            lo, hi = min(lo, out[key][0]), max(hi, out[key][1])
        out[key] = (lo, hi)
        i += n
    return out


def copy_rows(conn: Conn, statement: str, rows: Iterable[Row]) -> None:
    """Binary COPY of candle rows."""
    with conn.cursor().copy(statement) as copy:
        copy.set_types(TYPES)
        for row in rows:
            copy.write_row(row)


def dedupe(rows: Sequence[Row]) -> list[Row]:
    """One row per key, the last one winning (what SQLite's row-by-row upsert leaves stored)."""
    return list({(r[0], r[1], r[2], r[3]): r for r in rows}.values())
