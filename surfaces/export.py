"""`candlekeeper export`: stored candles out to CSV, JSON lines, Parquet, or freqtrade's files.

It reads the database directly through a read-only connection (`candlekeeper.app.data`), so it
works with the daemon running or not, and streams: pages of `BATCH` rows are read and written one
after the other, so memory stays flat whatever the range (10 million rows included).

Formats (open time `time` in UTC, prices and volume as stored, float64):
  csv      `time,ts,open,high,low,close,volume`: ISO 8601 time and epoch ms; floats round-trip
  json     JSON lines, one object per candle with the same keys
  parquet  `time` timestamp[ms, UTC], `open`..`volume` float64; exchange/symbol/timeframe in the
           file's metadata; one row group per page (needs pyarrow: the `parquet` extra)
  feather  the same columns in an Arrow IPC file (lz4)
`--layout freqtrade` writes freqtrade's data layout instead: `<PAIR>-<tf>.feather` (or
`.parquet`) per series, columns `date,open,high,low,close,volume`, into the `-o` directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from ..actors.stores.base import ReadStore, redacted
from ..app import config as config_mod
from ..app import data
from ..app.errors import MissingDependency, StorageUnusable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
BATCH = 50_000
TEXT_FORMATS = ("csv", "json")


class Usage(Exception):
    """A usage error: exit 2 with the message."""


def run_export(args: argparse.Namespace) -> int:
    try:
        plan = _plan(args)
    except (Usage, ValueError, config_mod.ConfigError, MissingDependency, StorageUnusable) as exc:
        print(f"candlekeeper export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    db, target, series, fmt, start, end = plan
    if not series:
        print(f"candlekeeper export: refused: no series matches {target} in {redacted(db)}", file=sys.stderr)
        return EXIT_FAILED
    try:
        with data.open_store(db) as store:
            if args.layout == "freqtrade":
                for key in series:
                    path = os.path.join(args.output, data.freqtrade_name(key[1], key[2], fmt))
                    n = write_freqtrade(store, key, start, end, fmt, path)
                    _report(key, n, path)
                return EXIT_OK
            key = series[0]
            n = export(store, key, start, end, fmt, args.output)
            _report(key, n, args.output or "stdout")
    except StorageUnusable as exc:
        print(f"candlekeeper export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _report(key: tuple[str, str, str], n: int, where: str) -> None:
    print(f"candlekeeper export: {n} candles of {key[0]}:{key[1]}@{key[2]} to {where}", file=sys.stderr)


def _plan(args: argparse.Namespace) -> tuple[str, data.Target, list[tuple[str, str, str]], str, int | None, int | None]:
    """(database, target, series, format, start, end) from the command line; Usage when it makes
    no sense."""
    path = args.sub_config or args.config
    cfg = config_mod.load(path) if path else None
    db = args.db or (cfg.storage.location if cfg is not None else config_mod.default().storage.location)
    target = data.parse_target(args.target)
    freqtrade = args.layout == "freqtrade"
    fmt = args.format or ("feather" if freqtrade else "csv")
    if freqtrade:
        if fmt not in ("feather", "parquet"):
            raise Usage("--layout freqtrade writes feather or parquet files")
        if not args.output:
            raise Usage("--layout freqtrade needs -o DIR (freqtrade's user_data/data/<exchange>)")
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise Usage(f"-o {args.output} is not a directory")
    else:
        if not target.symbol:
            raise Usage(f"export needs EXCHANGE:SYMBOL[@TIMEFRAME], got {args.target!r} (several series: "
                        "--layout freqtrade)")
        if fmt not in TEXT_FORMATS and not args.output:
            raise Usage(f"{fmt} needs a file: -o PATH")
        target = data.Target(target.exchange, target.symbol, target.timeframe or "1m")
    now = int(time.time() * 1000)
    start = None if args.since is None else data.parse_time(args.since, now_ms=now)
    end = None if args.until is None else data.parse_time(args.until, now_ms=now)
    if start is not None and end is not None and end <= start:
        raise Usage("--until must be after --since")
    if fmt not in TEXT_FORMATS:
        data.require_pyarrow()
    series = data.matching_series(db, target, cfg)
    if not freqtrade:
        series = series[:1]
    else:
        os.makedirs(args.output, exist_ok=True)
    return db, target, series, fmt, start, end


# -- writers ---------------------------------------------------------------------------------


def export(store: ReadStore, key: tuple[str, str, str], start: int | None, end: int | None, fmt: str,
           output: str | None) -> int:
    """Write one series' candles in [start, end) as `fmt` to `output` (None: stdout); returns the
    count. Written to a temporary file renamed into place, so a reader never sees half a file."""
    if fmt in TEXT_FORMATS:
        if output is None:
            return write_text(store, key, start, end, fmt, sys.stdout)
        with _replacing(output, "w") as fh:
            return write_text(store, key, start, end, fmt, fh)
    assert output is not None
    with _replacing(output, "wb") as fh:
        return write_arrow(store, key, start, end, fmt, fh, time_column="time")


def write_freqtrade(store: ReadStore, key: tuple[str, str, str], start: int | None, end: int | None, fmt: str,
                    path: str) -> int:
    with _replacing(path, "wb") as fh:
        return write_arrow(store, key, start, end, fmt, fh, time_column="date")


@contextlib.contextmanager
def _replacing(path: str, mode: str) -> Iterator[IO[Any]]:
    tmp = f"{path}.part-{os.getpid()}"
    try:
        with open(tmp, mode, newline=None if "b" in mode else "") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(store: ReadStore, key: tuple[str, str, str], start: int | None, end: int | None, fmt: str,
               out: IO[str]) -> int:
    n = 0
    clock = _IsoClock()
    if fmt == "csv":
        out.write("time,ts,open,high,low,close,volume\n")
    for page in store.iter_candles(*key, start, end, BATCH):
        if fmt == "csv":
            out.write("".join(f"{clock(ts)},{ts},{o!r},{h!r},{lo!r},{c!r},{v!r}\n" for ts, o, h, lo, c, v in page))
        else:
            out.write("".join(
                f'{{"time":"{clock(ts)}","ts":{ts},"open":{o!r},"high":{h!r},"low":{lo!r},"close":{c!r},'
                f'"volume":{v!r}}}\n' for ts, o, h, lo, c, v in page))
        n += len(page)
    out.flush()
    return n


def write_arrow(store: ReadStore, key: tuple[str, str, str], start: int | None, end: int | None, fmt: str,
                out: IO[bytes], *, time_column: str) -> int:
    pa = data.require_pyarrow()
    schema = data.arrow_schema(time_column=time_column, meta=data.series_meta(*key))
    n = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer: Any = pq.ParquetWriter(out, schema, compression="zstd")
    else:
        writer = pa.ipc.new_file(out, schema, options=pa.ipc.IpcWriteOptions(compression="lz4"))
    try:
        for batch in data.arrow_batches(store, *key, start, end, schema=schema, batch=BATCH):
            writer.write_batch(batch)
            n += batch.num_rows
    finally:
        writer.close()
    return n


class _IsoClock:
    """ISO 8601 UTC text of open times, fast: the date is formatted once per day, the time of
    day by arithmetic (datetime per row would dominate a 10-million-row export)."""

    def __init__(self) -> None:
        self._day = -1
        self._prefix = ""

    def __call__(self, ts: int) -> str:
        day, rem = divmod(ts, 86_400_000)
        if day != self._day:
            self._day = day
            self._prefix = (dt.datetime(1970, 1, 1) + dt.timedelta(days=day)).strftime("%Y-%m-%dT")
        h, rem = divmod(rem, 3_600_000)
        m, rem = divmod(rem, 60_000)
        s, ms = divmod(rem, 1000)
        return f"{self._prefix}{h:02d}:{m:02d}:{s:02d}" + (f".{ms:03d}Z" if ms else "Z")
