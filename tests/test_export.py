"""Data out: the store's paged range read and coverage, `candlekeeper export` in every format
(freqtrade's layout included) through the real command line, its constant memory, the missing
pyarrow message, and the embedding API's range read (rows and Arrow) and coverage."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import feather

from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.app import data
from candlekeeper.app.system import System
from candlekeeper.supervisors.child import Runtime
from candlekeeper.surfaces import export as export_mod
from tests import forkserver
from tests.test_ingest import TF, make_config, sim, sim_start, wait_until  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_040_000  # a minute boundary
KEY = ("binance", "BTC/USDT", "1m")


def fill(path: str, n: int, *, skip: tuple[int, ...] = (), key: tuple[str, str, str] = KEY) -> list[tuple]:
    rows = [(*key, T0 + i * TF, 100.0 + i, 101.5 + i, 99.25 + i, 100.5 + i, 0.1 * i) for i in range(n) if i not in skip]
    with Store(path) as s:
        for i in range(0, len(rows), 5000):
            s.upsert(rows[i:i + 5000])
    return rows


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python run.py ARGS`, forked from the fork server (tests/forkserver.py)."""
    return forkserver.run(args, cwd or Path.cwd())


# -- the store -------------------------------------------------------------------------------


def test_iter_candles_pages_in_order_and_honours_the_range(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    rows = fill(db, 1000, skip=(5,))
    with Store(db, readonly=True) as store:
        pages = list(store.iter_candles(*KEY, batch=300))
        assert [len(p) for p in pages] == [300, 300, 300, 99]
        assert [c for p in pages for c in p] == [r[3:] for r in rows]
        part = [c for p in store.iter_candles(*KEY, T0 + 3 * TF, T0 + 8 * TF, batch=2) for c in p]
        assert [c[0] for c in part] == [T0 + i * TF for i in (3, 4, 6, 7)]
        assert list(store.iter_candles("binance", "NOPE/USDT", "1m")) == []
        with pytest.raises(ValueError):
            next(store.iter_candles(*KEY, batch=0))


def test_coverage_and_series_keys(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    fill(db, 100, skip=(10, 11, 50))
    fill(db, 5, key=("okx", "ETH/USDT", "5m"))
    with Store(db) as s:
        s.record_gap(*KEY, T0 + 10 * TF, T0 + 12 * TF, "no_trades")
        s.record_gap("kraken", "XBT/USD", "1h", T0, T0 + 3600_000, "before_listing")
        cov = s.coverage(*KEY, TF, T0 - 2 * TF, T0 + 102 * TF)
        assert (cov.first_ts, cov.last_ts, cov.count) == (T0, T0 + 99 * TF, 97)
        assert cov.missing == ((T0 - 2 * TF, T0), (T0 + 50 * TF, T0 + 51 * TF), (T0 + 100 * TF, T0 + 102 * TF))
        assert cov.gaps == ((T0 + 10 * TF, T0 + 12 * TF, "no_trades"),)
        assert s.coverage(*KEY, TF).missing == ((T0 + 50 * TF, T0 + 51 * TF),)  # stored range only
        assert s.series_keys() == [("binance", "BTC/USDT", "1m"), ("kraken", "XBT/USD", "1h"),
                                   ("okx", "ETH/USDT", "5m")]


def test_coverage_report_uses_the_configured_start_and_the_last_closed_candle(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    fill(db, 100, skip=(50,))
    with Store(db) as s:
        s.record_gap(*KEY, T0 - 5 * TF, T0, "before_listing")
    from candlekeeper.app import config as config_mod

    cfg = config_mod.from_dict({"storage": {"path": db}, "exchanges": {"binance": {
        "symbols": ["BTC/USDT", "ETH/USDT"], "since": data.iso(T0 - 5 * TF)}}})
    now = T0 + 102 * TF + 30_000  # candle 101 closed, 102 open
    report = {r["symbol"]: r for r in data.coverage_report(db, data.Target("binance"), config=cfg, now_ms=now)}
    btc = report["BTC/USDT"]
    assert btc["checked_from"] == T0 - 5 * TF and btc["checked_to"] == T0 + 101 * TF
    assert [(m["from"], m["to"]) for m in btc["missing"]] == [(T0 + 50 * TF, T0 + 51 * TF), (T0 + 100 * TF, T0 + 101 * TF)]
    assert btc["missing_candles"] == 2 and not btc["complete"]
    assert btc["gaps_by_reason"] == {"before_listing": {"stretches": 1, "candles": 5}}
    assert btc["missing"][0]["from_iso"] == data.iso(T0 + 50 * TF)
    eth = report["ETH/USDT"]  # configured, nothing stored: all of it is missing
    assert eth["count"] == 0 and eth["missing_candles"] == 106 and eth["configured"]
    with pytest.raises(data.CommandError, match="no series matches"):
        data.coverage_report(db, data.Target("okx"), config=cfg, now_ms=now)


@pytest.mark.parametrize(("text", "ms"), [
    ("2023-11-14T22:14:00Z", T0), ("2023-11-14T22:14:00", T0), ("2023-11-14T23:14:00+01:00", T0),
    ("2023-11-14", 1_699_920_000_000), ("1699999640000", 1_699_999_640_000), ("now", T0), ("2m", T0 - 120_000),
])
def test_parse_time(text: str, ms: int) -> None:
    assert data.parse_time(text, now_ms=T0) == ms


def test_parse_time_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        data.parse_time("yesterday-ish", now_ms=T0)


# -- the export command ----------------------------------------------------------------------


def test_export_csv_and_json_lines_exact(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    fill(db, 300, skip=(7,))
    res = cli("export", "binance:BTC/USDT@1m", "--db", db, "--since", data.iso(T0 + 5 * TF), "--until",
              data.iso(T0 + 10 * TF))
    assert res.returncode == 0, res.stderr
    got = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [int(r["ts"]) for r in got] == [T0 + i * TF for i in (5, 6, 8, 9)]
    assert got[0]["time"] == data.iso(T0 + 5 * TF) and float(got[0]["volume"]) == 0.1 * 5
    assert "4 candles of binance:BTC/USDT@1m" in res.stderr
    out = tmp_path / "x.jsonl"
    res = cli("export", "binance:BTC/USDT", "--db", db, "--format", "json", "-o", str(out))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 299 and lines[1] == {"time": data.iso(T0 + TF), "ts": T0 + TF, "open": 101.0, "high": 102.5,
                                              "low": 100.25, "close": 101.5, "volume": 0.1}


def test_export_parquet_types_and_freqtrade_layout(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    rows = fill(db, 500)
    fill(db, 20, key=("binance", "ETH/USDT", "5m"))
    out = tmp_path / "btc.parquet"
    res = cli("export", "binance:BTC/USDT@1m", "--db", db, "--format", "parquet", "-o", str(out))
    assert res.returncode == 0, res.stderr
    table = pq.read_table(out)
    assert str(table.schema.field("time").type) == "timestamp[ms, tz=UTC]"
    assert all(str(table.schema.field(c).type) == "double" for c in ("open", "high", "low", "close", "volume"))
    assert table.schema.metadata[b"symbol"] == b"BTC/USDT"
    assert table.column("close").to_pylist() == [r[7] for r in rows]
    assert table.column("time").cast("int64").to_pylist() == [r[3] for r in rows]

    ft = tmp_path / "user_data" / "data" / "binance"
    res = cli("export", "binance", "--db", db, "--layout", "freqtrade", "-o", str(ft))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in ft.iterdir()) == ["BTC_USDT-1m.feather", "ETH_USDT-5m.feather"]
    t = feather.read_table(ft / "BTC_USDT-1m.feather")
    assert t.column_names == ["date", "open", "high", "low", "close", "volume"]  # freqtrade's columns, in order
    assert str(t.schema.field("date").type) == "timestamp[ms, tz=UTC]" and t.num_rows == 500
    res = cli("export", "binance:ETH/USDT", "--db", db, "--layout", "freqtrade", "--format", "parquet", "-o", str(ft))
    assert res.returncode == 0 and pq.read_table(ft / "ETH_USDT-5m.parquet").num_rows == 20


@pytest.mark.parametrize(("args", "needle"), [
    (["binance"], "EXCHANGE:SYMBOL"),
    (["binance:BTC/USDT", "--format", "parquet"], "-o PATH"),
    (["binance:BTC/USDT", "--since", "soon"], "bad time"),
    (["binance:BTC/USDT@7m"], "unknown timeframe"),
    (["binance", "--layout", "freqtrade"], "-o DIR"),
])
def test_export_usage_errors_exit_2_with_one_line(tmp_path, args: list[str], needle: str) -> None:
    db = str(tmp_path / "c.db")
    fill(db, 3)
    res = cli("export", *args, "--db", db)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr


def test_export_unknown_series_or_database(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    fill(db, 3)
    res = cli("export", "binance:NOPE/USDT", "--db", db)
    assert res.returncode == 1 and "no series matches binance:NOPE/USDT@1m" in res.stderr
    res = cli("export", "binance:BTC/USDT", "--db", str(tmp_path / "none.db"))
    assert res.returncode == 2 and "cannot read the database" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "none.db").exists()  # read-only: never created


def test_parquet_without_pyarrow_names_the_extra(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    fill(db, 3)
    code = ("import sys; sys.modules['pyarrow'] = None; from candlekeeper.surfaces.cli import main; "
            f"sys.exit(main(['export', 'binance:BTC/USDT', '--db', {db!r}, '--format', 'parquet', '-o', 'x.parquet']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "pip install 'candlekeeper[parquet]'" in lines[0]
    assert not (tmp_path / "x.parquet").exists()


def test_export_streams_in_constant_memory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python memory while exporting stays flat: four times the rows, the same peak, and far
    below what holding the rows would take (10,000 rows, ~2 MB): the export never loads the range."""
    db = str(tmp_path / "c.db")
    fill(db, 10_000)
    monkeypatch.setattr(export_mod, "BATCH", 500)

    def peak(fmt: str, rows: int) -> int:
        end = T0 + rows * TF
        tracemalloc.start()
        try:
            with Store(db, readonly=True) as store:
                if fmt in ("csv", "json"):
                    assert export_mod.write_text(store, KEY, None, end, fmt, _Counting()) == rows
                else:
                    with open(tmp_path / f"out.{fmt}", "wb") as fh:
                        assert export_mod.write_arrow(store, KEY, None, end, fmt, fh, time_column="time") == rows
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    for fmt in ("csv", "json", "parquet"):
        peak(fmt, 1_000)  # warm up: first-use caches and imports are not the export's memory
        small, large = peak(fmt, 2_500), peak(fmt, 10_000)
        assert large < small * 1.5 + 300_000 and large < 1_000_000, (fmt, small, large)
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 20


class _Counting(io.TextIOBase):
    """A text sink that keeps nothing (so only the exporter's own memory is measured)."""

    def __init__(self) -> None:
        self.chars = 0

    def write(self, text: str) -> int:
        self.chars += len(text)
        return len(text)


# -- the embedding API -----------------------------------------------------------------------


def test_embedded_range_read_rows_table_and_coverage(tmp_path, sim, sim_start, clock) -> None:
    cfg = make_config(tmp_path, sim, sim_start, page_limit=500)
    system = System(cfg, runtime=Runtime(wall=clock)).start()
    try:
        end = (clock.ms() // TF) * TF
        wait_until(lambda: [s["status"] for s in system.health()["series"]] == ["ok", "ok"], what="caught up")
        rows = list(system.read_candles("binance", "BTC/USDT", "1m", since=sim_start, until=end, batch=100))
        want = [tuple(c) for c in sim.expected_candles("BTC/USDT", "1m", sim_start, end)]
        assert rows == want
        some = list(system.read_candles("binance", "BTC/USDT", since=data.iso(sim_start), until=sim_start + 3 * TF))
        assert some == want[:3]
        table = system.read_table("binance", "ETH/USDT", "1m", since=sim_start, until=end)
        assert table.num_rows == len(want) and table.schema.field("time").type.tz == "UTC"
        assert table.schema.metadata[b"symbol"] == b"ETH/USDT"
        cov = system.coverage("binance")
        assert [c["symbol"] for c in cov] == ["BTC/USDT", "ETH/USDT"]
        assert all(c["complete"] and c["count"] == len(want) and c["first_ts"] == sim_start for c in cov)
        with pytest.raises(data.CommandError, match="bad time"):
            system.read_candles("binance", "BTC/USDT", since="someday")
        with pytest.raises(data.CommandError, match="unknown timeframe"):
            system.coverage("binance", "BTC/USDT", "7m")
    finally:
        system.stop()
