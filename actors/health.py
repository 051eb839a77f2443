"""The health actor: the latest state of the whole tree, and its roll-up.

Every exchange and series actor tells it status changes; supervisors' lifecycle events tell it
about restarts and stops. It never asks anyone, so answering `health` costs one mailbox turn
whatever the rest of the system is doing.

Roll-up: `down` when storage is failing or no exchange is reachable (every breaker open);
`degraded` when any breaker is not closed or any series is retrying, quarantined, invalid or
stopped; `ok` otherwise. Paused series are an operator's choice and do not degrade it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..supervisors.child import Child
from ..supervisors.clock import wall_ms
from ..supervisors.events import LifecycleEvent
from .messages import ExchangeStatus, ForgetSeries, SeriesStatus, StorageStatus
from .progress import BackfillLog

DEGRADING = {"retrying", "quarantined", "invalid", "stopped"}
PROGRESS_S = 10.0  # how often a backfilling exchange's progress is logged
INTERNAL = ("start_ms",)  # kept for progress, not part of the health report


class _ProgressTick:
    pass


_PROGRESS_TICK = _ProgressTick()


@dataclass
class HealthState:
    """What the health actor knows, owned by the system rather than by one incarnation of the
    actor: a crash of the health actor loses neither restart counts nor the last reported
    states (only a report told in the instant between two incarnations)."""

    exchanges: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)  # by actor path
    restarts_by_kind: dict[str, int] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=lambda: {"ok": True, "detail": None})


class HealthActor(Child):
    """Also logs backfill progress (`candlekeeper.actors.progress.BackfillLog`): one line per
    backfilling exchange every `progress_every` seconds, and one when its backfill completes."""

    def __init__(self, exchanges: list[str], state: HealthState | None = None, *,
                 progress_every: float = PROGRESS_S) -> None:
        super().__init__()
        self.progress_every = progress_every
        self.backfills = BackfillLog(self._log_info, self._rows)
        state = state if state is not None else HealthState()
        for name in exchanges:
            state.exchanges.setdefault(name, {"name": name, "breaker": "closed", "status": "starting"})
        self.exchanges = state.exchanges
        self.series = state.series
        self.restarts = state.restarts
        self.restarts_by_kind = state.restarts_by_kind
        self.storage = state.storage

    def on_start(self) -> None:
        self.schedule(self.progress_every, _PROGRESS_TICK)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, SeriesStatus):
            k = message.key
            self.series[message.path] = {
                "exchange": k.exchange,
                "symbol": k.symbol,
                "timeframe": k.timeframe,
                "status": message.status,
                "last_ts": message.last_ts,
                "restarts": self.restarts.get(message.path, 0),
                "failures": message.failures,
                "detail": message.detail,
                "start_ms": message.start_ms,
            }
            self._backfill_status(k.exchange, message.path, message.status)
        elif isinstance(message, ExchangeStatus):
            row = self.exchanges.setdefault(message.name, {"name": message.name})
            row.update(breaker=message.breaker, status=message.status)
            row["next_probe_in"] = message.detail.get("next_probe_in")
            row["openings"] = message.detail.get("openings", 0)  # how many times it has opened
        elif isinstance(message, StorageStatus):
            self.storage.update(ok=message.ok, detail=message.detail)
        elif isinstance(message, LifecycleEvent):
            self._on_event(message)
        elif isinstance(message, ForgetSeries):
            gone = self.series.pop(message.path, {})
            if gone:
                self._backfill_status(gone["exchange"], message.path, None)
        elif message is _PROGRESS_TICK or isinstance(message, _ProgressTick):
            self.schedule(self.progress_every, _PROGRESS_TICK)
            self.backfills.tick(wall_ms(self.runtime.wall), self.runtime.clock())
        else:
            return super().on_receive(message)
        return None

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
                self._backfill_status(exchange, ev.path, None)
            else:
                self.series[ev.path]["status"] = "stopped"
                self._backfill_status(exchange, ev.path, "stopped")
        elif ev.kind == "crashed" and ev.path in self.series:
            self.series[ev.path]["status"] = "stopped"
            self.series[ev.path]["detail"] = ev.reason
            self._backfill_status(self.series[ev.path]["exchange"], ev.path, "stopped")

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

    def health(self) -> dict[str, Any]:
        """The health report: the public JSON contract of `ctl health --json`.

        Graceful degradation: while an exchange's breaker is open its series carry
        `"exchange_down": true` (their stored candles are still served by `latest`, read-only),
        and `reasons` says in words why the roll-up is not ok.
        """
        exchanges = [dict(e) for e in self.exchanges.values()]
        down = {e["name"] for e in exchanges if e.get("breaker") == "open"}
        series = []
        for _, row in sorted(self.series.items()):
            s = {k: v for k, v in row.items() if k not in INTERNAL}
            if s.get("detail") is None:
                s.pop("detail", None)
            s["exchange_down"] = s["exchange"] in down
            series.append(s)
        reasons = self._reasons(exchanges, series)
        return {
            "status": self._rollup(exchanges, series),
            "exchanges": exchanges,
            "series": series,
            "storage": dict(self.storage),
            "restarts_by_kind": dict(self.restarts_by_kind),
            "reasons": reasons,
        }

    def _reasons(self, exchanges: list[dict[str, Any]], series: list[dict[str, Any]]) -> list[str]:
        out = []
        if not self.storage["ok"]:
            out.append(f"storage failing: {self.storage.get('detail')}")
        for e in exchanges:
            if e.get("breaker") == "open":
                out.append(f"{e['name']}: exchange down (breaker open); its series are served read-only from the store")
            elif e.get("breaker") == "half_open":
                out.append(f"{e['name']}: probing for recovery (breaker half-open)")
        by_status: dict[str, list[str]] = {}
        for s in series:
            if s["status"] in DEGRADING and not s["exchange_down"]:
                by_status.setdefault(s["status"], []).append(f"{s['exchange']}:{s['symbol']}@{s['timeframe']}")
        for status, names in sorted(by_status.items()):
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            out.append(f"{len(names)} series {status}: {shown}")
        return out

    def _rollup(self, exchanges: list[dict[str, Any]], series: list[dict[str, Any]]) -> str:
        if not self.storage["ok"]:
            return "down"
        if exchanges and all(e.get("breaker") == "open" for e in exchanges):
            return "down"
        if any(e.get("breaker") != "closed" for e in exchanges):
            return "degraded"
        if any(s["status"] in DEGRADING for s in series):
            return "degraded"
        return "ok"
