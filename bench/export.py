"""`candlekeeper export` at 10 million rows: memory stays flat whatever the range.

    python bench/export.py [--rows 10000000] [--baseline-rows 100000] [--formats csv,json,parquet]
                           [--results bench/RESULTS.md | --no-results]

Builds one SQLite database holding one series of `--rows` 1m candles (and nothing else), then
runs the installed `candlekeeper export` command once per format over the whole series and once
over its first `--baseline-rows` rows (the baseline, in the same run), sampling each process's
resident memory every 50 ms (psutil). Reported per format: the peak RSS of the full export, the
peak RSS of the baseline, their ratio (target: at most 1.5, memory that does not grow with the
range), rows written (checked: every row, once) and the output's size. Last line on stdout: one
JSON object. The export section of bench/RESULTS.md (between `<!-- export:begin -->` and
`<!-- export:end -->`) is replaced unless `--no-results`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
from results import command_line, replace_section

HERE = os.path.dirname(os.path.abspath(__file__))
TF_MS = 60_000
START_MS = 1_500_000_000_000 // TF_MS * TF_MS
TARGET_RATIO = 1.5
BEGIN, END = "<!-- export:begin -->", "<!-- export:end -->"
SUFFIX = {"csv": "csv", "json": "jsonl", "parquet": "parquet"}


def build(db: str, rows: int) -> None:
    """The daemon's own schema (its store creates it), then the rows in large transactions."""
    from candlekeeper.actors.stores.sqlite import Store

    Store(db).open().close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    chunk = 200_000
    for lo in range(0, rows, chunk):
        batch = []
        for i in range(lo, min(rows, lo + chunk)):
            p = 100.0 + (i % 1000) * 0.01
            batch.append(("binance", "BTC/USDT", "1m", START_MS + i * TF_MS, p, p + 1.0, p - 1.0, p + 0.5, 10.0))
        conn.executemany("INSERT INTO candles (exchange, symbol, timeframe, ts, open, high, low, close, volume)"
                         " VALUES (?,?,?,?,?,?,?,?,?)", batch)
        conn.commit()
    conn.close()


def export(db: str, fmt: str, out: str, rows: int | None) -> dict[str, Any]:
    """One `candlekeeper export` process: its peak RSS, time and exit code."""
    cmd = [sys.executable, "-m", "candlekeeper", "export", "binance:BTC/USDT@1m", "--db", db, "--format", fmt,
           "-o", out]
    if rows is not None:
        until = dt.datetime.fromtimestamp((START_MS + rows * TF_MS) / 1000, dt.UTC).isoformat()
        cmd += ["--until", until]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    err = proc.stderr.read() if proc.stderr else ""
    return {"rc": proc.returncode, "peak_rss_mb": round(peak / 2**20, 1), "seconds": round(time.monotonic() - t0, 1),
            "bytes": os.path.getsize(out) if os.path.exists(out) else 0, "stderr": err.strip()[-300:]}


def count(path: str, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as f:
        n = sum(1 for _ in f)
    return n - 1 if fmt == "csv" else n  # the csv header


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"rows": args.rows, "baseline_rows": args.baseline_rows, "formats": {}}
    with tempfile.TemporaryDirectory(prefix="ck-export-") as tmp:
        db = os.path.join(tmp, "candles.db")
        t0 = time.monotonic()
        build(db, args.rows)
        result["build_s"] = round(time.monotonic() - t0, 1)
        result["db_mb"] = round(os.path.getsize(db) / 2**20, 1)
        print(f"[build] {args.rows:,} rows in {result['build_s']} s, {result['db_mb']} MB", flush=True)
        for fmt in args.formats.split(","):
            out = os.path.join(tmp, f"out.{SUFFIX[fmt]}")
            base = export(db, fmt, out, args.baseline_rows)
            base_rows = count(out, fmt) if base["rc"] == 0 else None
            os.unlink(out)
            full = export(db, fmt, out, None)
            full_rows = count(out, fmt) if full["rc"] == 0 else None
            if os.path.exists(out):
                os.unlink(out)
            ratio = full["peak_rss_mb"] / base["peak_rss_mb"] if base["peak_rss_mb"] else None
            result["formats"][fmt] = {"full": full, "baseline": base, "rows_written": full_rows,
                                      "baseline_rows_written": base_rows,
                                      "ratio": None if ratio is None else round(ratio, 3)}
            print(f"[{fmt}] peak RSS {full['peak_rss_mb']} MB for {full_rows} rows in {full['seconds']} s; "
                  f"{base['peak_rss_mb']} MB for {base_rows} rows; ratio {result['formats'][fmt]['ratio']}",
                  flush=True)
    return result


def verdict(r: dict[str, Any], fmt: str) -> bool:
    f = r["formats"][fmt]
    return (f["full"]["rc"] == 0 and f["rows_written"] == r["rows"] and f["baseline_rows_written"] == r["baseline_rows"]
            and f["ratio"] is not None and f["ratio"] <= TARGET_RATIO)


def section(r: dict[str, Any], command: str) -> str:
    lines = [
        BEGIN,
        f"## Export: `{command}` ({dt.date.today().isoformat()})",
        "",
        f"One series of {r['rows']:,} 1m candles in SQLite ({r['db_mb']} MB), exported whole by the "
        f"`candlekeeper export` command, one process per format; the baseline is the same command over "
        f"the first {r['baseline_rows']:,} rows, in the same run. Peak RSS sampled every 50 ms.",
        "",
        "| format | peak RSS, all rows | peak RSS, baseline | ratio (target <= 1.5) | rows written | output | time | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fmt, f in r["formats"].items():
        lines.append(
            f"| {fmt} | {f['full']['peak_rss_mb']} MB | {f['baseline']['peak_rss_mb']} MB | {f['ratio']} | "
            f"{f['rows_written']:,} of {r['rows']:,} | {f['full']['bytes'] / 2**20:,.0f} MB | {f['full']['seconds']} s | "
            f"{'yes' if verdict(r, fmt) else '**no**'} |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--baseline-rows", type=int, default=100_000)
    parser.add_argument("--formats", default="csv,json,parquet")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if not args.no_results:
        replace_section(args.results, section(result, command_line("export.py")), BEGIN, END)
    result["targets_met"] = {fmt: verdict(result, fmt) for fmt in result["formats"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
