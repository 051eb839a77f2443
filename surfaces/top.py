"""`python run.py ctl top`: a live terminal view of a running daemon, refreshed every second.

It shows the health roll-up and its reasons, each exchange's breaker and live stream (state,
series it serves of those it should, reconnects), the actors of the tree with their restarts,
and every series with its status, source (`stream` or `rest`, for exchanges that stream), lag
(seconds since its newest stored candle closed), restarts and failures, worst first, cut to the
terminal's height. `q` quits,
any other key refreshes at once, Ctrl-C quits too (exit code 0).

When the daemon cannot be reached at start, `run_top` raises (the `ctl` client prints "the daemon
is not running" and exits 1). When it goes away while the view runs, the view keeps the last data
it has under a red "daemon not reachable" banner and keeps retrying every interval, so it comes
back by itself when the daemon does.

Drawn with rich (`rich.live.Live`); keys are read with `select` from the terminal in cbreak
mode (no echo, no line buffering, Ctrl-C still interrupts), and the terminal's mode is restored
on the way out, whatever the way out is. Without a terminal on stdin it just refreshes until
Ctrl-C. With stdout not a terminal (a pipe, a file) `ctl top` prints one frame (`print_frame`)
and exits; `ctl top --json` prints one JSON snapshot of the same data.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..actors.market.candles import timeframe_ms

ROLLUP_STYLE = {"ok": "bold black on green", "degraded": "bold black on yellow", "down": "bold white on red"}
BREAKER_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}
EXCHANGE_STYLE = {"ok": "green", "starting": "cyan", "recovering": "yellow", "down": "bold red", "invalid": "bold red"}
SERIES_STYLE = {
    "ok": "green",
    "backfilling": "cyan",
    "paused": "blue",
    "retrying": "yellow",
    "quarantined": "magenta",
    "invalid": "bold red",
    "stopped": "bold red",
}
ACTOR_STYLE = {"running": "green", "restarting": "yellow", "starting": "cyan"}
STREAM_STYLE = {"up": "green", "partial": "yellow", "connecting": "cyan", "down": "bold red"}
SOURCE_STYLE = {"stream": "green", "rest": "yellow"}
# worst first: the rows an operator has to look at come before the healthy ones
SEVERITY = {"stopped": 0, "invalid": 1, "quarantined": 2, "retrying": 3, "backfilling": 5, "paused": 6, "ok": 7}
MAX_REASONS = 3


# -- rendering (pure) --------------------------------------------------------------------------


def render(
    health: dict[str, Any] | None,
    now: float,
    *,
    tree: dict[str, Any] | None = None,
    error: str | None = None,
    updated: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> RenderableType:
    """The whole view for one health report (`ctl health --json`'s shape) at wall-clock `now`.

    `tree`: the `tree` command's result, for the actors line; `error`: the daemon could not be
    reached (the data shown is from `updated`); `height`, `width`: the terminal's, the series
    table is cut to fit with a "+N more" line (the actors line wraps, every actor stays shown).
    """
    health = health or {}
    parts: list[RenderableType] = []
    used = 0

    status = str(health.get("status") or "unknown")
    head = Text(no_wrap=True, overflow="ellipsis")
    head.append("candlekeeper ", style="bold")
    head.append(f" {status.upper()} ", style=ROLLUP_STYLE.get(status, "bold"))
    exchanges = [e for e in health.get("exchanges") or [] if isinstance(e, dict)]
    series = [s for s in health.get("series") or [] if isinstance(s, dict)]
    head.append(f"  {len(exchanges)} exchange{'s' * (len(exchanges) != 1)} · {_series_summary(series)}")
    head.append(f"  {_clock(now)}", style="dim")
    head.append("   q quits", style="dim")
    parts.append(head)
    used += 1

    reasons = [str(r) for r in health.get("reasons") or []]
    if health.get("error"):
        reasons.insert(0, str(health["error"]))
    for reason in reasons[:MAX_REASONS]:
        parts.append(Text(f"  {reason}", style=_rollup_colour(status), no_wrap=True, overflow="ellipsis"))
    if len(reasons) > MAX_REASONS:
        parts.append(Text(f"  and {len(reasons) - MAX_REASONS} more reasons", style="dim"))
    used += min(len(reasons), MAX_REASONS + 1)

    if error is not None:
        since = f"; showing data from {_clock(updated)}" if updated is not None else ""
        parts.append(Text(f" daemon not reachable: {error} (retrying{since}) ", style="bold white on red",
                          no_wrap=True, overflow="ellipsis"))
        used += 1

    parts.append(Text(""))
    parts.append(_exchanges_table(exchanges, stale=error is not None))
    used += 1 + 2 + max(1, len(exchanges))

    actors = _actors_line(tree)
    if actors is not None:
        parts.append(actors)
        used += -(-len(actors.plain) // width) if width else 1

    parts.append(Text(""))
    used += 1 + 2 + 1  # blank, table header and its rule, the "+N more" line
    room = None if height is None else max(1, height - used - 1)
    parts.append(_series_table(series, now, room=room, stale=error is not None))
    return Group(*parts)


def _exchanges_table(exchanges: list[dict[str, Any]], *, stale: bool) -> Table:
    t = _table(stale)
    t.add_column("EXCHANGE", no_wrap=True)
    t.add_column("BREAKER", no_wrap=True)
    t.add_column("STATUS", no_wrap=True)
    t.add_column("NEXT PROBE", justify="right", no_wrap=True)
    t.add_column("OPENINGS", justify="right", no_wrap=True)
    t.add_column("STREAM", no_wrap=True)
    if not exchanges:
        t.add_row(Text("no exchanges reported yet", style="dim"), "", "", "", "", "")
    for e in sorted(exchanges, key=lambda e: str(e.get("name"))):
        breaker, st = str(e.get("breaker") or "?"), str(e.get("status") or "?")
        probe = e.get("next_probe_in")
        t.add_row(
            str(e.get("name")),
            Text(breaker, style=BREAKER_STYLE.get(breaker, "")),
            Text(st, style=EXCHANGE_STYLE.get(st, "")),
            _duration(probe) if isinstance(probe, (int, float)) else "-",
            str(e.get("openings", 0)),
            _stream_cell(e.get("stream")),
        )
    return t


def _stream_cell(stream: Any) -> Text:
    """An exchange's live stream: state, series it serves of those it should, reconnects."""
    if not isinstance(stream, dict) or stream.get("state") in (None, "off"):
        return Text("-", style="dim")
    state = str(stream.get("state"))
    cell = Text(state, style=STREAM_STYLE.get(state, ""))
    cell.append(f" {stream.get('streams_up', 0)}/{stream.get('streams', 0)}")
    if stream.get("reconnects"):
        cell.append(f" ↻{stream['reconnects']}", style="yellow")
    return cell


def _series_table(series: list[dict[str, Any]], now: float, *, room: int | None, stale: bool) -> RenderableType:
    t = _table(stale)
    # Fixed widths for the data; only the name and the note give way on a narrow terminal (their
    # columns may shrink, their cells are one line cut with an ellipsis): one row, one line.
    t.add_column("SERIES", min_width=20, max_width=36)
    t.add_column("STATUS", no_wrap=True, width=11)
    t.add_column("SOURCE", no_wrap=True, width=6)
    t.add_column("LAG", justify="right", no_wrap=True, width=6)
    t.add_column("LAST CANDLE", no_wrap=True, width=11)  # UTC, MM-DD HH:MM
    t.add_column("RESTARTS", justify="right", no_wrap=True, width=8)
    t.add_column("FAILURES", justify="right", no_wrap=True, width=8)
    t.add_column("NOTE")
    rows = sorted(series, key=lambda s: _severity(s, now))
    shown = rows if room is None or len(rows) <= room else rows[: max(0, room - 1)]
    if not rows:
        t.add_row(Text("no series", style="dim"), "", "", "", "", "", "", "")
    for s in shown:
        st = str(s.get("status") or "?")
        lag, tf_s = lag_seconds(s, now), _tf_seconds(s.get("timeframe"))
        note = _line()
        if s.get("exchange_down"):
            note.append("exchange down, read-only", style="red")
        if s.get("detail"):
            note.append(("; " if note else "") + " ".join(str(s["detail"]).split()))
        restarts, failures = s.get("restarts") or 0, s.get("failures") or 0
        t.add_row(
            _line(f"{s.get('exchange')}:{s.get('symbol')}@{s.get('timeframe')}"),
            Text(st, style=SERIES_STYLE.get(st, "")),
            Text(str(s.get("source") or "-"), style=SOURCE_STYLE.get(str(s.get("source")), "dim")),
            Text(_duration(lag), style=_lag_colour(lag, tf_s)) if lag is not None else Text("-", style="dim"),
            _candle_time(s.get("last_ts")),
            Text(str(restarts), style="yellow" if restarts else ""),
            Text(str(failures), style="yellow" if failures else ""),
            note,
        )
    if len(shown) == len(rows):
        return t
    hidden = rows[len(shown):]
    more = Text(no_wrap=True, overflow="ellipsis")
    more.append(f"+{len(hidden)} more", style="bold")
    more.append(f"  {_series_summary(hidden)}; enlarge the terminal to see them", style="dim")
    return Group(t, more)


def _table(stale: bool) -> Table:
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                 style="dim" if stale else "")


