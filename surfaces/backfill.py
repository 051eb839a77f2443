"""`candlekeeper backfill`: run the same tree until every series is complete, then exit.

A series is complete when the store holds every candle from its start (`--since`, else the
config's `since`/`lookback`) up to the last one closed before `--until` (else the launch time),
confirmed exchange gaps left out: checked with the store's `missing_ranges` once the series'
newest candle has reached the end, or it is caught up (a market closed at the end, as a forex
weekend, has no candle there). It could not be completed when it is `invalid` (the exchange does not
list it), stays `quarantined` while nothing else is left, or makes no progress for `--stall`.
Exit 0 when all are complete, 1 otherwise (they are listed), 2 for usage or start-up errors.

The control socket is served while it runs (`ctl health`, `ctl top` work), which also keeps it
from running beside a daemon of the same config (the socket is taken: exit 2). Series fetch
oldest first, so past `--until` each fetches at most one more page before the run stops.

Progress: rich bars on a terminal (per exchange: candles stored of expected, rate, ETA, the
slowest series), otherwise one `backfill_progress` line per exchange every `LINE_EVERY` seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..actors.market.candles import timeframe_ms
from ..actors.progress import ExchangeProgress, by_exchange, series_numbers
from ..app import data
from ..app.config import Config, parse_duration
from ..app.errors import StartupError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LINE_EVERY = 10.0  # seconds between progress lines when not on a terminal
POLL_S = 0.5  # how often progress is read from the health actor (one in-process ask)
CHECK_S = 1.0  # how often a series past its end is checked against the store

#: the daemon's own progress lines (the health actor's), counted against now: left out of a
#: one-shot run's log, which has its own, counted against --until
DAEMON_PROGRESS = ("backfill_progress", "backfill_complete", "backfill_ended")

log = structlog.get_logger("candlekeeper.backfill")


def bars_wanted(args: argparse.Namespace) -> bool:
    return bool(args.progress == "bars" or (args.progress == "auto" and sys.stderr.isatty()))


@dataclass
class _Series:
    key: tuple[str, str, str]
    tf_ms: int
    start_ms: int
    end_ms: int
    done: bool = False
    failed: str | None = None
    signature: Any = None
    progressed: float = 0.0  # monotonic time of the last progress
    checked: float = 0.0
    row: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.key[0]}:{self.key[1]}@{self.key[2]}"


def run_backfill(cfg: Config, args: argparse.Namespace) -> int:
    now_ms = int(time.time() * 1000)
    try:
        since = None if args.since is None else data.parse_time(args.since, now_ms=now_ms)
        until = now_ms if args.until is None else data.parse_time(args.until, now_ms=now_ms)
        stall = parse_duration(args.stall)
    except ValueError as exc:
        print(f"candlekeeper backfill: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if until > now_ms:
        print("candlekeeper backfill: --until is in the future; leave it out to backfill up to now", file=sys.stderr)
        return EXIT_USAGE
    if since is not None:
        if since >= until:
            print("candlekeeper backfill: --since must be before --until", file=sys.stderr)
            return EXIT_USAGE
        cfg = with_since(cfg, since)
    return Backfill(cfg, until, stall=stall, bars=bars_wanted(args), simulate=args.simulate).run()


def with_since(cfg: Config, since_ms: int) -> Config:
    """The config with every exchange backfilling from `since_ms`."""
    exchanges = tuple(dataclasses.replace(ex, ingest=dataclasses.replace(ex.ingest, since_ms=since_ms))
                      for ex in cfg.exchanges)
    return dataclasses.replace(cfg, exchanges=exchanges, ingest=dataclasses.replace(cfg.ingest, since_ms=since_ms))


class Backfill:
    """One run: start the system, watch it, stop it, say how it went."""

    def __init__(self, cfg: Config, until_ms: int, *, stall: float, bars: bool, simulate: bool = False,
                 runtime: Any = None) -> None:
        self.cfg = cfg
        self.runtime = runtime  # tests: a runtime on their clock
        self.until_ms = until_ms
        self.stall = stall
        self.bars = bars
        self.simulate = simulate
        self.stop = threading.Event()
        self.series: dict[str, _Series] = {}
        self._rates: dict[str, list[tuple[float, int]]] = {}

    def run(self) -> int:
        from ..app.system import System
        from .control import ControlSurface
        from .simulate import simulated

        sims: list[Any] = []
        cfg = self.cfg
        if self.simulate:
            cfg, sims = simulated(cfg)
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        system = System(cfg, runtime=self.runtime, surfaces=[ControlSurface(cfg.control)], on_shutdown=self.stop.set)
        began = time.monotonic()
        try:
            system.start()
        except StartupError as exc:
            print(f"candlekeeper backfill: {exc}", file=sys.stderr)
            for sim in sims:
                sim.stop()
            return EXIT_USAGE
        self.system, self.db = system, cfg.storage.location
        log.info("backfill_started", until=data.iso(self.until_ms), db=cfg.storage.display,
                 exchanges=[e.name for e in cfg.exchanges])
        try:
            self._watch()
        finally:
            system.stop()
            for sim in sims:
                sim.stop()
        return self._summary(time.monotonic() - began)

    # -- watching ------------------------------------------------------------------------

    def _wanted(self) -> set[str]:
        return {f"{ex}:{spec.id}" for ex, specs in self.system.blueprint.series_specs.items() for spec in specs}

    def _watch(self) -> None:
        if self.bars:
            self._watch_bars()
            return
        next_line = time.monotonic() + LINE_EVERY
        while not self._finished():
            if time.monotonic() >= next_line:
                next_line += LINE_EVERY
                for p in self._progress().values():
                    log.info("backfill_progress", **self._fields(p))
            self.stop.wait(POLL_S)

    def _watch_bars(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        columns = [TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                   TextColumn("candles {task.percentage:>3.0f}% {task.fields[rate]} ETA {task.fields[eta]}"),
                   TimeElapsedColumn(), TextColumn("[dim]{task.fields[slowest]}")]
        with Progress(*columns, console=console, redirect_stderr=True, redirect_stdout=False) as bars:
            tasks: dict[str, Any] = {}

            def update() -> None:
                for name, p in self._progress().items():
                    f = self._fields(p)
                    shown = {"rate": f"{f['rate_per_s']:.0f}/s" if f["rate_per_s"] is not None else "-",
                             "eta": _duration(f["eta_s"]),
                             "slowest": f"slowest {p.slowest.partition(':')[2]} ({p.slowest_left} left)"
                             if p.slowest else ""}
                    if name not in tasks:
                        tasks[name] = bars.add_task(name, total=max(p.expected, 1), rate="-", eta="-", slowest="")
                    bars.update(tasks[name], completed=p.done, total=max(p.expected, 1), rate=shown["rate"],
                                eta=shown["eta"], slowest=shown["slowest"])

            while not self._finished():
                update()
                self.stop.wait(POLL_S)
            update()  # the last frame stays on the screen: the state the run ended in

    def _progress(self) -> dict[str, ExchangeProgress]:
        rows = [dict(s.row, start_ms=s.start_ms) for s in self.series.values() if s.row]
        progress = by_exchange(rows, lambda tf: (self.until_ms // tf) * tf)
        for s in self.series.values():  # a complete series counts whole, holes refetched included
            if s.done and s.key[0] in progress:
                d, e = series_numbers(s.start_ms, s.row.get("last_ts"), s.tf_ms, s.end_ms)
                progress[s.key[0]].done += e - d
        return progress

    def _fields(self, p: ExchangeProgress) -> dict[str, Any]:
        now = time.monotonic()
        history = self._rates.setdefault(p.exchange, [])
        history.append((now, p.done))
        while len(history) > 2 and history[0][0] < now - 30:
            history.pop(0)
        (t0, d0), (t1, d1) = history[0], history[-1]
        rate = (d1 - d0) / (t1 - t0) if t1 > t0 else None
        left = p.expected - p.done
        series = [s for s in self.series.values() if s.key[0] == p.exchange]
        return {"exchange": p.exchange, "series": p.series, "complete": sum(s.done for s in series),
                "failed": sum(s.failed is not None for s in series), "candles": p.done, "expected": p.expected,
                "percent": p.percent, "rate_per_s": None if rate is None else round(max(rate, 0.0), 1),
                "eta_s": round(left / rate) if rate and rate > 0 else None, "slowest": p.slowest}

    def _finished(self) -> bool:
        """Update every series from health and the store; True when none is left to wait for."""
        if self.stop.is_set():
            return True
        rows = {f"{r['exchange']}:{r['symbol']}@{r['timeframe']}": r for r in self.system.progress()["series"]}
        now = time.monotonic()
        for name in self._wanted() | set(self.series):
            row = rows.get(name)
            s = self.series.get(name)
            if s is None:
                if row is None:
                    continue  # not reported yet
                s = self.series[name] = self._new(row, now)
            if row is not None:
                s.row = row
            if s.done or s.failed:
                continue
            self._check(s, now)
        left = [s for s in self.series.values() if not s.done and not s.failed]
        if len(self.series) < len(self._wanted()):
            return False
        if left and all(s.row.get("status") == "quarantined" for s in left):
            for s in left:
                s.failed = f"quarantined: {s.row.get('detail') or 'failing'}"
            return True
        return not left

    def _new(self, row: Mapping[str, Any], now: float) -> _Series:
        tf = timeframe_ms(row["timeframe"])
        start = row.get("start_ms")
        if start is None:  # a series that does not report its start: the config's, as it computes it
            ex = next((e for e in self.cfg.exchanges if e.name == row["exchange"]), None)
            start = data.configured_start(ex, tf, int(time.time() * 1000)) or 0
        return _Series((row["exchange"], row["symbol"], row["timeframe"]), tf, start, (self.until_ms // tf) * tf,
                       progressed=now)

    def _check(self, s: _Series, now: float) -> None:
        row = s.row
        if row.get("status") == "invalid":
            s.failed = f"invalid: {row.get('detail') or 'the exchange does not list it'}"
            return
        last = row.get("last_ts")
        signature: Any = (last, row.get("status"))
        # caught up (`ok`) is past the end too: a market closed at the end (a forex weekend) has
        # its last candle long before it, and the closed stretch recorded as a gap
        past_end = (s.end_ms <= s.start_ms or (last is not None and last + s.tf_ms >= s.end_ms)
                    or row.get("status") == "ok")
        if past_end and now - s.checked >= CHECK_S:
            s.checked = now
            with data.open_store(self.db) as store:
                missing = store.missing_ranges(*s.key, s.tf_ms, s.start_ms, s.end_ms)
            if not missing:
                s.done = True
                return
            signature = (last, sum(b - a for a, b in missing))
        if signature != s.signature:
            s.signature, s.progressed = signature, now
        elif now - s.progressed > self.stall:
            s.failed = (f"no progress for {_duration(self.stall)} ({row.get('status')}"
                        + (f": {row['detail']}" if row.get("detail") else "") + ")")

    # -- the end -------------------------------------------------------------------------

    def _summary(self, took: float) -> int:
        wanted = self._wanted() if hasattr(self, "system") else set()
        interrupted = self.stop.is_set()
        complete = [s for s in self.series.values() if s.done]
        failed = sorted((s for s in self.series.values() if not s.done), key=lambda s: s.name)
        unreported = sorted(wanted - set(self.series))
        until = data.iso(self.until_ms)
        if not failed and not unreported and not interrupted:
            print(f"backfill complete: {len(complete)} series, every closed candle up to {until} stored "
                  f"(took {_duration(took)})")
            log.info("backfill_done", series=len(complete), until=until, took_s=round(took, 1))
            return EXIT_OK
        head = "interrupted" if interrupted else "incomplete"
        print(f"backfill {head}: {len(complete)} of {len(complete) + len(failed) + len(unreported)} series "
              f"complete up to {until}; could not complete:")
        for s in failed:
            print(f"  {s.name}  {s.failed or 'stopped before it was complete'}")
        for name in unreported:
            print(f"  {name}  never started")
        log.warning("backfill_incomplete", complete=len(complete), failed=[s.name for s in failed] + unreported,
                    interrupted=interrupted)
        return EXIT_FAILED


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
