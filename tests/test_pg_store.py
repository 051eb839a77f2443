"""PostgreSQL store against a real server: the SQLite store's contract, faults that lose
nothing, and leases with fencing tokens between racing nodes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

import candlekeeper.actors.stores.postgres as mod
from candlekeeper.actors.stores.errors import StoreError, StoreGone
from candlekeeper.actors.stores.postgres import FencedWrite, PostgresStore, StoreUnavailable

if TYPE_CHECKING:  # imported by pytest as a plugin, below (importing it here first would
    from tests.pg import PgDatabase  # keep pytest from rewriting its asserts)

# the server fixtures (pg_cluster, pg_db); tests/conftest.py may load this plugin for every file
pytest_plugins = ["tests.pg"]

TF = 60_000
KEY = ("binance", "BTC/USDT", "1m")
ETH = ("binance", "ETH/USDT", "1m")
STRATEGIES = ["values", "copy"]


def rows(times, exchange="binance", symbol="BTC/USDT", tf="1m", close=1.5):
    return [(exchange, symbol, tf, t, 1.0, 2.0, 0.5, close, 3.0) for t in times]


def minutes(a: int, b: int) -> list[int]:
    return list(range(a * TF, b * TF, TF))


@pytest.fixture
def store(pg_db: PgDatabase) -> Iterator[PostgresStore]:
    with PostgresStore(pg_db.url) as s:
        yield s


def admin_sql(db: PgDatabase, *statements: str) -> None:
    with db.admin() as conn:
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]


def wait_until_blocked(db: PgDatabase, app: str = "candlekeeper", timeout: float = 10.0) -> None:
    """Until a session of ``app`` waits on a lock (asked of the server: there is no event)."""
    deadline = time.monotonic() + timeout
    with db.admin() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                (app,),
            ).fetchone()
            if row and row[0]:
                return
            conn.execute("SELECT pg_sleep(0.005)")
    raise AssertionError("the write never waited on the lease lock")


class Thread(threading.Thread):
    """A thread whose result or exception the test collects with ``result()``."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def result(self, timeout: float = 20.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


# -- the SQLite contract -------------------------------------------------------------------


def test_schema_is_exact(store, pg_db):
    with pg_db.admin() as conn:
        def cols(table):
            return conn.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
                " WHERE table_name = %s ORDER BY ordinal_position", (table,)).fetchall()

        def pk(table):
            return [r[0] for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary"
                " ORDER BY array_position(i.indkey, a.attnum)", (table,)).fetchall()]

        text, big, dbl = "text", "bigint", "double precision"
        assert cols("candles") == [
            ("exchange", text, "NO"), ("symbol", text, "NO"), ("timeframe", text, "NO"), ("ts", big, "NO"),
            ("open", dbl, "NO"), ("high", dbl, "NO"), ("low", dbl, "NO"), ("close", dbl, "NO"), ("volume", dbl, "NO"),
        ]
        assert pk("candles") == ["exchange", "symbol", "timeframe", "ts"]
        assert [c[:2] for c in cols("gaps")] == [
            ("exchange", text), ("symbol", text), ("timeframe", text), ("ts_from", big), ("ts_to", big),
            ("reason", text)]
        assert pk("gaps") == ["exchange", "symbol", "timeframe", "ts_from"]
        assert [c[:2] for c in cols("series")] == [
            ("exchange", text), ("symbol", text), ("timeframe", text), ("added_at", big), ("active", "integer")]
        assert pk("series") == ["exchange", "symbol", "timeframe"]
        assert [c[0] for c in cols("leases")] == ["exchange", "symbol", "timeframe", "owner", "token", "expires_at"]
        assert pk("leases") == ["exchange", "symbol", "timeframe"]
        assert [c[0] for c in cols("nodes")][:4] == ["node", "rate_budget", "heartbeat_at", "expires_at"]
    assert not store.hypertable and "not available" in (store.hypertable_note or "")


def test_timescale_path_falls_back_to_a_plain_table(pg_db, monkeypatch):
    """TimescaleDB is not installed here: the detection says so; and where an extension is
    offered but making the hypertable fails (played by plpgsql, which has no create_hypertable),
    the candles table stays a plain one, or the open fails when timescale=True."""
    with pytest.raises(StoreError, match="timescaledb is not available"):
        PostgresStore(pg_db.url, timescale=True).open()
    monkeypatch.setattr(mod, "TIMESCALE", "plpgsql")
    with pytest.raises(StoreError, match="create_hypertable"):
        PostgresStore(pg_db.url, timescale=True).open()
    with PostgresStore(pg_db.url) as store:
        assert not store.hypertable and "create_hypertable" in (store.hypertable_note or "")
        assert store.upsert(rows([0, TF])) == 2
    with PostgresStore(pg_db.url, timescale=False) as store:
        assert store.hypertable_note is None and store.count(*KEY) == 2


