"""SQLite store: exact schema, idempotent upserts, gap finding, surviving a lost file."""

from __future__ import annotations

import os

import pytest

from candlekeeper.actors.stores.sqlite import Store, StoreCorrupt, StoreError, StoreGone, StoreUnavailable

TF = 60_000
KEY = ("binance", "BTC/USDT", "1m")


def rows(times, exchange="binance", symbol="BTC/USDT", tf="1m", close=1.5):
    return [(exchange, symbol, tf, t, 1.0, 2.0, 0.5, close, 3.0) for t in times]


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "ck.db")) as s:
        yield s


def test_schema_is_exact(store):
    info = store._conn.execute("PRAGMA table_info(candles)").fetchall()
    assert [(name, type_, notnull, pk) for _, name, type_, notnull, _, pk in info] == [
        ("exchange", "TEXT", 1, 1),
        ("symbol", "TEXT", 1, 2),
        ("timeframe", "TEXT", 1, 3),
        ("ts", "INTEGER", 1, 4),
        ("open", "REAL", 1, 0),
        ("high", "REAL", 1, 0),
        ("low", "REAL", 1, 0),
        ("close", "REAL", 1, 0),
        ("volume", "REAL", 1, 0),
    ]
    gaps = store._conn.execute("PRAGMA table_info(gaps)").fetchall()
    assert [(c[1], c[5]) for c in gaps] == [
        ("exchange", 1), ("symbol", 2), ("timeframe", 3), ("ts_from", 4), ("ts_to", 0), ("reason", 0)
    ]
    series = store._conn.execute("PRAGMA table_info(series)").fetchall()
    assert [(c[1], c[5]) for c in series] == [
        ("exchange", 1), ("symbol", 2), ("timeframe", 3), ("added_at", 0), ("active", 0)
    ]


def test_an_older_database_gets_the_gap_reason_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE gaps (exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,"
                     " ts_from INTEGER NOT NULL, ts_to INTEGER NOT NULL,"
                     " PRIMARY KEY (exchange, symbol, timeframe, ts_from))")
        conn.execute("INSERT INTO gaps VALUES ('binance', 'BTC/USDT', '1m', 0, 60000)")
    with Store(path) as store:
        assert store.gap_reasons("binance", "BTC/USDT", "1m") == [(0, 60000, "exchange_hole")]
        store.record_gap("binance", "BTC/USDT", "1m", 120000, 180000, "before_listing")
        assert store.gap_reasons("binance", "BTC/USDT", "1m")[1] == (120000, 180000, "before_listing")


def test_wal_and_synchronous_normal(store):
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_open_is_idempotent_and_keeps_data(tmp_path):
    path = str(tmp_path / "sub" / "dir" / "ck.db")  # parent directories are created
    with Store(path) as s:
        s.upsert(rows([0, TF]))
    with Store(path) as s:
        assert s.count(*KEY) == 2


def test_upsert_is_idempotent(store):
    batch = rows(range(0, 100 * TF, TF))
    assert store.upsert(batch) == 100
    assert store.upsert(batch) == 0  # nothing changed, nothing rewritten
    assert store.count(*KEY) == 100
    assert store.upsert(rows([5 * TF], close=1.75)) == 1  # a corrected candle is updated
    assert store.count(*KEY) == 100
    assert store.candles(*KEY, 5 * TF, 6 * TF) == [(5 * TF, 1.0, 2.0, 0.5, 1.75, 3.0)]
    assert store.upsert([]) == 0


