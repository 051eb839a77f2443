"""The health actor: the latest state of the whole tree, and its roll-up.

Every exchange and series actor tells it status changes; supervisors' lifecycle events tell it
about restarts and stops. It never asks anyone, so answering `health` costs one mailbox turn
whatever the rest of the system is doing.

Signals are not enough: a series can say `ok` while its exchange bans it, or while nothing it
fetches can be stored. So health also judges each series by its outcome, the newest candle in
the store, on the runtime's wall clock (a stalled series sends no reports). A series is judged
when it reports, and again at the instant its verdict would change if it said nothing more
(a heap of those instants, looked at every second): at 10,000 series, judging every row every
second cost a tenth of a core. A report does the same (the rows whose instant has come) and
reads every row's lag at its own instant.

- lag = now - close time of the newest stored candle (`last_ts` + timeframe), or now - the time
  its market reopened when that is later (a forex series says when: nothing closes while the
  market is closed, so a weekend is no lag);
- a series that says `ok` or `retrying` is `lagging` when lag > timeframe + poll_interval +
  margin, where margin = 5 s + the exchange's poll spread (its series / rate_limit, at most
  poll_interval: when each series' poll comes) + one request timeout. A caught-up series
  stores each candle within min(1 s, poll_interval) + its poll offset + a request of its close,
  or one poll_interval later when the exchange publishes late, so this never fires on a
  healthy series;
- a series that is `backfilling` (or retrying during a backfill) is `lagging` when its newest
  stored candle has not changed for 5 pages' time, a page being what the exchange needs to
  serve one request of each of its series at its rate limit, plus one request timeout;
- `paused` and `invalid` series are never lagging (nothing is expected of them); `quarantined`
  and `stopped` keep their own status, which says more; every series shows its `lag_seconds`.

Roll-up: `down` when storage is failing or no exchange is reachable (every breaker open);
`degraded` when any breaker is not closed, any exchange is `invalid` (its credentials refused)
or any series is retrying, lagging, quarantined, invalid or stopped; `ok` otherwise. Paused
series are an operator's choice and do not degrade it.

Clustering: each series row says which node owns it (`owner`: the series here are this node's),
and `cluster` says what the cluster actor last reported (this node, its state, the live nodes,
how many series it owns of how many, refused writes). A node standing down because another
daemon holds its name is `down`; one that cannot reach the database is at least `degraded`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..supervisors.child import Child
from ..supervisors.clock import wall_ms
from ..supervisors.events import LifecycleEvent
from .market.candles import timeframe_ms
from .messages import ClusterStatus, ExchangeStatus, ForgetSeries, SeriesStatus, StorageStatus, StreamStatus
from .progress import BackfillLog

DEGRADING = {"retrying", "lagging", "quarantined", "invalid", "stopped"}
LAG_MARGIN_S = 5.0  # the fixed part of the margin (see the module docstring)
STALL_PAGES = 5  # a backfill storing nothing new for this many pages' time is lagging
TICK_S = 1.0  # how often the series due for judging are judged without any report arriving
_PAST = 1e-3  # a verdict is looked at this long after its bound, so a bound reached is a bound passed
MAX_LOGGED = 10  # lagging transitions logged one line each per judgement; more are one line

# statuses judged by lag, and those judged by progress; the rest are left as reported
_BY_LAG = {"ok", "retrying", "starting"}
_NO_PROGRESS_EXPECTED = {"paused", "invalid"}


@dataclass(frozen=True)
class Pace:
    """How soon an exchange's series are expected to store each candle (see the module docstring)."""

    poll_interval: float = 10.0
    margin: float = LAG_MARGIN_S + 10.0  # on top of timeframe + poll_interval
    page_s: float = 10.0  # expected time between two pages of one series' backfill

    @classmethod
    def of(cls, *, poll_interval: float, rate_limit: float, series: int, timeout: float) -> Pace:
        """`series`: how many the exchange serves; `rate_limit` its requests per second."""
        serve_all = max(1, series) / rate_limit  # one request for each of its series
        return cls(
            poll_interval=poll_interval,
            margin=LAG_MARGIN_S + min(poll_interval, serve_all) + timeout,
            page_s=serve_all + timeout,
        )

    def lag_bound(self, timeframe_s: float) -> float:
        """The most a series that is not backfilling may lag before it is `lagging`."""
        return timeframe_s + self.poll_interval + self.margin

    @property
    def stall_bound(self) -> float:
        """The longest a backfilling series may store nothing newer before it is `lagging`."""
        return STALL_PAGES * self.page_s