def _line(text: str = "", style: str = "") -> Text:
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _actors_line(tree: dict[str, Any] | None) -> Text | None:
    """The tree without the series (those have their own table): each actor's state and restarts."""
    if not isinstance(tree, dict) or not tree.get("children"):
        return None
    line = Text(overflow="fold")
    line.append("actors: ", style="bold")
    first = True
    for node, depth in _walk(tree.get("children") or [], ""):
        if not first:
            line.append(" · ", style="dim")
        first = False
        state = str(node.get("state") or "?")
        line.append(f"{depth}{node.get('id')} ")
        line.append(state, style=ACTOR_STYLE.get(state, "bold red"))
        restarts = node.get("restarts") or 0
        if restarts:
            line.append(f" ↻{restarts}", style="yellow")
    return line


def _walk(children: list[Any], prefix: str) -> Iterator[tuple[dict[str, Any], str]]:
    for c in children:
        if not isinstance(c, dict) or c.get("kind") == "series" or c.get("id") == "series":
            continue  # series: in the table below
        yield c, prefix
        yield from _walk(c.get("children") or [], f"{prefix}{c.get('id')}/")


def lag_seconds(series: dict[str, Any], now: float) -> float | None:
    """The health report's own `lag_seconds` when it has one (it knows when a closed market
    reopened: a forex weekend is no lag); else seconds since the newest stored candle closed (its
    open time plus the timeframe); None when nothing is stored yet or the timeframe is unknown."""
    reported = series.get("lag_seconds")
    if isinstance(reported, (int, float)) and not isinstance(reported, bool):
        return float(reported)
    last = series.get("last_ts")
    tf = _tf_seconds(series.get("timeframe"))
    if not isinstance(last, (int, float)) or isinstance(last, bool) or tf is None:
        return None
    return max(0.0, now - last / 1000 - tf)


