"""Backfill progress: how far each series and each exchange is from its last closed candle.

Pure arithmetic over the series rows the health actor keeps (status, `start_ms`, `last_ts`), so
the daemon's progress log lines (`BackfillLog`, driven by the health actor) and the one-shot
`candlekeeper backfill` bars count the same way. A series' progress is where its cursor is:
candles from its start up to its newest stored one, of those from its start up to `end_ms` (the
open time of the first candle not wanted: the currently open one, or `--until`'s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .market.candles import timeframe_ms


def series_numbers(start_ms: int | None, last_ts: int | None, tf_ms: int, end_ms: int) -> tuple[int, int]:
    """(done, expected) candles of one series: its cursor's distance from its start, of the
    distance from its start to `end_ms`."""
    if start_ms is None:
        return 0, 0
    expected = max(0, (end_ms - start_ms) // tf_ms)
    done = 0 if last_ts is None else (last_ts + tf_ms - start_ms) // tf_ms
    return min(max(done, 0), expected), expected


def name(row: Mapping[str, Any]) -> str:
    return f"{row['exchange']}:{row['symbol']}@{row['timeframe']}"


@dataclass
class ExchangeProgress:
    """One exchange's backfill: candles `done` of `expected` over its `series`, how many are still
    `backfilling`, and the series furthest from done (`slowest`, with `slowest_left` candles)."""

    exchange: str
    series: int = 0
    backfilling: int = 0
    done: int = 0
    expected: int = 0
    slowest: str | None = None
    slowest_left: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 if self.expected == 0 else round(100.0 * self.done / self.expected, 1)


def by_exchange(rows: Iterable[Mapping[str, Any]], end_ms: Callable[[int], int]) -> dict[str, ExchangeProgress]:
    """Each exchange's progress; `end_ms(tf_ms)` is the end for a timeframe."""
    out: dict[str, ExchangeProgress] = {}
    for row in rows:
        p = out.setdefault(row["exchange"], ExchangeProgress(row["exchange"]))
        tf = timeframe_ms(row["timeframe"])
        done, expected = series_numbers(row.get("start_ms"), row.get("last_ts"), tf, end_ms(tf))
        p.series += 1
        p.done += done
        p.expected += expected
        status = str(row.get("status"))
        p.statuses[status] = p.statuses.get(status, 0) + 1
        if status == "backfilling":
            p.backfilling += 1
        if expected - done > p.slowest_left:
            p.slowest, p.slowest_left = name(row), expected - done
    return out


def closed_end(now_ms: int) -> Callable[[int], int]:
    """The end for "everything closed by now": the open time of each timeframe's open candle."""
    return lambda tf: (now_ms // tf) * tf


@dataclass
class _Episode:
    began: float  # monotonic seconds
    last_tick: float
    last_done: int | None = None


class BackfillLog:
    """What the daemon logs about backfills: while any series of an exchange is backfilling, one
    `backfill_progress` line per exchange per `tick` (its caller's timer), and one
    `backfill_complete` line when none is any more. `log(event, **fields)` writes a line;
    `rows(exchange)` gives the series rows of one exchange (None: all).

    `status` is called for every status report, so it costs O(1): it only keeps which series are
    backfilling; the rows are summed at ticks and at completions."""

    def __init__(self, log: Callable[..., Any], rows: Callable[[str | None], list[Mapping[str, Any]]]) -> None:
        self._log = log
        self._rows = rows
        self._backfilling: dict[str, set[str]] = {}
        self._episodes: dict[str, _Episode] = {}

    def status(self, exchange: str, path: str, status: str | None, now_ms: int, mono: float) -> None:
        """A series reported `status` (None: it is gone)."""
        paths = self._backfilling.setdefault(exchange, set())
        if status == "backfilling":
            paths.add(path)
            if exchange not in self._episodes:
                self._episodes[exchange] = _Episode(mono, mono)
            return
        paths.discard(path)
        if not paths and exchange in self._episodes:
            ep = self._episodes.pop(exchange)
            p = by_exchange(self._rows(exchange), closed_end(now_ms)).get(exchange, ExchangeProgress(exchange))
            # complete: every series caught up (or paused by an operator); otherwise it ended with
            # some series failing or stopped, and says which statuses
            not_ok = {s: n for s, n in p.statuses.items() if s not in ("ok", "paused")}
            self._log("backfill_ended" if not_ok else "backfill_complete", exchange=exchange, series=p.series,
                      candles=p.done, took_s=round(mono - ep.began, 1), **({"not_ok": not_ok} if not_ok else {}))

    def tick(self, now_ms: int, mono: float) -> None:
        """One progress line per exchange that is backfilling."""
        if not self._episodes:
            return
        progress = by_exchange(self._rows(None), closed_end(now_ms))
        for exchange, ep in self._episodes.items():
            p = progress.get(exchange)
            if p is None:
                continue
            elapsed = mono - ep.last_tick
            rate = None if ep.last_done is None or elapsed <= 0 else max(0.0, (p.done - ep.last_done) / elapsed)
            left = p.expected - p.done
            fields: dict[str, Any] = {
                "exchange": exchange, "series": p.series, "backfilling": p.backfilling, "candles": p.done,
                "expected": p.expected, "percent": p.percent,
                "rate_per_s": None if rate is None else round(rate, 1),
                "eta_s": round(left / rate) if rate else None, "running_s": round(mono - ep.began, 1),
            }
            if p.slowest:
                fields.update(slowest=p.slowest, slowest_left=p.slowest_left)
            self._log("backfill_progress", **fields)
            ep.last_tick, ep.last_done = mono, p.done
