"""Store write throughput, each store against its raw driver baseline in the same run.

    python bench/store.py [--rows 200000] [--batch 10000] [--series 100] [--repeat 3] [--url URL]

PostgreSQL: ``PostgresStore.upsert`` with each bulk strategy (COPY into a staging table, then
INSERT ... SELECT; multi-row INSERT ... ON CONFLICT) against raw psycopg binary COPY straight
into the same table (no conflict handling at all: the ceiling). Both write the same batches
into an empty table; best of ``--repeat``. Also: re-writing stored rows (the idempotent case),
calls/s by batch size (what the "auto" strategy's switch-over is chosen from),
``missing_ranges`` on a 1,000,000-candle series with holes, and the whole write path of the
daemon: the storage actor on PostgreSQL, told one ``Write`` per page of ``--page`` candles as
series do, until every ack, with and without fencing tokens (clustering: each write checked
against its lease in the same transaction).
SQLite: ``Store.upsert`` against raw ``executemany`` INSERT into the same schema.

Without ``--url`` a throwaway server is started (tests/pg.py: initdb in a temp dir, fsync
off). Last line on stdout: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from candlekeeper.actors.fencing import Fences
from candlekeeper.actors.messages import Write, Written
from candlekeeper.actors.storage import StorageActor
from candlekeeper.actors.stores.postgres import COPY_FROM_ROWS, PostgresStore
from candlekeeper.actors.stores.postgres_sql import COLS as _COLS
from candlekeeper.actors.stores.postgres_sql import TYPES as _TYPES
from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.supervisors.child import Child, Runtime
from candlekeeper.supervisors.supervisor import ChildSpec, start_root

TF = 60_000
TARGET_RATIO = 0.70  # store >= 70 % of raw COPY
SIZES = (1, 10, 50, 100, 200, 1000)  # candles per call, for the "auto" switch-over


def make_rows(n: int, series: int, offset: int = 0) -> list[tuple[Any, ...]]:
    per = max(1, n // series)
    return [
        ("binance", f"S{i // per}/USDT", "1m", (offset + i % per) * TF, 100.0 + i % 7, 101.0, 99.0, 100.5, 12.25)
        for i in range(n)
    ]


def batches(rows: list[Any], size: int) -> list[list[Any]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def best(repeat: int, prepare: Callable[[], None], run: Callable[[], Any]) -> float:
    """Best wall time of ``run`` over ``repeat`` tries, ``prepare`` untimed before each."""
    times = []
    for _ in range(repeat):
        prepare()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


# -- PostgreSQL --------------------------------------------------------------------------------


def pg_figures(url: str, rows: list[Any], batch: int, repeat: int) -> dict[str, float]:
    store = PostgresStore(url).open()
    raw = psycopg.connect(url, autocommit=True)
    raw.execute("SET jit = off")
    parts = batches(rows, batch)
    n = len(rows)

    def truncate() -> None:
        raw.execute("TRUNCATE candles")

    def raw_copy() -> None:
        for part in parts:
            with raw.transaction(), raw.cursor().copy(f"COPY candles ({_COLS}) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(_TYPES)
                for r in part:
                    cp.write_row(r)

    def store_upsert(strategy: str) -> Callable[[], None]:
        def run() -> None:
            for part in parts:
                store.upsert(part, strategy=strategy)  # type: ignore[call-overload]
        return run

    out: dict[str, float] = {}
    # interleaved, so drift on a noisy machine hits every figure alike
    for _ in range(repeat):
        for name, fn in [("raw_copy", raw_copy), ("copy", store_upsert("copy")), ("values", store_upsert("values"))]:
            t = best(1, truncate, fn)
            out[f"pg_{name}_per_s"] = max(out.get(f"pg_{name}_per_s", 0.0), n / t)
    for strategy in ("copy", "values"):  # everything already stored and unchanged
        truncate()
        store_upsert("copy")()
        t = best(repeat, lambda: None, store_upsert(strategy))
        out[f"pg_{strategy}_rewrite_per_s"] = n / t

    # small batches: calls/s, each call its own transaction (the follow-the-market case)
    for size in SIZES:
        sample = make_rows(size * 200, max(1, size * 200 // 50))
        calls = batches(sample, size)[:200]
        for strategy in ("copy", "values"):
            def run(calls: list[Any] = calls, strategy: str = strategy) -> None:
                for c in calls:
                    store.upsert(c, strategy=strategy)  # type: ignore[call-overload]
            t = best(repeat, truncate, run)
            out[f"pg_{strategy}_batch{size}_calls_per_s"] = len(calls) / t

    # missing_ranges on one long series (1,000,000 candles, 10 holes of 3)
    truncate()
    length = 1_000_000
    holes = {t for h in range(10) for t in range(h * 97_000 + 500, h * 97_000 + 503)}
    long = [("binance", "LONG/USDT", "1m", t * TF, 1.0, 1.0, 1.0, 1.0, 1.0) for t in range(length) if t not in holes]
    for part in batches(long, 100_000):
        store.upsert(part, strategy="copy")
    raw.execute("VACUUM ANALYZE candles")  # as autovacuum would after a backfill
    t0 = time.perf_counter()
    found = store.missing_ranges("binance", "LONG/USDT", "1m", TF, 0, length * TF)
    out["pg_missing_ranges_1m_rows_s"] = time.perf_counter() - t0
    assert len(found) == 10, found
    t0 = time.perf_counter()
    store.missing_ranges("binance", "LONG/USDT", "1m", TF, 0, 500 * TF)  # the common no-hole case
    out["pg_missing_ranges_no_hole_s"] = time.perf_counter() - t0
    raw.close()
    store.close()
    return out


class _Acker(Child):
    def __init__(self, expected: int, done: threading.Event) -> None:
        super().__init__()
        self.left, self.done, self.errors = expected, done, 0

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Written):
            self.errors += message.error is not None
            self.left -= 1
            if self.left == 0:
                self.done.set()
        return None


def actor_figures(url: str, rows: list[Any], page: int, repeat: int) -> dict[str, float]:
    """The storage actor on PostgreSQL, one Write per page, until every ack; best of `repeat`,
    plain and fenced (a lease for every series, its token on every write)."""
    raw = psycopg.connect(url, autocommit=True)
    keys = sorted({r[:3] for r in rows})
    pages = [rows[i : i + page] for i in range(0, len(rows), page)]
    out: dict[str, float] = {}
    for fenced in (False, True):
        fences = None
        if fenced:
            with PostgresStore(url) as store:
                got = store.acquire_many(keys, "bench#1", 3600)
            fences = Fences()
            for key, token in got.tokens.items():
                fences.set(key, token)
        best = 0.0
        for _ in range(repeat):
            raw.execute("TRUNCATE candles")
            runtime = Runtime()
            runtime.start()
            done = threading.Event()
            ref, _ = start_root(runtime, [ChildSpec("storage", StorageActor, args=(url,), kwargs={"fences": fences}),
                                          ChildSpec("acker", _Acker, args=(len(pages), done))])
            storage = ref.proxy().child_ref("storage").get()
            acker = ref.proxy().child_ref("acker").get()
            try:
                t0 = time.perf_counter()
                for i, chunk in enumerate(pages):
                    storage.tell(Write(rows=tuple(chunk), gaps=(), token=i, reply_to=acker))
                done.wait(600)
                best = max(best, len(rows) / (time.perf_counter() - t0))
            finally:
                ref.stop()
                runtime.stop()
        out["pg_actor_fenced_per_s" if fenced else "pg_actor_per_s"] = best
    raw.close()
    return out


# -- SQLite ------------------------------------------------------------------------------------


def sqlite_figures(rows: list[Any], batch: int, repeat: int) -> dict[str, float]:
    parts = batches(rows, batch)
    n = len(rows)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.db")
        store = Store(path).open()
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("PRAGMA synchronous=NORMAL")

        def truncate() -> None:
            raw.execute("DELETE FROM candles")

        def raw_many() -> None:
            for part in parts:
                raw.execute("BEGIN")
                raw.executemany("INSERT INTO candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", part)
                raw.execute("COMMIT")

        def store_upsert() -> None:
            for part in parts:
                store.upsert(part)

        out: dict[str, float] = {}
        for _ in range(repeat):
            for name, fn in [("raw_executemany", raw_many), ("store", store_upsert)]:
                t = best(1, truncate, fn)
                out[f"sqlite_{name}_per_s"] = max(out.get(f"sqlite_{name}_per_s", 0.0), n / t)
        raw.close()
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--page", type=int, default=1000, help="candles per Write told to the storage actor")
    parser.add_argument("--url", help="an existing database (its candles table is truncated!)")
    args = parser.parse_args()
    rows = make_rows(args.rows, args.series)

    cluster = None
    url = args.url
    if url is None:
        from tests.pg import PgCluster

        cluster = PgCluster()
        cluster.start()
        url = cluster.create_database("ck_bench")
    try:
        figures = pg_figures(url, rows, args.batch, args.repeat)
        figures.update(actor_figures(url, rows, args.page, args.repeat))
        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
    finally:
        if cluster is not None:
            cluster.destroy()
    figures.update(sqlite_figures(rows, args.batch, args.repeat))
    raw = figures["pg_raw_copy_per_s"]
    figures["pg_copy_ratio"] = figures["pg_copy_per_s"] / raw
    figures["pg_values_ratio"] = figures["pg_values_per_s"] / raw
    figures["sqlite_ratio"] = figures["sqlite_store_per_s"] / figures["sqlite_raw_executemany_per_s"]
    figures["pg_actor_ratio"] = figures["pg_actor_per_s"] / raw
    figures["pg_actor_fenced_ratio"] = figures["pg_actor_fenced_per_s"] / raw

    def line(label: str, value: str, base: str = "", target: str = "", met: str = "") -> None:
        print(f"| {label} | {value} | {base} | {target} | {met} |")

    print(f"\n{args.rows:,} candles, {args.series} series, batches of {args.batch:,}, best of {args.repeat};"
          f" PostgreSQL {version.split()[0]}, psycopg {psycopg.__version__}, SQLite {sqlite3.sqlite_version}\n")
    print("| figure | result | baseline (same run) | target | met |\n|---|---|---|---|---|")
    raw_txt = f"raw COPY: {raw:,.0f}/s"
    ratio = figures["pg_copy_ratio"]
    line(f"PostgresStore.upsert, copy (what \"auto\" uses from {COPY_FROM_ROWS} rows), new candles/s",
         f"{figures['pg_copy_per_s']:,.0f}", f"{raw_txt} ({ratio:.0%})", f">= {TARGET_RATIO:.0%}",
         "yes" if ratio >= TARGET_RATIO else "no")
    line("PostgresStore.upsert, values (multi-row INSERT), new candles/s", f"{figures['pg_values_per_s']:,.0f}",
         f"{raw_txt} ({figures['pg_values_ratio']:.0%})", "", "")
    for name, label in (("actor", "storage actor on PostgreSQL"), ("actor_fenced", "... with fencing tokens")):
        ratio = figures[f"pg_{name}_ratio"]
        line(f"{label}, one Write of {args.page} per page, until every ack: candles/s",
             f"{figures[f'pg_{name}_per_s']:,.0f}", f"{raw_txt} ({ratio:.0%})", f">= {TARGET_RATIO:.0%}",
             "yes" if ratio >= TARGET_RATIO else "no")
    for strategy in ("copy", "values"):
        line(f"PostgresStore.upsert, {strategy}, stored unchanged candles/s",
             f"{figures[f'pg_{strategy}_rewrite_per_s']:,.0f}")
    for size in SIZES:
        c, v = figures[f"pg_copy_batch{size}_calls_per_s"], figures[f"pg_values_batch{size}_calls_per_s"]
        line(f"upsert calls/s, {size} candles per call", f"copy {c:,.0f}, values {v:,.0f}",
             "", "", "values" if v > c else "copy")
    line("missing_ranges, 1,000,000-candle series, 10 holes", f"{figures['pg_missing_ranges_1m_rows_s'] * 1000:.0f} ms")
    line("missing_ranges, 500-candle stretch, no hole", f"{figures['pg_missing_ranges_no_hole_s'] * 1000:.1f} ms")
    line("Store.upsert (SQLite), new candles/s", f"{figures['sqlite_store_per_s']:,.0f}",
         f"raw executemany: {figures['sqlite_raw_executemany_per_s']:,.0f}/s ({figures['sqlite_ratio']:.0%})")
    print()
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
