"""Data out of the store, without the actors: candle ranges (rows or Arrow), coverage, file names.

Everything here opens its own read-only connection (to a SQLite file or a PostgreSQL URL:
`stores.base.make_store(location, readonly=True)`), so it works with the daemon running (WAL
readers never block the writer; PostgreSQL is made for it) or not, and reads in pages
(`iter_candles`), so memory stays constant whatever the range. `export`, `ctl coverage`,
`backfill` and the `System` methods of the same names all read through here.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..actors.market.candles import Candle, timeframe_ms
from ..actors.stores.base import ReadStore, make_store
from ..actors.stores.errors import StoreError
from .config import Config, ExchangeConfig, parse_duration
from .errors import CommandError, MissingDependency, StorageUnusable

PYARROW_HINT = "pip install 'candlekeeper[parquet]'"
COLUMNS = ("open", "high", "low", "close", "volume")
SHOWN = 100  # missing stretches and gaps listed per series (all are counted)


# -- selecting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """EXCHANGE[:SYMBOL[@TIMEFRAME]]: what a command acts on; None parts match anything."""

    exchange: str | None = None
    symbol: str | None = None
    timeframe: str | None = None

    def matches(self, exchange: str, symbol: str, timeframe: str) -> bool:
        return ((self.exchange is None or self.exchange == exchange) and (self.symbol is None or self.symbol == symbol)
                and (self.timeframe is None or self.timeframe == timeframe))

    def __str__(self) -> str:
        text = self.exchange or "*"
        if self.symbol:
            text += f":{self.symbol}"
        if self.timeframe:
            text += f"@{self.timeframe}"
        return text


def parse_target(text: str | None) -> Target:
    """`binance`, `binance:BTC/USDT`, `binance:BTC/USDT@5m`; ValueError when malformed."""
    if not text:
        return Target()
    exchange, _, rest = text.partition(":")
    symbol, _, tf = rest.partition("@")
    if not exchange or (":" in text and not symbol) or ("@" in text and not tf):
        raise ValueError(f"bad target {text!r}: expected EXCHANGE[:SYMBOL[@TIMEFRAME]]")
    if tf:
        check_timeframe(tf)
    return Target(exchange, symbol or None, tf or None)


def check_timeframe(tf: str) -> int:
    try:
        return timeframe_ms(tf)
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"unknown timeframe {tf!r}") from None


_EPOCH_MS = re.compile(r"\d{11,}")


def parse_time(value: Any, *, now_ms: int) -> int:
    """Epoch ms from an int (ms), a datetime, an ISO 8601 date or datetime (naive = UTC), `now`,
    or a duration meaning that long ago (`30d`, `12h`). ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"bad time {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return int(moment.timestamp() * 1000)
    if isinstance(value, dt.date):
        return parse_time(dt.datetime(value.year, value.month, value.day), now_ms=now_ms)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"bad time {value!r}")
    text = value.strip()
    if text == "now":
        return now_ms
    if _EPOCH_MS.fullmatch(text):
        return int(text)
    try:
        return now_ms - int(parse_duration(text) * 1000)
    except ValueError:
        pass
    try:
        return parse_time(dt.datetime.fromisoformat(text.replace("Z", "+00:00")), now_ms=now_ms)
    except ValueError:
        raise ValueError(f"bad time {value!r}: expected an ISO 8601 date or datetime (UTC unless it says "
                         "otherwise), epoch milliseconds, 'now', or a duration ago such as 30d") from None


def iso(ms: int | None) -> str | None:
    """An open time as ISO 8601 UTC, e.g. 2024-01-02T03:04:00Z."""
    if ms is None:
        return None
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


# -- reading ---------------------------------------------------------------------------------


def open_store(location: str) -> ReadStore:
    """A read-only connection to the database at `location` (a SQLite file or a PostgreSQL
    URL); `StorageUnusable` when there is none."""
    try:
        return make_store(location, readonly=True).open()
    except StoreError as exc:
        raise StorageUnusable(f"cannot read the database: {exc}") from None


def iter_rows(
    store: ReadStore, exchange: str, symbol: str, timeframe: str, start_ms: int | None = None,
    end_ms: int | None = None, *, batch: int = 50_000,
) -> Iterator[Candle]:
    """(ts, open, high, low, close, volume) with open time in [start_ms, end_ms), oldest first."""
    for page in store.iter_candles(exchange, symbol, timeframe, start_ms, end_ms, batch):
        yield from page


def require_pyarrow() -> Any:
    """The pyarrow module, or `MissingDependency` naming the extra that installs it."""
    try:
        import pyarrow
    except ImportError:
        raise MissingDependency(f"this needs pyarrow: {PYARROW_HINT}") from None
    return pyarrow


def arrow_schema(*, time_column: str = "time", meta: dict[str, str] | None = None) -> Any:
    """The open time as timestamp[ms, UTC], prices and volume as float64."""
    pa = require_pyarrow()
    fields = [pa.field(time_column, pa.timestamp("ms", tz="UTC"), nullable=False)]
    fields += [pa.field(c, pa.float64(), nullable=False) for c in COLUMNS]
    return pa.schema(fields, metadata=meta)