def _tf_seconds(timeframe: Any) -> float | None:
    try:
        return timeframe_ms(timeframe) / 1000
    except ValueError:
        return None


def _severity(s: dict[str, Any], now: float) -> tuple[int, float, str]:
    rank = SEVERITY.get(str(s.get("status")), 4)
    if s.get("exchange_down"):
        rank = min(rank, 3)
    lag = lag_seconds(s, now)
    name = f"{s.get('exchange')}:{s.get('symbol')}@{s.get('timeframe')}"
    return rank, -(lag if lag is not None else float("inf")), name


def _lag_colour(lag: float, tf: float | None) -> str:
    if tf is None:
        return ""
    if lag <= tf + 30:  # caught up: the next candle has not closed yet, or is being fetched
        return ""
    return "yellow" if lag <= 3 * tf + 60 else "bold red"


def _series_summary(series: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for s in series:
        st = str(s.get("status") or "?")
        counts[st] = counts.get(st, 0) + 1
    detail = ", ".join(f"{n} {st}" for st, n in sorted(counts.items(), key=lambda kv: SEVERITY.get(kv[0], 4)))
    return f"{len(series)} series" + (f" ({detail})" if detail else "")


def _rollup_colour(status: str) -> str:
    return {"ok": "green", "degraded": "yellow", "down": "red"}.get(status, "")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clock(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


def _candle_time(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%m-%d %H:%M")


# -- keys ---------------------------------------------------------------------------------------


class _Keys(AbstractContextManager["_Keys"]):
    """No keyboard (stdin is not a terminal): wait out the interval; Ctrl-C still quits."""

    def get(self, timeout: float) -> str | None:
        time.sleep(timeout)  # sleep-ok: the ctl client's refresh interval, not an actor
        return None

    def __exit__(self, *_: Any) -> None:
        return None


class _TerminalKeys(_Keys):
    """Single keys from the terminal on `fd`, in cbreak mode (no echo, no line buffering, signals
    kept: Ctrl-C still raises KeyboardInterrupt), its previous mode restored on exit."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None
        self._eof = False

    def __enter__(self) -> _TerminalKeys:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *_: Any) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def get(self, timeout: float) -> str | None:
        if self._eof:
            return super().get(timeout)
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self.fd, 64)  # a whole escape sequence (arrow keys...) at once
        if not data:
            self._eof = True  # the terminal hung up: keep refreshing, Ctrl-C or a signal ends it
            return None
        return data[:1].decode("latin-1")


class _InjectedKeys(_Keys):
    """Keys given by the caller (tests): one taken after each refresh, None meaning no key (the
    interval is waited out); when they run out the view quits."""

    def __init__(self, keys: Iterable[str | None]) -> None:
        self._it = iter(keys)

    def get(self, timeout: float) -> str | None:
        try:
            key = next(self._it)
        except StopIteration:
            return "q"
        if not key:
            time.sleep(timeout)  # sleep-ok: scripted keys of a test, the refresh interval
        return key


def _key_source(keys: Iterable[str | None] | None) -> _Keys:
    if keys is not None:
        return _InjectedKeys(keys)
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            return _TerminalKeys(sys.stdin.fileno())
    except (OSError, ValueError):  # stdin closed or not a real file
        pass
    return _Keys()


# -- the loop -----------------------------------------------------------------------------------


def run_top(
    fetch: Callable[[str], Any],
    *,
    interval: float = 1.0,
    console: Console | None = None,
    keys: Iterable[str | None] | None = None,
) -> int:
    """Show the live view until `q`/`Q` or Ctrl-C; returns 0.

    `fetch(cmd)` returns the result of the control command `cmd` ("health", "tree"), or raises
    ConnectionError/OSError. A failure of the very first fetch is raised to the caller (nothing
    to show: the daemon is not running); later failures show "daemon not reachable" over the
    last data and are retried every `interval`. `keys` replaces the terminal's keys (tests).
    """
    console = console or Console()
    try:
        health, tree = fetch("health"), _tree(fetch)
        updated, error = time.time(), None
        with _key_source(keys) as source, Live(console=console, auto_refresh=False, screen=console.is_terminal,
                                               redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                live.update(render(health, time.time(), tree=tree, error=error, updated=updated,
                                   height=console.size.height, width=console.size.width), refresh=True)
                if source.get(interval) in ("q", "Q"):
                    return 0
                try:
                    health, tree = fetch("health"), _tree(fetch)
                    updated, error = time.time(), None
                except OSError as exc:  # ConnectionError, refused, timeout, socket gone
                    error = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        return 0


def print_frame(fetch: Callable[[str], Any], *, console: Console | None = None) -> None:
    """One frame, no live view, no colours: for a pipe or a file. `fetch` as for `run_top`."""
    console = console or Console(width=140, no_color=True, highlight=False)
    console.print(render(fetch("health"), time.time(), tree=_tree(fetch), width=console.size.width))


def _tree(fetch: Callable[[str], Any]) -> dict[str, Any] | None:
    result = fetch("tree")
    return result if isinstance(result, dict) else None