@dataclass(frozen=True)
class HealthSettings:
    """Each exchange's `Pace` (built from the config by `candlekeeper.app.settings`)."""

    pace: Mapping[str, Pace] = field(default_factory=dict)
    tick: float = TICK_S
    node: str | None = None  # clustering: this daemon's node name, the owner of its series

    def pace_of(self, exchange: str) -> Pace:
        return self.pace.get(exchange) or Pace()
PROGRESS_S = 10.0  # how often a backfilling exchange's progress is logged
INTERNAL = "start_ms"  # kept for progress, not part of the health report


class Track:
    """What health keeps of a series beside its public row, never shown: kept apart so the
    report copies a row instead of filtering its keys (at 10,000 series the filter was half of
    a report's cost)."""

    __slots__ = ("due_from", "flip_at", "phase", "progress_at", "reopens", "reported", "stalled_s", "tf_s")

    def __init__(self, tf_s: float, progress_at: float, reported: str) -> None:
        self.tf_s = tf_s  # the timeframe in seconds
        self.progress_at = progress_at  # wall time its newest candle last changed, or it was resumed
        self.reported = reported  # the series' own status (the row's may be `lagging`)
        self.phase: str | None = None  # the last of `ok` or `backfilling` it reported
        self.reopens: int | None = None  # when its market reopens (ms), if it is closed
        self.flip_at: float | None = None  # when it becomes `lagging` if nothing changes (None: not by time)
        self.stalled_s = 0.0  # seconds since its progress, at the last judgement
        self.due_from: float | None = None  # since when a newer candle is due (lag is now minus this)


class _ProgressTick:
    pass


_PROGRESS_TICK = _ProgressTick()


@dataclass
class HealthState:
    """What the health actor knows, owned by the system rather than by one incarnation of the
    actor: a crash of the health actor loses neither restart counts nor the last reported
    states (only a report told in the instant between two incarnations).

    A series row holds the public fields of the health JSON (and `start_ms`, for progress);
    its `Track`, by the same path, what health judges it by."""

    exchanges: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    tracks: dict[str, Track] = field(default_factory=dict)  # by series path, beside `series`
    restarts: dict[str, int] = field(default_factory=dict)  # by actor path
    restarts_by_kind: dict[str, int] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=lambda: {"ok": True, "detail": None})
    cluster: dict[str, Any] = field(default_factory=dict)  # the last ClusterStatus, when clustering


class _Tick:
    pass


_TICK = _Tick()