def test_upsert_in_several_statements_counts_and_corrects_like_one(store):
    """Batches are written in multi-row statements of a few hundred rows (one GIL release per
    statement, not per row): counts, corrections and duplicates inside a batch as before."""
    batch = rows(range(0, 1234 * TF, TF)) + rows(range(0, 300 * TF, TF), symbol="ETH/USDT")
    assert store.upsert(batch) == 1534
    assert store.upsert(batch) == 0
    fixed = rows([7 * TF, 900 * TF], close=1.25) + rows([7 * TF], close=1.5)  # same key twice: last wins
    assert store.upsert(fixed) == 3
    assert store.candles(*KEY, 7 * TF, 8 * TF) == [(7 * TF, 1.0, 2.0, 0.5, 1.5, 3.0)]
    assert store.count(*KEY) == 1234 and store.count("binance", "ETH/USDT", "1m") == 300
    ranges = [(*KEY, 1233 * TF, 1240 * TF), ("binance", "ETH/USDT", "1m", 0, 2 * TF), ("x", "y", "1m", 0, TF)]
    ranges += [(*KEY, t, t + 1) for t in range(0, 150 * TF, TF)]  # more than one statement's worth
    assert store.stored_keys(ranges) == {(*KEY, t) for t in [*range(0, 150 * TF, TF), 1233 * TF]} | {
        ("binance", "ETH/USDT", "1m", 0), ("binance", "ETH/USDT", "1m", TF)}


def test_upsert_is_one_transaction(store):
    bad = rows([0, TF]) + [("binance", "BTC/USDT", "1m", 2 * TF, None, 2.0, 0.5, 1.5, 3.0)]
    with pytest.raises(StoreError, match="NOT NULL") as info:  # no raw sqlite3 error leaves the store
        store.upsert(bad)
    assert not isinstance(info.value, StoreUnavailable | StoreGone)  # not a fault to wait out
    assert store.count(*KEY) == 0
    assert not store._conn.in_transaction


def test_candles_and_their_gaps_are_one_transaction(store):
    """A reader never sees the candles after a confirmed gap without the gap's record (measured:
    a test read the candles of a page between the two commits, under load)."""
    gap = ("binance", "BTC/USDT", "1m", TF, 3 * TF, "no_trades")
    assert store.upsert(rows([0, 3 * TF]), gaps=[gap]) == 2
    assert store.gap_reasons(*KEY) == [(TF, 3 * TF, "no_trades")]
    bad = rows([4 * TF]) + [("binance", "BTC/USDT", "1m", 6 * TF, None, 2.0, 0.5, 1.5, 3.0)]
    with pytest.raises(StoreError):
        store.upsert(bad, gaps=[("binance", "BTC/USDT", "1m", 5 * TF, 6 * TF, "no_trades")])
    assert store.count(*KEY) == 2 and store.gap_reasons(*KEY) == [(TF, 3 * TF, "no_trades")]
    with pytest.raises(ValueError, match="empty gap"):
        store.upsert(rows([4 * TF]), gaps=[("binance", "BTC/USDT", "1m", 5 * TF, 5 * TF, "no_trades")])
    assert store.count(*KEY) == 2


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
    assert store.last_ts("binance", "NOPE/X", "1m") is None
    assert store.first_ts("binance", "NOPE/X", "1m") is None
    assert store.latest("binance", "NOPE/X", "1m") == []


# -- missing_ranges ------------------------------------------------------------------


def missing(store, start, end):
    return store.missing_ranges(*KEY, TF, start * TF, end * TF)