def arrow_batches(store: ReadStore, exchange: str, symbol: str, timeframe: str, start_ms: int | None = None,
                  end_ms: int | None = None, *, schema: Any = None, batch: int = 50_000) -> Iterator[Any]:
    """Record batches of at most `batch` rows (columns built straight from each page)."""
    pa = require_pyarrow()
    schema = schema if schema is not None else arrow_schema()
    for page in store.iter_candles(exchange, symbol, timeframe, start_ms, end_ms, batch):
        columns = list(zip(*page, strict=True))
        arrays = [pa.array(columns[0], pa.int64()).cast(schema.field(0).type)]
        arrays += [pa.array(col, pa.float64()) for col in columns[1:]]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def arrow_table(store: ReadStore, exchange: str, symbol: str, timeframe: str, start_ms: int | None = None,
                end_ms: int | None = None) -> Any:
    pa = require_pyarrow()
    schema = arrow_schema(meta=series_meta(exchange, symbol, timeframe))
    return pa.Table.from_batches(list(arrow_batches(store, exchange, symbol, timeframe, start_ms, end_ms,
                                                    schema=schema)), schema=schema)


def series_meta(exchange: str, symbol: str, timeframe: str) -> dict[str, str]:
    return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "source": "candlekeeper"}


def freqtrade_name(symbol: str, timeframe: str, ext: str) -> str:
    """freqtrade's file name for a spot pair: `BTC/USDT` 5m -> `BTC_USDT-5m.feather` (its
    `pair_to_filename`: `/`, ` `, `.`, `@`, `$`, `+`, `:` become `_`)."""
    return f"{re.sub(r'[/ .@$+:]', '_', symbol)}-{timeframe}.{ext}"


# -- coverage --------------------------------------------------------------------------------


def known_series(store: ReadStore, config: Config | None) -> list[tuple[str, str, str]]:
    """Every series the store or the config knows: configured ones, those added at run time,
    and whatever has candles or gaps stored (removed series included: their data stays)."""
    keys = set(store.series_keys())
    if config is not None:
        for ex in config.exchanges:
            keys.update((ex.name, sym, tf) for sym in ex.symbols for tf in ex.ingest.timeframes)
    keys.update((e, s, t) for e, s, t, _, active in store.list_series() if active)
    return sorted(keys)


def configured_start(ex: ExchangeConfig | None, tf_ms: int, now_ms: int) -> int | None:
    """Where a series of `ex` starts its backfill (as the series actor computes it), or None."""
    if ex is None:
        return None
    start = ex.ingest.since_ms if ex.ingest.since_ms is not None else now_ms - int(ex.ingest.lookback * 1000)
    return -(-start // tf_ms) * tf_ms


def series_coverage(store: ReadStore, exchange: str, symbol: str, timeframe: str, *, config: Config | None,
                    now_ms: int) -> dict[str, Any]:
    """One series' coverage as the `coverage` command reports it.

    The range checked is [start, end): start is the earlier of the configured start (`since`, or
    now minus `lookback`) and the first stored candle; end is the open time of the last closed
    candle (that one may still be on its way). `missing` is what is in neither the store nor the
    confirmed gaps; `complete` means nothing is."""
    tf = timeframe_ms(timeframe)
    ex = None if config is None else next((e for e in config.exchanges if e.name == exchange), None)
    first_cfg = configured_start(ex, tf, now_ms)
    end = (now_ms // tf) * tf - tf
    bare = store.coverage(exchange, symbol, timeframe, tf)
    starts = [t for t in (first_cfg, bare.first_ts) if t is not None]
    start = min(starts) if starts else None
    cov = store.coverage(exchange, symbol, timeframe, tf, start, end) if start is not None else bare
    missing = list(cov.missing)
    by_reason: dict[str, dict[str, int]] = {}
    for a, b, reason in cov.gaps:
        entry = by_reason.setdefault(reason, {"stretches": 0, "candles": 0})
        entry["stretches"] += 1
        entry["candles"] += (b - a) // tf
    return {
        "exchange": exchange,
        "symbol": symbol,
        "timeframe": timeframe,
        "first_ts": cov.first_ts,
        "last_ts": cov.last_ts,
        "count": cov.count,
        "checked_from": start,
        "checked_to": end if start is not None else None,
        "missing_candles": sum((b - a) // tf for a, b in missing),
        "missing": [_stretch(a, b, tf) for a, b in missing[:SHOWN]],
        "missing_stretches": len(missing),
        "gaps": [{**_stretch(a, b, tf), "reason": reason} for a, b, reason in cov.gaps[:SHOWN]],
        "gaps_by_reason": by_reason,
        "configured": ex is not None and symbol in ex.symbols and timeframe in ex.ingest.timeframes,
        "complete": not missing,
    }


def _stretch(a: int, b: int, tf: int) -> dict[str, Any]:
    return {"from": a, "to": b, "from_iso": iso(a), "to_iso": iso(b), "candles": (b - a) // tf}


def coverage_report(path: str, target: Target, *, config: Config | None, now_ms: int) -> list[dict[str, Any]]:
    """Coverage of every known series `target` matches (see `series_coverage`); CommandError
    when none does."""
    with open_store(path) as store:
        keys = [k for k in known_series(store, config) if target.matches(*k)]
        if not keys:
            raise CommandError(f"no series matches {target}")
        return [series_coverage(store, *k, config=config, now_ms=now_ms) for k in keys]


def matching_series(path: str, target: Target, config: Config | None) -> list[tuple[str, str, str]]:
    with open_store(path) as store:
        return [k for k in known_series(store, config) if target.matches(*k)]