def test_open_is_idempotent_keeps_data_and_races_safely(pg_db):
    stores = [PostgresStore(pg_db.url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    threads = [Thread(lambda s=s: (barrier.wait(), s.open())) for s in stores]  # all create the schema at once
    for t in threads:
        t.start()
    for t in threads:
        t.result()
    stores[0].upsert(rows([0, TF]))
    for s in stores:
        assert s.count(*KEY) == 2
        s.close()
    with PostgresStore(pg_db.url) as again:
        assert again.count(*KEY) == 2
        assert again.open() is again


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_upsert_is_idempotent(pg_db, strategy):
    with PostgresStore(pg_db.url, strategy=strategy) as store:
        batch = rows(minutes(0, 100))
        assert store.upsert(batch) == 100
        assert store.upsert(batch) == 0  # nothing changed, nothing rewritten
        assert store.count(*KEY) == 100
        assert store.upsert(rows([5 * TF], close=1.75)) == 1  # a corrected candle is updated
        assert store.count(*KEY) == 100
        assert store.candles(*KEY, 5 * TF, 6 * TF) == [(5 * TF, 1.0, 2.0, 0.5, 1.75, 3.0)]
        assert store.upsert([]) == 0


def test_unchanged_rows_are_not_rewritten(store, pg_db):
    store.upsert(rows(minutes(0, 10)))
    with pg_db.admin() as conn:
        before = conn.execute("SELECT ts, xmin::text FROM candles ORDER BY ts").fetchall()
        for strategy in STRATEGIES:
            assert store.upsert(rows(minutes(0, 10)), strategy=strategy) == 0
        assert conn.execute("SELECT ts, xmin::text FROM candles ORDER BY ts").fetchall() == before


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_upsert_in_several_statements_counts_and_corrects_like_one(pg_db, strategy):
    """Values: statements of 1000 rows; copy: new series appended, overlapping ones upserted."""
    with PostgresStore(pg_db.url, strategy=strategy) as store:
        batch = rows(minutes(0, 1234)) + rows(minutes(0, 300), symbol="ETH/USDT")
        assert store.upsert(batch) == 1534
        assert store.upsert(batch) == 0
        # one series overlapping stored candles, one new, one correction: all in one batch
        mixed = rows(minutes(1200, 1300)) + rows(minutes(0, 50), symbol="SOL/USDT") + rows([3 * TF], symbol="ETH/USDT", close=9.0)
        assert store.upsert(mixed) == 66 + 50 + 1
        fixed = rows([7 * TF, 900 * TF], close=1.25) + rows([7 * TF], close=1.5)  # same key twice: last wins
        # counted once per stored row (SQLite counts both writes of ts 7: 3); ts 7 ends unchanged
        assert store.upsert(fixed) == 1
        assert store.candles(*KEY, 7 * TF, 8 * TF) == [(7 * TF, 1.0, 2.0, 0.5, 1.5, 3.0)]
        assert store.candles(*KEY, 900 * TF, 901 * TF)[0][4] == 1.25
        assert store.upsert(rows(minutes(2000, 2500)) * 2) == 500  # a duplicated batch
        assert store.count(*KEY) == 1300 + 500 and store.count(*ETH) == 300
        ranges = [(*KEY, 1233 * TF, 1240 * TF), (*ETH, 0, 2 * TF), ("x", "y", "1m", 0, TF)]
        ranges += [(*KEY, t, t + 1) for t in minutes(0, 150)]
        assert store.stored_keys(ranges) == {(*KEY, t) for t in [*minutes(0, 150), *minutes(1233, 1240)]} | {
            (*ETH, 0), (*ETH, TF)}
        assert store.stored_keys([]) == set()


def test_upsert_is_one_transaction(store):
    for strategy in STRATEGIES:
        bad = rows(minutes(0, 1500)) + [("binance", "BTC/USDT", "1m", 2000 * TF, None, 2.0, 0.5, 1.5, 3.0)]
        with pytest.raises(psycopg.IntegrityError):
            store.upsert(bad, strategy=strategy)  # type: ignore[arg-type]
        assert store.count(*KEY) == 0
        assert store._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_racing_writer_is_absorbed_by_the_conflict_path(store, pg_db):
    """The COPY path appends series that had no stored candle in the batch's span; if another
    writer commits one meanwhile, the batch is written again through ON CONFLICT."""
    with PostgresStore(pg_db.url) as other:
        other._conn.execute("BEGIN")
        other._conn.execute(
            "INSERT INTO candles VALUES ('binance', 'BTC/USDT', '1m', %s, 1.0, 2.0, 0.5, 1.5, 3.0)", (50 * TF,))
        writer = Thread(lambda: store.upsert(rows(minutes(0, 300)), strategy="copy"))
        writer.start()
        wait_until_blocked(pg_db)  # our plain INSERT waits on the uncommitted key
        other._conn.execute("COMMIT")
        assert writer.result() == 299
    assert store.count(*KEY) == 300


def test_reads(store):
    store.upsert(rows([3 * TF, TF, 2 * TF]) + rows([0], symbol="ETH/USDT"))
    assert store.last_ts(*KEY) == 3 * TF
    assert store.first_ts(*KEY) == TF
    assert store.count(*KEY) == 3
    assert store.count(*KEY, start_ms=2 * TF) == 2
    assert store.count(*KEY, end_ms=2 * TF) == 1
    assert [c[0] for c in store.latest(*KEY)] == [3 * TF]
    assert [c[0] for c in store.latest(*KEY, n=2)] == [3 * TF, 2 * TF]
    assert [c[0] for c in store.candles(*KEY)] == [TF, 2 * TF, 3 * TF]
    assert [c[0] for c in store.candles(*KEY, 2 * TF, 3 * TF)] == [2 * TF]
    assert store.candles(*KEY)[0] == (TF, 1.0, 2.0, 0.5, 1.5, 3.0)
    assert store.stored_ts(*KEY, 0, 3 * TF) == [TF, 2 * TF]
    assert store.last_ts("binance", "NOPE/X", "1m") is None
    assert store.first_ts("binance", "NOPE/X", "1m") is None
    assert store.latest("binance", "NOPE/X", "1m") == []


# -- missing_ranges --------------------------------------------------------------------------


def missing(store, start, end):
    return store.missing_ranges(*KEY, TF, start * TF, end * TF)


def in_tf(ranges):
    return [(a // TF, b // TF) for a, b in ranges]


def test_missing_ranges(store):
    assert in_tf(missing(store, 0, 10)) == [(0, 10)]
    assert missing(store, 10, 10) == []
    store.upsert(rows([t * TF for t in (3, 4, 5, 8, 9, 12, 13)]))
    assert in_tf(missing(store, 0, 16)) == [(0, 3), (6, 8), (10, 12), (14, 16)]
    assert in_tf(missing(store, 3, 14)) == [(6, 8), (10, 12)]
    assert in_tf(missing(store, 4, 6)) == []
    assert in_tf(missing(store, 5, 9)) == [(6, 8)]
    store.upsert(rows([20 * TF], symbol="ETH/USDT") + rows([20 * TF], tf="5m"))  # other series
    assert in_tf(missing(store, 12, 21)) == [(14, 21)]


def test_missing_with_unaligned_bounds(store):
    store.upsert(rows([2 * TF, 3 * TF]))
    assert store.missing_ranges(*KEY, TF, 30_000, 4 * TF) == [(30_000, 2 * TF)]
    assert store.missing_ranges(*KEY, TF, 90_000, 4 * TF) == []
    assert store.missing_ranges(*KEY, TF, 2 * TF, 4 * TF + 1) == [(4 * TF, 4 * TF + 1)]


def test_recorded_gaps_are_excluded(store):
    store.upsert(rows([t * TF for t in (0, 1, 5, 6, 10)]))
    store.record_gap(*KEY, 2 * TF, 5 * TF)
    assert in_tf(missing(store, 0, 11)) == [(7, 10)]
    store.record_gap(*KEY, 8 * TF, 9 * TF)
    assert in_tf(missing(store, 0, 11)) == [(7, 8), (9, 10)]
    store.record_gap(*KEY, 8 * TF, 10 * TF)  # same start: the range grows
    store.record_gap(*KEY, 8 * TF, 9 * TF)  # and never shrinks
    assert in_tf(store.gaps(*KEY)) == [(2, 5), (8, 10)]
    assert in_tf(missing(store, 0, 11)) == [(7, 8)]
    assert store.gaps(*ETH) == []
    with pytest.raises(ValueError):
        store.record_gap(*KEY, 5, 5)


def test_missing_matches_naive_scan_on_large_series(store, monkeypatch):
    """Bisection on counts and scanning agree with a plain walk, across leaf boundaries."""
    import random

    monkeypatch.setattr(mod, "_LEAF", 16)
    rnd = random.Random(7)
    present = [t for t in range(5000) if rnd.random() > 0.01 and not 1000 <= t < 1400]
    store.upsert(rows([t * TF for t in present]))
    want, prev = [], -1
    for t in present + [5000]:
        if t - prev > 1:
            want.append((prev + 1, t))
        prev = t
    assert in_tf(missing(store, 0, 5000)) == want


def test_missing_ranges_agree_with_the_sqlite_store(store, monkeypatch):
    """Random series, bounds (aligned or not), recorded gaps and stretch sizes: the same
    answer as the SQLite store's bisection."""
    import random

    from candlekeeper.actors.stores.sqlite import Store

    rnd = random.Random(11)
    with Store(":memory:") as lite:
        for case in range(40):
            monkeypatch.setattr(mod, "_LEAF", rnd.choice([1, 3, 16, 2048]))
            symbol = f"C{case}/USDT"
            density = rnd.choice([0.0, 0.3, 0.9, 0.99, 1.0])
            batch = rows([t * TF for t in range(300) if rnd.random() < density], symbol=symbol)
            lite.upsert(batch)
            store.upsert(batch)
            for _ in range(rnd.randrange(3)):
                g, length = rnd.randrange(300), rnd.randrange(1, 20)
                for s_ in (lite, store):
                    s_.record_gap("binance", symbol, "1m", g * TF, (g + length) * TF)
            for _ in range(5):
                a = rnd.randrange(-20, 320) * TF + rnd.choice([0, 0, 1, 30_000])
                b = a + rnd.randrange(0, 340) * TF + rnd.choice([0, 0, 1, 59_999])
                args = ("binance", symbol, "1m", TF, a, b)
                assert store.missing_ranges(*args) == lite.missing_ranges(*args), (case, a, b)


# -- the read API both stores share (export, coverage) -------------------------------------------


def test_iter_candles_coverage_and_series_keys_agree_with_the_sqlite_store(store):
    """Same signatures, same answers: paged candles, coverage with gaps, and every series
    with candles or gaps, from the same data in both stores."""
    from candlekeeper.actors.stores.sqlite import Store

    with Store(":memory:") as lite:
        data = rows([t * TF for t in range(0, 50) if t not in (7, 8, 30)])
        data += rows(minutes(5, 9), symbol="ETH/USDT") + rows([0], exchange="kraken", symbol="BTC/USD", tf="1h")
        for s_ in (lite, store):
            s_.upsert(data)
            s_.record_gap(*KEY, 30 * TF, 31 * TF, "no_trades")
            s_.record_gap("okx", "ONLY/GAPS", "5m", 0, 300_000, "before_listing")
        for args in [(KEY, None, None, 7), (KEY, 3 * TF, 20 * TF, 4), (KEY, None, None, 50_000), (ETH, 6 * TF, None, 1),
                     (("x", "y", "1m"), None, None, 5), (KEY, 60 * TF, 70 * TF, 3)]:
            key, lo, hi, batch = args
            pages = list(store.iter_candles(*key, lo, hi, batch))
            assert pages == list(lite.iter_candles(*key, lo, hi, batch)), args
            assert all(len(p) <= batch for p in pages) and all(pages)
        assert [c for p in store.iter_candles(*KEY, batch=10) for c in p] == store.candles(*KEY)
        with pytest.raises(ValueError):
            list(store.iter_candles(*KEY, batch=0))
        for lo, hi in [(None, None), (0, 60 * TF), (-5 * TF, 55 * TF), (10 * TF, 12 * TF)]:
            assert store.coverage(*KEY, TF, lo, hi) == lite.coverage(*KEY, TF, lo, hi), (lo, hi)
        cov = store.coverage(*KEY, TF, 0, 60 * TF)
        assert (cov.first_ts, cov.last_ts, cov.count) == (0, 49 * TF, 47)
        assert cov.missing == ((7 * TF, 9 * TF), (50 * TF, 60 * TF)) and cov.gaps == ((30 * TF, 31 * TF, "no_trades"),)
        assert store.coverage("x", "y", "1m", TF) == lite.coverage("x", "y", "1m", TF)
        assert store.series_keys() == lite.series_keys() == [
            ("binance", "BTC/USDT", "1m"), ("binance", "ETH/USDT", "1m"), ("kraken", "BTC/USD", "1h"),
            ("okx", "ONLY/GAPS", "5m")]


def test_both_stores_meet_the_store_protocol(store, tmp_path):
    from candlekeeper.actors.stores.base import CandleStore, ReadStore, is_url, make_store, redacted
    from candlekeeper.actors.stores.sqlite import Store

    assert isinstance(store, CandleStore) and isinstance(store, ReadStore)
    assert isinstance(Store(":memory:"), CandleStore)
    assert isinstance(make_store(str(tmp_path / "x.db")), Store)
    assert isinstance(make_store(store._url), PostgresStore) and make_store(store._url, readonly=True).readonly
    assert is_url("postgresql://u@h/d") and is_url("postgres://u@h/d") and not is_url("/var/lib/c.db")
    assert redacted("postgresql://u:secret@h/d") == "postgresql://u:***@h/d" and redacted("/x.db") == "/x.db"


def test_verify_probe_write_and_identity(store, pg_db, pg_cluster):
    """What the storage actor checks every 2 s and probes with while failing."""
    store.verify()
    store.probe_write()
    oid = store.identity
    assert isinstance(oid, int)
    store.set_busy_timeout(0.2)
    assert store.lock_timeout_s == 0.2
    set_read_only(pg_db, True)
    try:
        store.reopen()
        with pytest.raises(StoreUnavailable, match="read-only") as info:
            store.probe_write()
        assert info.value.reason == "readonly"
    finally:
        set_read_only(pg_db, False)
    store.reopen()
    store.probe_write()
    pg_cluster.restart("fast")
    with pytest.raises(StoreUnavailable):
        store.verify()
    assert store.reopen() is None and store.identity == oid  # the same table: no resync needed
    admin_sql(pg_db, "DROP TABLE candles")
    with pytest.raises(StoreGone, match="dropped"):
        store.verify()
    store.reopen()
    assert store.identity != oid
    with PostgresStore(pg_db.url) as other:
        admin_sql(pg_db, "DROP TABLE candles")
        other.reopen()  # another daemon recreates it
    with pytest.raises(StoreGone, match="recreated by another daemon"):
        store.verify()


def test_nodes_heartbeat_by_incarnation_and_batch_acquire(store, pg_db):
    assert store.heartbeat("n1", 10.0, 30, incarnation="run1")
    assert store.heartbeat("n1", 20.0, 30, incarnation="run1")
    assert not store.heartbeat("n1", 10.0, 30, incarnation="run2")  # another run, while run1 is live
    (info,) = store.nodes()
    assert (info.node, info.rate_budget, info.incarnation, info.live) == ("n1", 20.0, "run1", True)
    assert 0 <= info.heartbeat_age_s < 5 and 25 < info.expires_in_s <= 30
    admin_sql(pg_db, "UPDATE nodes SET expires_at = clock_timestamp() - interval '1 second'")
    assert store.heartbeat("n1", 10.0, 30, incarnation="run2")  # run1 expired: run2 takes the name
    assert store.nodes()[0].incarnation == "run2"
    keys = [KEY, ETH, ("binance", "SOL/USDT", "1m")]
    got = store.acquire_many(keys, "n1#run2", 30)
    assert got.tokens == {KEY: 1, ETH: 1, ("binance", "SOL/USDT", "1m"): 1} and got.retry_in_s is None
    assert store.acquire_many(keys, "n1#run2", 30).tokens == got.tokens  # extended: same tokens
    other = store.acquire_many([KEY, ("kraken", "BTC/USD", "1h")], "n2#x", 5)
    assert other.tokens == {("kraken", "BTC/USD", "1h"): 1} and 25 < (other.retry_in_s or 0) <= 30
    expire(pg_db, KEY)
    assert store.acquire_many([KEY], "n2#x", 5).tokens == {KEY: 2}  # a change of owner: +1
    assert store.acquire_many([], "n2#x", 5).tokens == {}
    assert store.leave("n1", "n1#run2", "run2") == 2  # ETH and SOL; KEY is n2's now
    assert not store.nodes()[0].live
    assert {lease.symbol: lease.owner for lease in store.leases()}["BTC/USDT"] == "n2#x"


# -- run-time series -------------------------------------------------------------------------


def test_series_add_remove_list(store):
    assert store.add_series("binance", "SOL/USDT", "1m", added_at_ms=2)
    assert store.add_series("kraken", "BTC/USD", "1h", added_at_ms=1)
    assert not store.add_series("binance", "SOL/USDT", "1m")
    assert store.list_series() == [("kraken", "BTC/USD", "1h", 1, True), ("binance", "SOL/USDT", "1m", 2, True)]
    assert store.remove_series("kraken", "BTC/USD", "1h")
    assert not store.remove_series("kraken", "BTC/USD", "1h")
    assert [r[:3] + r[4:] for r in store.list_series()] == [("binance", "SOL/USDT", "1m", True), ("kraken", "BTC/USD", "1h", False)]
    assert store.remove_series("binance", "ETH/USDT", "1m")
    assert store.add_series("kraken", "BTC/USD", "1h")


# -- opening, read-only, credentials -----------------------------------------------------------


def test_readonly_store(pg_db):
    with pytest.raises(StoreError, match="no candlekeeper schema"):
        PostgresStore(pg_db.url, readonly=True).open()  # creates nothing
    with PostgresStore(pg_db.url) as writer, PostgresStore(pg_db.url, readonly=True) as reader:
        writer.upsert(rows([0, TF]))
        assert reader.latest(*KEY)[0][0] == TF
        writer.upsert(rows([2 * TF]))
        assert reader.last_ts(*KEY) == 2 * TF
        for write in (lambda: reader.upsert(rows([3 * TF])), lambda: reader.record_gap(*KEY, 0, TF),
                      lambda: reader.acquire(KEY, "n", 5)):
            with pytest.raises(StoreError, match="read-only") as info:
                write()
            assert not isinstance(info.value, StoreUnavailable)


def test_not_open_and_unopenable(pg_db, pg_cluster):
    s = PostgresStore(pg_db.url)
    assert not s.check()
    with pytest.raises(StoreError, match="not open"):
        s.count(*KEY)
    assert "closed" in repr(s)
    with pytest.raises(StoreError, match="cannot open") as info:
        PostgresStore(pg_cluster.url("no_such_db")).open()
    assert not isinstance(info.value, StoreUnavailable)  # configuration, not a passing fault
    nobody = pg_cluster.url(pg_db.name).replace(f":{pg_cluster.port}/", ":1/")
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        PostgresStore(nobody, connect_timeout_s=2).open()


def all_text(exc: BaseException) -> str:
    """Everything an exception could show: str, repr, and the full chained traceback."""
    return str(exc) + repr(exc) + "".join(traceback.format_exception(exc))


def test_password_from_url_env_or_pgpass_never_shown(pg_db, pg_cluster, tmp_path, monkeypatch):
    from tests.pg import PASSWORD, PASSWORD_USER

    admin_sql(pg_db, f"GRANT ALL ON SCHEMA public TO {PASSWORD_USER}")
    secret_url = pg_db.password_url()
    assert "s3cr" in secret_url  # percent-encoded, special characters and all
    with PostgresStore(secret_url) as s:
        assert s.upsert(rows([0])) == 1
        assert "s3cr" not in repr(s) and "s3cr" not in s.url and ":***@" in s.url
    no_pw = pg_db.password_url(None)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with PostgresStore(no_pw) as s:
        assert s.count(*KEY) == 1
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pwd = PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    pgpass.write_text(f"127.0.0.1:{pg_cluster.port}:{pg_db.name}:{PASSWORD_USER}:{pwd}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    with PostgresStore(no_pw) as s:
        assert s.count(*KEY) == 1
    monkeypatch.delenv("PGPASSFILE")

    wrong = pg_db.password_url("Wr0ng:p@ss%word")
    with pytest.raises(StoreError, match="password authentication failed") as info:
        PostgresStore(wrong).open()
    assert "Wr0ng" not in all_text(info.value) and "Wr0ng" not in repr(PostgresStore(wrong))
    for bad in (wrong + "?bogus_option=1", f"host=127.0.0.1 password='{PASSWORD}' junk"):
        with pytest.raises(StoreError) as info:
            PostgresStore(bad).open()
        text = all_text(info.value)
        assert "Wr0ng" not in text and PASSWORD not in text and "s3cr" not in text, text


# -- faults lose nothing -----------------------------------------------------------------------


def write_again_exactly_once(store: PostgresStore, batch: list, stored_before: int = 0) -> None:
    assert store.upsert(batch) == len(batch) - stored_before
    assert store.upsert(batch) == 0
    assert store.count(*KEY) == len(batch)
    assert [c[0] for c in store.candles(*KEY)] == [r[3] for r in batch]


def test_server_restart(store, pg_cluster):
    first, batch = rows(minutes(0, 10)), rows(minutes(0, 20))
    store.upsert(first)
    pg_cluster.restart("fast")
    assert not store.check()
    with pytest.raises(StoreUnavailable):
        store.upsert(batch)
    with pytest.raises(StoreUnavailable, match="reopen"):  # and keeps saying so until reopen()
        store.last_ts(*KEY)
    assert store.reopen() is None  # nothing was recreated: the data is all there
    write_again_exactly_once(store, batch, stored_before=10)


def test_server_down_then_back_after_a_crash(store, pg_cluster):
    first, batch = rows(minutes(0, 10)), rows(minutes(0, 20))
    store.upsert(first)
    pg_cluster.stop("immediate")  # a crash: committed writes survive through the WAL
    try:
        with pytest.raises(StoreUnavailable):
            store.upsert(batch)
        with pytest.raises(StoreUnavailable, match="cannot connect"):
            store.reopen()
        with pytest.raises(StoreUnavailable):
            store.upsert(batch)
    finally:
        pg_cluster.start()
    assert store.reopen() is None
    write_again_exactly_once(store, batch, stored_before=10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_connection_dropped_between_and_inside_transactions(pg_db, strategy):
    with PostgresStore(pg_db.url, strategy=strategy) as store:
        batch = rows(minutes(0, 2500))
        with pg_db.admin() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
        with pytest.raises(StoreUnavailable):
            store.upsert(batch)
        store.reopen()
        # now the connection dies half-way through the batch (in the third 1000-row statement)
        admin_sql(
            pg_db,
            "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.ts >= {2100 * TF} THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;"
            " RETURN NEW; END $$",
            "CREATE TRIGGER die BEFORE INSERT ON candles FOR EACH ROW EXECUTE FUNCTION die()",
        )
        with pytest.raises(StoreUnavailable):
            store.upsert(batch)
        assert not store.check()
        admin_sql(pg_db, "DROP TRIGGER die ON candles")
        store.reopen()
        assert store.count(*KEY) == 0  # nothing of the interrupted batch
        write_again_exactly_once(store, batch)


def set_read_only(db: PgDatabase, on: bool) -> None:
    with db.cluster.admin() as conn:  # from another database: this one refuses DDL when read-only
        conn.execute(f"ALTER DATABASE {db.name} " + ("SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"))


def test_read_only_server(pg_db):
    with PostgresStore(pg_db.url) as store:
        store.upsert(rows(minutes(0, 5)))
        set_read_only(pg_db, True)
        store.reopen()  # e.g. failed over to a standby: opening works, reading works
        assert store.count(*KEY) == 5
        batch = rows(minutes(0, 10))
        for write in (lambda: store.upsert(batch), lambda: store.acquire(KEY, "n", 5), lambda: store.record_gap(*KEY, 0, TF)):
            with pytest.raises(StoreUnavailable, match="read-only"):
                write()
        set_read_only(pg_db, False)
        store.reopen()
        write_again_exactly_once(store, batch, stored_before=5)


def test_read_only_server_without_schema_is_unavailable(pg_db):
    set_read_only(pg_db, True)
    with pytest.raises(StoreUnavailable, match="read-only"):
        PostgresStore(pg_db.url).open()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_disk_full(pg_db, strategy):
    """The server runs out of space half-way through a batch (a trigger raises SQLSTATE 53100
    where a full tablespace would): nothing is stored, and after space is freed the same
    batch is stored exactly once."""
    with PostgresStore(pg_db.url, strategy=strategy) as store:
        batch = rows(minutes(0, 2500))
        admin_sql(
            pg_db,
            "CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.ts >= {1800 * TF} THEN RAISE EXCEPTION 'could not extend file: No space left on device'"
            " USING ERRCODE = 'disk_full'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER full_disk BEFORE INSERT ON candles FOR EACH ROW EXECUTE FUNCTION full_disk()",
        )
        with pytest.raises(StoreUnavailable, match="No space left") as info:
            store.upsert(batch)
        assert info.value.sqlstate == "53100"  # type: ignore[attr-defined]
        assert store.check() and store.count(*KEY) == 0  # the connection is fine; nothing stored
        admin_sql(pg_db, "DROP TRIGGER full_disk ON candles")
        write_again_exactly_once(store, batch)


def test_lock_timeout(pg_db):
    with PostgresStore(pg_db.url, lock_timeout_s=0.1) as store, pg_db.admin() as conn:
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE candles IN ACCESS EXCLUSIVE MODE")  # e.g. a long migration
        batch = rows(minutes(0, 10))
        with pytest.raises(StoreUnavailable, match="lock timeout"):
            store.upsert(batch)
        conn.execute("ROLLBACK")
        write_again_exactly_once(store, batch)


def test_dropped_table_is_recreated_on_reopen(store, pg_db):
    store.upsert(rows(minutes(0, 10)))
    store.acquire(KEY, "n1", 30)
    admin_sql(pg_db, "DROP TABLE candles")
    assert not store.check()
    with pytest.raises(StoreGone):
        store.upsert(rows([10 * TF]))
    with pytest.raises(StoreGone):
        store.last_ts(*KEY)
    assert store.reopen() == "recreated tables: candles"
    assert store.check()
    write_again_exactly_once(store, rows(minutes(0, 10)))
    assert store.leases()[0].token == 1  # the other tables were left alone
    admin_sql(pg_db, "DROP TABLE leases")
    with pytest.raises(StoreGone):
        store.acquire(KEY, "n1", 30)
    assert store.reopen() is None  # candles kept
    assert store.acquire(KEY, "n1", 30) == 1


def test_table_recreated_by_another_daemon_is_noticed(store, pg_db):
    store.upsert(rows([0]))
    admin_sql(pg_db, "DROP TABLE candles")
    with PostgresStore(pg_db.url) as other:  # its open() recreates the table
        assert other.count(*KEY) == 0
    assert not store.check()  # our resume points are stale: the actor re-reads them
    store.reopen()
    assert store.check()


# -- leases and fencing ------------------------------------------------------------------------


def expire(db: PgDatabase, key=KEY) -> None:
    """Move a lease's expiry into the past (as the database's clock would)."""
    admin_sql(db, "UPDATE leases SET expires_at = clock_timestamp() - interval '1 second'"
                  f" WHERE (exchange, symbol, timeframe) = ('{key[0]}', '{key[1]}', '{key[2]}')")


def test_acquire_renew_release_and_monotonic_tokens(store, pg_db):
    assert store.acquire(KEY, "a", 30) == 1
    assert store.acquire(KEY, "b", 30) is None  # held
    assert store.acquire(KEY, "a", 30) == 1  # the holder extends it: same owner, same token
    assert store.renew([KEY, ETH], "a", 30) == {KEY}
    assert store.renew([KEY], "b", 30) == set()
    tokens = [1]
    for node in ["b", "a", "b", "c"]:  # every change of owner: +1
        expire(pg_db)
        tokens.append(store.acquire(KEY, node, 30))
    assert tokens == [1, 2, 3, 4, 5]
    assert store.release([KEY, ETH], "b") == set()  # not b's
    assert store.release([KEY], "c") == {KEY}
    assert store.leases()[0].owner is None and not store.leases()[0].live
    assert store.acquire(KEY, "c", 30) == 6  # released and taken again, even by c: a new token
    expire(pg_db)
    assert store.renew([KEY], "c", 30) == {KEY}  # expired, nobody took it: c keeps token 6
    assert store.acquire(KEY, "a", 30) is None
    (lease,) = store.leases()
    assert (lease.owner, lease.token, lease.live) == ("c", 6, True) and 25 < lease.remaining_s <= 30
    with pytest.raises(ValueError):
        store.acquire(KEY, "a", -1)


def test_expiry_follows_the_database_clock(store, pg_db, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 0.0)  # a node clock far in the past changes nothing
    assert store.acquire(KEY, "a", 0.2) == 1
    assert store.acquire(KEY, "b", 0.2) is None
    with pg_db.admin() as conn:
        conn.execute("SELECT pg_sleep(0.25)")  # the database's clock moves on
    assert store.acquire(KEY, "b", 30) == 2
    store.heartbeat("a", 10.0, 0.2)
    store.heartbeat("b", 20.0, 30)
    assert store.live_nodes() == {"a": 10.0, "b": 20.0}
    later = store.db_now().replace(year=2999)
    assert store.live_nodes(now=later) == {}
    with pg_db.admin() as conn:
        conn.execute("SELECT pg_sleep(0.25)")
    assert store.live_nodes() == {"b": 20.0}
    store.heartbeat("a", 15.0, 30)  # back, with a new budget
    assert store.live_nodes() == {"a": 15.0, "b": 20.0}
    store.acquire(ETH, "a", 30)
    assert store.leave("a") == 1
    assert store.live_nodes() == {"b": 20.0}
    assert {(lease.symbol, lease.owner) for lease in store.leases()} == {("BTC/USDT", "b"), ("ETH/USDT", None)}


def test_two_nodes_race_for_leases(pg_db):
    keys = [("binance", f"S{i}/USDT", "1m") for i in range(40)]
    with PostgresStore(pg_db.url) as a, PostgresStore(pg_db.url) as b:
        barrier = threading.Barrier(2)

        def grab(store, node):
            barrier.wait()
            return {k: store.acquire(k, node, 30) for k in keys}

        ta, tb = Thread(lambda: grab(a, "a")), Thread(lambda: grab(b, "b"))
        ta.start(), tb.start()
        got_a, got_b = ta.result(), tb.result()
        for k in keys:  # exactly one winner per series, with the first token
            assert sorted([got_a[k], got_b[k]], key=str) == [1, None], (k, got_a[k], got_b[k])
        owners = {(le.exchange, le.symbol, le.timeframe): le.owner for le in a.leases()}
        assert owners == {k: ("a" if got_a[k] else "b") for k in keys}


def test_stale_owner_write_is_refused(store, pg_db):
    with PostgresStore(pg_db.url) as b:
        t_a = store.acquire(KEY, "a", 30)
        t_eth = store.acquire(ETH, "a", 30)
        assert store.upsert(rows([0]), fence={KEY: t_a}) == FencedWrite(1, frozenset())
        expire(pg_db)  # a stalls; its lease runs out and b takes the series
        t_b = b.acquire(KEY, "b", 30)
        assert t_b == t_a + 1
        late = rows([TF, 2 * TF]) + rows([TF], symbol="ETH/USDT")
        result = store.upsert(late, fence={KEY: t_a, ETH: t_eth})
        assert result == FencedWrite(1, frozenset({KEY}))  # ETH still a's: stored
        assert store.refused_writes == 1 and store.refused_rows == 2
        assert store.count(*KEY) == 1 and store.count(*ETH) == 1
        assert b.upsert(rows([TF, 2 * TF]), fence={KEY: t_b}).changed == 2
        with pytest.raises(ValueError, match="without a token"):
            store.upsert(rows([0]), fence={ETH: t_eth})
        store.release([ETH], "a")
        assert store.upsert(rows([5 * TF], symbol="ETH/USDT"), fence={ETH: t_eth}).refused == {ETH}
        assert store.upsert(rows([0], symbol="NEW/USDT"), fence={("binance", "NEW/USDT", "1m"): 1}).refused


def test_owner_change_committing_during_a_fenced_write_is_seen(store, pg_db):
    """b takes the lease in a transaction still open when a's fenced write checks: the write
    waits on the lease row, then sees b's token and stores nothing."""
    t_a = store.acquire(KEY, "a", 30)
    expire(pg_db)
    with PostgresStore(pg_db.url) as b:
        b._conn.execute("BEGIN")
        t_b = b.acquire(KEY, "b", 30)
        writer = Thread(lambda: store.upsert(rows(minutes(0, 300)), fence={KEY: t_a}))
        writer.start()
        wait_until_blocked(pg_db)
        b._conn.execute("COMMIT")
        assert writer.result() == FencedWrite(0, frozenset({KEY}))
        assert t_b == t_a + 1 and store.count(*KEY) == 0


def test_owner_change_waits_for_a_fenced_write_in_flight(store, pg_db):
    """a's fenced write holds its lease row until it commits: b cannot take the series
    between a's check and a's write, so a's rows (written while it still held the token)
    stay, and b's token comes after them. (a's write is held inside its one message by a lock
    on the candles table that a third session takes.)"""
    t_a = store.acquire(KEY, "a", 30)
    expire(pg_db)  # expired but not taken: a's token is still the current one
    with pg_db.admin() as blocker, PostgresStore(pg_db.url) as b:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE candles IN EXCLUSIVE MODE")
        writer = Thread(lambda: store.upsert(rows(minutes(0, 300)), fence={KEY: t_a}))
        writer.start()
        wait_until_blocked(pg_db)  # a checked its token (lease row share-locked), waits to write
        taker = Thread(lambda: b.acquire(KEY, "b", 30))
        taker.start()
        wait_until_blocked_n(pg_db, 2)  # b waits on a's lease row
        blocker.execute("COMMIT")
        assert writer.result() == FencedWrite(300, frozenset())
        assert taker.result() == t_a + 1
    assert store.count(*KEY) == 300
    assert store.upsert(rows([400 * TF]), fence={KEY: t_a}).refused == {KEY}


def wait_until_blocked_n(db: PgDatabase, n: int, timeout: float = 10.0) -> None:
    """Until ``n`` candlekeeper sessions wait on a lock."""
    deadline = time.monotonic() + timeout
    with db.admin() as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'candlekeeper'"
                               " AND wait_event_type = 'Lock'").fetchone()
            if row is not None and row[0] >= n:
                return
            time.sleep(0.01)
    raise AssertionError(f"fewer than {n} sessions blocked")


def test_missing_server_binaries_fail_loudly(monkeypatch):
    from tests import pg

    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setattr(pg.shutil, "which", lambda name: None)
    monkeypatch.setattr(pg.glob, "glob", lambda pattern: [])
    with pytest.raises(pg.PgUnavailable, match=r"apt-get install -y postgresql"):
        pg.find_bindir()


_STALLING_WRITER = """
import sys
from candlekeeper.actors.stores.postgres import PostgresStore

key = ("binance", "BTC/USDT", "1m")
with PostgresStore(sys.argv[1], idle_in_transaction_s=1.0) as store:
    token = store.acquire(key, "a", 300)
    print("writing", flush=True)
    i = 0
    while True:  # large fenced batches of new candles, one after the other
        store.upsert([(*key, (i * 50_000 + j) * 60_000, 1.0, 2.0, 0.5, 1.5, 3.0) for j in range(50_000)],
                     fence={key: token})
        i += 1
"""


def _writer_state(db: PgDatabase) -> str | None:
    with db.admin() as conn:
        row = conn.execute("SELECT state FROM pg_stat_activity WHERE application_name = 'candlekeeper'"
                           " AND query NOT LIKE '%%pg_stat_activity%%'").fetchone()
    return None if row is None else str(row[0])


def test_a_writer_stopped_mid_write_never_blocks_a_takeover(pg_db):
    """A daemon SIGSTOPped in the middle of a fenced write holds its share lock on the lease rows
    only until the server ends its idle transaction (`idle_in_transaction_s`). A writer frozen
    in the middle of sending a COPY looked active to the server, which never ended it: every
    takeover of its series blocked for as long as it stayed stopped (a cluster test lost 2 runs
    in 5 to it). The writer is stopped while the server is running one of its statements, again
    until one such stop leaves the session stuck `active` (or 20 tries); the deadline is a
    "never" check."""
    child = subprocess.Popen([sys.executable, "-c", _STALLING_WRITER, pg_db.url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        for _ in range(20):
            deadline = time.monotonic() + 10
            while _writer_state(pg_db) != "active":  # the server is in one of its statements
                assert time.monotonic() < deadline, "the writer never ran a statement"
            child.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # sleep-ok: whatever the server does with a stopped client, it does now
            if _writer_state(pg_db) == "active":
                break  # stuck in a statement that waits for the client: the case that blocked
            child.send_signal(signal.SIGCONT)
        with PostgresStore(pg_db.url) as b:
            taker = Thread(lambda: (expire(pg_db), b.acquire(KEY, "b", 30))[1])
            taker.start()
            taker.join(30.0)
            assert not taker.is_alive(), "the stopped writer still blocks the takeover"
            assert taker.result() is not None
    finally:
        child.kill()
        child.wait()