class HealthActor(Child):
    """Also logs backfill progress (`candlekeeper.actors.progress.BackfillLog`): one line per
    backfilling exchange every `progress_every` seconds, and one when its backfill completes."""

    def __init__(
        self, exchanges: list[str], state: HealthState | None = None, settings: HealthSettings | None = None, *,
        progress_every: float = PROGRESS_S,
    ) -> None:
        super().__init__()
        self.progress_every = progress_every
        self.backfills = BackfillLog(self._log_info, self._rows)
        state = state if state is not None else HealthState()
        for name in exchanges:
            state.exchanges.setdefault(name, {"name": name, "breaker": "closed", "status": "starting",
                                              "clock_offset_ms": None})
        self.settings = settings or HealthSettings()
        self.exchanges = state.exchanges
        self.series = state.series
        self.tracks = state.tracks
        self.restarts = state.restarts
        self.restarts_by_kind = state.restarts_by_kind
        self.storage = state.storage
        self.cluster = state.cluster
        # (when, path): rows whose verdict may change then; stale entries (the track's `flip_at`
        # moved since) are skipped when they come up
        self._due: list[tuple[float, str]] = []

    def on_start(self) -> None:
        for track in self.tracks.values():  # kept from an earlier incarnation: their instants anew
            track.flip_at = None
        self._judge_all(self.runtime.wall())
        self.schedule(self.settings.tick, _TICK)
        self.schedule(self.progress_every, _PROGRESS_TICK)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, SeriesStatus):
            self._on_series(message)
            self._backfill_status(message.key.exchange, message.path, message.status)
        elif message is _TICK:
            self.schedule(self.settings.tick, _TICK)
            self._judge_due(self.runtime.wall())
        elif isinstance(message, ExchangeStatus):
            row = self.exchanges.setdefault(message.name, {"name": message.name})
            row.update(breaker=message.breaker, status=message.status)
            if message.detail.get("reason"):
                row["detail"] = message.detail["reason"]  # why it is `invalid` (credentials refused)
            else:
                row.pop("detail", None)
            row["next_probe_in"] = message.detail.get("next_probe_in")
            row["openings"] = message.detail.get("openings", 0)  # how many times it has opened
            # the exchange's clock minus ours, as measured from its answers (None: not yet)
            offset = message.detail.get("clock_offset_ms")
            row["clock_offset_ms"] = None if offset is None else round(offset)
        elif isinstance(message, StreamStatus):
            row = self.exchanges.setdefault(message.name, {"name": message.name})
            row["stream"] = {"state": message.state, **message.detail}
        elif isinstance(message, StorageStatus):
            self.storage.update(ok=message.ok, detail=message.detail)
        elif isinstance(message, ClusterStatus):
            self.cluster.update(
                node=message.node, state=message.state, detail=message.detail, live_nodes=list(message.live_nodes),
                owned=message.owned, wanted=message.wanted, refused_writes=message.refused_writes,
                lease_s=message.lease_s,
            )
        elif isinstance(message, LifecycleEvent):
            self._on_event(message)
        elif isinstance(message, ForgetSeries):
            gone = self.series.pop(message.path, {})
            self.tracks.pop(message.path, None)
            if gone:
                self._backfill_status(gone["exchange"], message.path, None)
        elif message is _PROGRESS_TICK or isinstance(message, _ProgressTick):
            self.schedule(self.progress_every, _PROGRESS_TICK)
            self.backfills.tick(wall_ms(self.runtime.wall), self.runtime.clock())
        else:
            return super().on_receive(message)
        return None

    def _on_series(self, message: SeriesStatus) -> None:
        k = message.key
        now = self.runtime.wall()
        row = self.series.get(message.path)
        track = self.tracks.get(message.path)
        if row is None or track is None:
            row = self.series[message.path] = {
                "exchange": k.exchange, "symbol": k.symbol, "timeframe": k.timeframe, "status": message.status,
            }
            if self.settings.node is not None:
                row["owner"] = self.settings.node
            track = self.tracks[message.path] = Track(timeframe_ms(k.timeframe) / 1000, now, message.status)
        elif message.last_ts != row["last_ts"] or track.reported in _NO_PROGRESS_EXPECTED:
            track.progress_at = now  # a newer candle stored, or resumed after a pause
        row.update(
            last_ts=message.last_ts,
            restarts=self.restarts.get(message.path, 0),
            failures=message.failures,
            detail=message.detail,
            start_ms=message.start_ms,
        )
        track.reported = message.status
        track.reopens = message.reopens_ms
        if message.source is not None:
            row["source"] = message.source
        if message.status in ("ok", "backfilling"):
            track.phase = message.status
        self._judge(message.path, row, now)

    def _on_event(self, ev: LifecycleEvent) -> None:
        if ev.kind == "restarted":
            self.restarts[ev.path] = ev.restarts
            self.restarts_by_kind[ev.kind_of_actor] = self.restarts_by_kind.get(ev.kind_of_actor, 0) + 1
            if ev.path in self.series:
                self.series[ev.path]["restarts"] = ev.restarts
        elif ev.kind == "stopped" and ev.path in self.series:
            exchange = self.series[ev.path]["exchange"]
            if ev.reason == "deleted":
                del self.series[ev.path]
                self.tracks.pop(ev.path, None)
                self._backfill_status(exchange, ev.path, None)
            else:
                self._stopped(ev.path)
                self._backfill_status(exchange, ev.path, "stopped")
        elif ev.kind == "crashed" and ev.path in self.series:
            self._stopped(ev.path)
            self.series[ev.path]["detail"] = ev.reason
            self._backfill_status(self.series[ev.path]["exchange"], ev.path, "stopped")

    def _stopped(self, path: str) -> None:
        self.series[path]["status"] = "stopped"
        track = self.tracks.get(path)
        if track is not None:
            track.reported = "stopped"

    def _log_info(self, event: str, **fields: Any) -> None:
        self.log.info(event, **fields)

    def _backfill_status(self, exchange: str, path: str, status: str | None) -> None:
        self.backfills.status(exchange, path, status, wall_ms(self.runtime.wall), self.runtime.clock())

    def _rows(self, exchange: str | None = None) -> list[Mapping[str, Any]]:
        return [r for r in self.series.values() if exchange is None or r["exchange"] == exchange]

    def progress(self) -> dict[str, Any]:
        """Every series' row with where its backfill starts (`start_ms`): what backfill progress
        is computed from (`candlekeeper.actors.progress`)."""
        return {"series": [dict(r) for _, r in sorted(self.series.items())]}

    # -- judging by outcome ----------------------------------------------------------------

    def _judge_all(self, now: float) -> None:
        self._judge_rows(self.series.items(), now)

    def _judge_due(self, now: float) -> None:
        """Judge the rows whose instant has come (see the module docstring)."""
        due: list[tuple[str, dict[str, Any]]] = []
        heap = self._due
        while heap and heap[0][0] <= now:
            at, path = heapq.heappop(heap)
            row, track = self.series.get(path), self.tracks.get(path)
            if row is not None and track is not None and track.flip_at == at:
                due.append((path, row))
        if due:
            self._judge_rows(due, now)

    def _judge_rows(self, rows: Iterable[tuple[str, dict[str, Any]]], now: float) -> None:
        changed: list[tuple[str, dict[str, Any], str]] = []
        for path, row in rows:
            before = row["status"]
            self._judge(path, row, now, log=False)
            if (row["status"] == "lagging") != (before == "lagging"):
                changed.append((path, row, before))
        if len(changed) <= MAX_LOGGED:
            for path, row, before in changed:
                self._log_change(path, row, before)
            return
        lagging = [path for path, row, _ in changed if row["status"] == "lagging"]
        recovered = [path for path, row, _ in changed if row["status"] != "lagging"]
        if lagging:  # storage failing or an exchange ban can make thousands lag at once: one line
            self.log.warning("series_lagging", count=len(lagging), series=lagging[:MAX_LOGGED])
        if recovered:
            self.log.info("series_lag_recovered", count=len(recovered), series=recovered[:MAX_LOGGED])

    def _judge(self, path: str, row: dict[str, Any], now: float, *, log: bool = True) -> None:
        """Set the row's `lag_seconds` and its status: the reported one, or `lagging`."""
        track = self.tracks[path]
        last = row.get("last_ts")
        reopens = track.reopens
        due_from = None if last is None else max(last / 1000 + track.tf_s, (reopens or 0) / 1000)
        lag = None if due_from is None else max(0.0, now - due_from)
        row["lag_seconds"] = _shown(lag)
        track.due_from = due_from
        reported = track.reported
        pace = self.settings.pace_of(row["exchange"])
        stalled_s = now - track.progress_at
        flip_at: float | None = None  # when it would become lagging, if nothing changes
        if reported == "backfilling" or (reported == "retrying" and track.phase == "backfilling"):
            lagging = stalled_s > pace.stall_bound
            flip_at = track.progress_at + pace.stall_bound
        elif reported in _BY_LAG:
            lagging = lag is not None and lag > pace.lag_bound(track.tf_s)
            flip_at = None if due_from is None else due_from + pace.lag_bound(track.tf_s)
        else:
            lagging = False
        flip_at = None if lagging or flip_at is None else flip_at + _PAST
        if flip_at != track.flip_at:
            track.flip_at = flip_at
            if flip_at is not None:
                heapq.heappush(self._due, (flip_at, path))
        before = row["status"]
        row["status"] = "lagging" if lagging else reported
        track.stalled_s = stalled_s
        if log and (row["status"] == "lagging") != (before == "lagging"):
            self._log_change(path, row, before)

    def _log_change(self, path: str, row: dict[str, Any], before: str) -> None:
        if row["status"] == "lagging":
            track = self.tracks[path]
            self.log.warning("series_lagging", series=path, lag_seconds=row["lag_seconds"],
                             no_progress_for=round(track.stalled_s, 1), reported=track.reported)
        else:
            self.log.info("series_lag_recovered", series=path, lag_seconds=row["lag_seconds"], status=row["status"])

    # -- the report ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The health report: the public JSON contract of `ctl health --json`.

        Graceful degradation: while an exchange's breaker is open its series carry
        `"exchange_down": true` (their stored candles are still served by `latest`, read-only),
        and `reasons` says in words why the roll-up is not ok. While storage is failing, every
        series' `detail` says so (whatever it is doing, nothing it fetches can be stored).
        """
        # Verdicts: only the rows whose instant has come can have changed by time alone (the rest
        # were judged when they reported); lags and stalls are read at `now` for every row
        now = self.runtime.wall()
        self._judge_due(now)
        exchanges = [dict(e) for e in self.exchanges.values()]
        down = {e["name"] for e in exchanges if e.get("breaker") == "open"}
        storage_error = None if self.storage["ok"] else f"storage failing: {self.storage.get('detail')}"
        series = []
        stalled: dict[str, float] = {}
        tracks = self.tracks
        for path, row in sorted(self.series.items()):
            s = row.copy()
            s.pop(INTERNAL, None)
            track = tracks.get(path)
            due_from = None if track is None else track.due_from
            s["lag_seconds"] = None if due_from is None else _shown(max(0.0, now - due_from))
            if storage_error is not None:
                own = s.get("detail")
                s["detail"] = storage_error if not own or own.startswith("store:") else f"{storage_error}; {own}"
            if s.get("detail") is None:
                s.pop("detail", None)
            s["exchange_down"] = s["exchange"] in down
            series.append(s)
            stalled[_name(s)] = 0.0 if track is None else now - track.progress_at
        reasons = self._reasons(exchanges, series, stalled)
        report = {
            "status": self._rollup(exchanges, series),
            "exchanges": exchanges,
            "series": series,
            "storage": dict(self.storage),
            "restarts_by_kind": dict(self.restarts_by_kind),
            "reasons": reasons,
        }
        if self.cluster:
            report["cluster"] = dict(self.cluster)
        return report

    def _reasons(
        self, exchanges: list[dict[str, Any]], series: list[dict[str, Any]], stalled: dict[str, float]
    ) -> list[str]:
        out = []
        if not self.storage["ok"]:
            out.append(f"storage failing: {self.storage.get('detail')}")
        if self.cluster.get("state") in ("superseded", "unreachable"):
            c = self.cluster
            out.append(f"cluster: node {c.get('node')} {c['state']}: {c.get('detail')}")
        for e in exchanges:
            if e.get("breaker") == "open":
                out.append(f"{e['name']}: exchange down (breaker open); its series are served read-only from the store")
            elif e.get("breaker") == "half_open":
                out.append(f"{e['name']}: probing for recovery (breaker half-open)")
            if e.get("status") == "invalid":
                out.append(f"{e['name']}: invalid: {e.get('detail') or 'refused by the exchange'}")
            stream = e.get("stream") or {}
            if stream.get("state") in ("down", "partial"):
                up, total = stream.get("connections_up", 0), stream.get("connections", 0)
                error = f": {stream['last_error']}" if stream.get("last_error") else ""
                out.append(f"{e['name']}: live stream {stream['state']} ({up} of {total} connections up{error});"
                           " its series poll over REST meanwhile")
        by_status: dict[str, list[str]] = {}
        for s in series:
            if s["status"] in DEGRADING and not s["exchange_down"]:
                name = _name(s)
                if s["status"] == "lagging":
                    lag = s.get("lag_seconds")
                    name += " (nothing stored yet" if lag is None else f" ({_seconds(lag)} behind"
                    if stalled.get(_name(s), 0.0) >= 1.0:
                        name += f", nothing newer for {_seconds(stalled[_name(s)])}"
                    name += ")"
                by_status.setdefault(s["status"], []).append(name)
        for status, names in sorted(by_status.items()):
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            out.append(f"{len(names)} series {status}: {shown}")
        return out

    def _rollup(self, exchanges: list[dict[str, Any]], series: list[dict[str, Any]]) -> str:
        if not self.storage["ok"] or self.cluster.get("state") == "superseded":
            return "down"
        if self.cluster.get("state") == "unreachable":
            return "degraded"
        if exchanges and all(e.get("breaker") == "open" for e in exchanges):
            return "down"
        if any(e.get("breaker") != "closed" or e.get("status") == "invalid" for e in exchanges):
            return "degraded"
        if any((e.get("stream") or {}).get("state") == "down" for e in exchanges):
            return "degraded"
        if any(s["status"] in DEGRADING for s in series):
            return "degraded"
        return "ok"


def _shown(lag: float | None) -> float | None:
    """A lag as the report shows it: to a tenth of a second."""
    return None if lag is None else round(lag, 1)


def _name(s: dict[str, Any]) -> str:
    return f"{s['exchange']}:{s['symbol']}@{s['timeframe']}"


def _seconds(s: float) -> str:
    return f"{s:.0f} s"