def in_tf(ranges):
    return [(a // TF, b // TF) for a, b in ranges]


def test_missing_everything_when_empty(store):
    assert in_tf(missing(store, 0, 10)) == [(0, 10)]
    assert missing(store, 10, 10) == []


def test_missing_at_start_middle_and_end(store):
    store.upsert(rows([t * TF for t in (3, 4, 5, 8, 9, 12, 13)]))
    assert in_tf(missing(store, 0, 16)) == [(0, 3), (6, 8), (10, 12), (14, 16)]
    assert in_tf(missing(store, 3, 14)) == [(6, 8), (10, 12)]
    assert in_tf(missing(store, 4, 6)) == []
    assert in_tf(missing(store, 5, 9)) == [(6, 8)]


def test_missing_ignores_other_series(store):
    store.upsert(rows([0, TF, 2 * TF]))
    store.upsert(rows([5 * TF], symbol="ETH/USDT") + rows([5 * TF], tf="5m"))
    assert in_tf(missing(store, 0, 6)) == [(3, 6)]


def test_missing_with_unaligned_bounds(store):
    store.upsert(rows([2 * TF, 3 * TF]))
    # [30 s, 2 m) holds one open time (1 m): reported from the caller's bound
    assert store.missing_ranges(*KEY, TF, 30_000, 4 * TF) == [(30_000, 2 * TF)]
    # [90 s, 2 m) holds none
    assert store.missing_ranges(*KEY, TF, 90_000, 4 * TF) == []
    assert store.missing_ranges(*KEY, TF, 2 * TF, 4 * TF + 1) == [(4 * TF, 4 * TF + 1)]


def test_recorded_gaps_are_excluded(store):
    store.upsert(rows([t * TF for t in (0, 1, 5, 6, 10)]))
    store.record_gap(*KEY, 2 * TF, 5 * TF)  # the exchange genuinely has nothing there
    assert in_tf(missing(store, 0, 11)) == [(7, 10)]
    store.record_gap(*KEY, 8 * TF, 9 * TF)  # part of a hole: the rest is still missing
    assert in_tf(missing(store, 0, 11)) == [(7, 8), (9, 10)]
    store.record_gap(*KEY, 8 * TF, 10 * TF)  # same start: the range grows
    assert in_tf(store.gaps(*KEY)) == [(2, 5), (8, 10)]
    assert in_tf(missing(store, 0, 11)) == [(7, 8)]
    assert store.gaps("binance", "ETH/USDT", "1m") == []
    with pytest.raises(ValueError):
        store.record_gap(*KEY, 5, 5)


def test_missing_matches_naive_scan_on_large_series(store, monkeypatch):
    """Bisection and scanning agree with a plain walk, across leaf boundaries."""
    import random

    import candlekeeper.actors.stores.sqlite as mod

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


# -- run-time series -------------------------------------------------------------------


def test_series_add_remove_list(store):
    assert store.add_series("binance", "SOL/USDT", "1m", added_at_ms=2)
    assert store.add_series("kraken", "BTC/USD", "1h", added_at_ms=1)
    assert not store.add_series("binance", "SOL/USDT", "1m")
    assert store.list_series() == [("kraken", "BTC/USD", "1h", 1, True), ("binance", "SOL/USDT", "1m", 2, True)]
    assert store.remove_series("kraken", "BTC/USD", "1h")
    assert not store.remove_series("kraken", "BTC/USD", "1h")
    assert [r[:3] + r[4:] for r in store.list_series()] == [("binance", "SOL/USDT", "1m", True), ("kraken", "BTC/USD", "1h", False)]
    assert store.remove_series("binance", "ETH/USDT", "1m")  # a configured series: removal is remembered
    assert store.add_series("kraken", "BTC/USD", "1h")  # and a removed one can come back


# -- losing the file -----------------------------------------------------------------


def test_deleted_file_is_detected_and_reopened_fresh(tmp_path):
    path = str(tmp_path / "ck.db")
    store = Store(path).open()
    store.upsert(rows([0, TF]))
    assert store.check()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    assert not store.check()
    with pytest.raises(StoreGone):
        store.upsert(rows([2 * TF]))
    with pytest.raises(StoreGone):
        store.last_ts(*KEY)
    assert store.reopen() is None
    assert store.check() and os.path.exists(path)
    assert store.count(*KEY) == 0
    assert store.upsert(rows([2 * TF])) == 1
    store.close()
    with Store(path) as again:
        assert again.count(*KEY) == 1


def test_deleted_main_file_with_stale_wal_left_behind(tmp_path):
    path = str(tmp_path / "ck.db")
    store = Store(path).open()
    store.upsert(rows(range(0, 50 * TF, TF)))
    os.remove(path)  # only the main file: -wal and -shm stay
    with pytest.raises(StoreGone):
        store.upsert(rows([60 * TF]))
    store.reopen()
    assert store.count(*KEY) == 0
    store.upsert(rows([60 * TF]))
    store.close()
    with Store(path) as again:
        assert again.count(*KEY) == 1
        assert again._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_file_deleted_during_write_raises_gone(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.db")
    store = Store(path).open()
    store.upsert(rows([0]))
    real_check, calls = store.check, []

    def racy_check():  # the file disappears right after the check before the write
        calls.append(1)
        if len(calls) == 1:
            os.remove(path)
            return True
        return real_check()

    monkeypatch.setattr(store, "check", racy_check)
    with pytest.raises(StoreGone, match="write again"):
        store.upsert(rows([TF]))
    monkeypatch.undo()
    store.reopen()
    assert store.upsert(rows([TF])) == 1
    store.close()


def test_replaced_file_is_detected(tmp_path):
    path = str(tmp_path / "ck.db")
    other = str(tmp_path / "other.db")
    with Store(other) as s:
        s.upsert(rows([7 * TF]))
    store = Store(path).open()
    store.upsert(rows([0]))
    os.replace(other, path)
    assert not store.check()
    with pytest.raises(StoreGone):
        store.count(*KEY)
    assert store.reopen() is None
    assert store.last_ts(*KEY) == 7 * TF  # the replacement is used as it is
    store.close()


def test_garbage_file_is_moved_aside(tmp_path):
    path = tmp_path / "ck.db"
    path.write_bytes(b"this is not a database at all" * 200)
    store = Store(str(path))
    with pytest.raises(StoreCorrupt):
        store.open()
    moved = store.reopen()
    assert moved is not None and moved.startswith(str(path) + ".corrupt-")
    assert open(moved, "rb").read().startswith(b"this is not a database")
    assert store.upsert(rows([0])) == 1
    store.close()


def test_corrupted_while_open_is_moved_aside(tmp_path):
    path = str(tmp_path / "ck.db")
    store = Store(path).open()
    store.upsert(rows(range(0, 2000 * TF, TF)))
    store.close()
    store.open()
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # same inode: only an error can reveal it
        fh.write(b"\0garbage" * (size // 8))
    with pytest.raises(StoreCorrupt):
        store.count(*KEY)
    assert issubclass(StoreCorrupt, StoreGone)  # one except clause covers both
    moved = store.reopen()
    assert moved is not None and os.path.exists(moved)
    assert store.count(*KEY) == 0
    store.upsert(rows([0]))
    assert store.count(*KEY) == 1
    store.close()


def test_readonly_connection(tmp_path):
    path = str(tmp_path / "ck.db")
    with Store(path) as writer:
        writer.upsert(rows([0, TF]))
        with Store(path, readonly=True) as reader:
            assert reader.latest(*KEY)[0][0] == TF
            writer.upsert(rows([2 * TF]))  # readers see commits while open
            assert reader.last_ts(*KEY) == 2 * TF
            with pytest.raises(StoreError):
                reader.upsert(rows([3 * TF]))
            with pytest.raises(StoreError):
                reader.record_gap(*KEY, 0, TF)
    with pytest.raises(StoreError):
        Store(str(tmp_path / "missing.db"), readonly=True).open()
    assert not os.path.exists(tmp_path / "missing.db")


def test_memory_store():
    with Store(":memory:") as s:
        s.upsert(rows([0, 2 * TF]))
        assert s.check()
        assert in_tf(s.missing_ranges(*KEY, TF, 0, 3 * TF)) == [(1, 2)]


def test_not_open_raises(tmp_path):
    s = Store(str(tmp_path / "x.db"))
    assert not s.check()
    with pytest.raises(StoreError, match="not open"):
        s.count(*KEY)
    assert "closed" in repr(s)


def test_unopenable_path_raises_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open"):
        Store(str(tmp_path)).open()  # a directory
