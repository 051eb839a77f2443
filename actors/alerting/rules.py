"""Alert rules: status messages in, alert transitions out (with dedup), the pure part.

Nothing here has a thread, a socket or a real clock: `candlekeeper.actors.notifier.NotifierActor` feeds it
messages, HTTP outcomes and time, and does what it answers (post, schedule, log).

What alerts, and with which `dedup_key` (stable, so PagerDuty folds repeats into one incident):

| event | action | severity | dedup_key |
|---|---|---|---|
| exchange breaker opens (`ExchangeStatus.breaker == "open"`) | trigger | error | `candlekeeper/<exchange>/breaker` |
| that breaker is closed again | resolve | | same |
| a series is `quarantined` | trigger | warning | `candlekeeper/<exchange>/<symbol>@<tf>/quarantine` |
| it reports any other status, or is removed | resolve | | same |
| storage fails (`StorageStatus.ok` false) | trigger | critical | `candlekeeper/storage` |
| storage ok again | resolve | | same |
| a supervisor gave up (`LifecycleEvent`) | trigger, never resolved | critical | `candlekeeper/<path>/gave_up` |

Dedup: an alert is sent when its key changes state (not open -> open, open -> resolved), never
because the same state is reported again. `half_open` is neither: the breaker is still not
closed, so the alert stays open, and a failed probe (half_open -> open) does not re-trigger it;
only `closed` resolves. A storage alert is not re-sent when only its detail changes. The
supervisor alerts have no resolve, so they are deduplicated by time instead: the same key
triggers at most once per `one_shot_cooldown` (10 min), which also folds a supervisor's
`gave_up` + `escalated` pair into one alert.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ...supervisors.clock import Clock, monotonic
from ...supervisors.events import LifecycleEvent
from ..messages import ExchangeStatus, SeriesStatus, StorageStatus

Action = Literal["trigger", "resolve"]
Severity = Literal["critical", "error", "warning", "info"]

SOURCE = "candlekeeper"
DEFAULT_PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
MAX_DEDUP_KEY = 255  # PagerDuty's limit
MAX_SUMMARY = 1024  # PagerDuty's limit


@dataclass(frozen=True)
class AlertTuning:
    """The knobs; the defaults are the documented behaviour, tests shrink the delays."""

    rate_per_minute: float = 20.0  # per destination
    burst: float = 10.0
    max_queue: int = 100  # per destination; the oldest is dropped beyond
    max_in_flight: int = 2  # concurrent posts per destination
    attempts: int = 6  # per delivery, the first included
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0  # a server's Retry-After is honoured up to this
    http_timeout: float = 5.0
    one_shot_cooldown: float = 600.0  # alerts without a resolve: at most one per key per this


@dataclass(frozen=True)
class Alert:
    """One alert transition: open (`trigger`) or close (`resolve`) the incident `dedup_key`."""

    action: Action
    dedup_key: str
    severity: Severity
    summary: str
    component: str  # what is affected: an exchange, a series, "storage", a supervisor path
    group: str  # what kind of thing: exchange, series, storage, supervisor
    details: Mapping[str, Any] = field(default_factory=dict)


def _key(*parts: str) -> str:
    key = "/".join((SOURCE, *parts))
    if len(key) > MAX_DEDUP_KEY:  # still stable: the tail is a hash of the whole key
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        key = key[: MAX_DEDUP_KEY - 17] + "#" + digest
    return key


def breaker_key(exchange: str) -> str:
    return _key(exchange, "breaker")


def quarantine_key(exchange: str, symbol: str, timeframe: str) -> str:
    return _key(exchange, f"{symbol}@{timeframe}", "quarantine")


def storage_key() -> str:
    return _key("storage")


def gave_up_key(path: str) -> str:
    return _key(path, "gave_up")


def jsonable(value: Any) -> Any:
    """`value` as plain, strict JSON types: NaN and infinities become None, anything unknown its str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


@dataclass
class AlertState:
    """What the notifier knows, owned by the system rather than by one incarnation of the actor
    (like `HealthState`): a restarted notifier still resolves the alerts its predecessor
    opened and does not re-send them, and its counters keep counting."""

    active: dict[str, Alert] = field(default_factory=dict)  # open alerts by dedup_key
    series_keys: dict[str, str] = field(default_factory=dict)  # series actor path -> its quarantine key
    one_shot: dict[str, float] = field(default_factory=dict)  # dedup_key -> clock time of its last trigger
    counts: dict[str, int] = field(default_factory=lambda: {"triggered": 0, "resolved": 0, "deduplicated": 0})
    destinations: dict[str, dict[str, int]] = field(default_factory=dict)  # per-destination delivery counters


class AlertTracker:
    """Status messages in, alert transitions out (with dedup). Pure: the clock is injected."""

    def __init__(
        self, state: AlertState | None = None, *, clock: Clock = monotonic, one_shot_cooldown: float = 600.0
    ) -> None:
        self.state = state if state is not None else AlertState()
        self._clock = clock
        self.one_shot_cooldown = one_shot_cooldown

    @property
    def open_keys(self) -> list[str]:
        return sorted(self.state.active)

    def observe(self, message: Any) -> list[Alert]:
        """The alert transitions `message` causes: none, or one."""
        if isinstance(message, ExchangeStatus):
            alert = self._exchange(message)
        elif isinstance(message, SeriesStatus):
            alert = self._series(message)
        elif isinstance(message, StorageStatus):
            alert = self._storage(message)
        elif isinstance(message, LifecycleEvent):
            alert = self._lifecycle(message)
        else:
            alert = None
        return [alert] if alert is not None else []

    # -- one source each -------------------------------------------------------------------

    def _exchange(self, m: ExchangeStatus) -> Alert | None:
        key = breaker_key(m.name)
        if m.breaker == "open":
            failures = m.detail.get("consecutive_failures")
            why = f" after {failures} consecutive failures" if failures else ""
            return self._open(Alert(
                "trigger", key, "error",
                f"{m.name}: circuit breaker OPEN{why}; exchange unreachable, "
                "its series are served read-only from the store",
                component=m.name, group="exchange",
                details={"exchange": m.name, "breaker": m.breaker, "status": m.status, **jsonable(dict(m.detail))},
            ))
        if m.breaker == "closed":
            return self._close(key, f"{m.name}: circuit breaker closed, exchange reachable again")
        return None  # half_open: still not closed; the open alert (if any) stays open, nothing new

    def _series(self, m: SeriesStatus) -> Alert | None:
        k = m.key
        key = quarantine_key(k.exchange, k.symbol, k.timeframe)
        self.state.series_keys[m.path] = key
        name = f"{k.exchange}:{k.symbol}@{k.timeframe}"
        if m.status == "quarantined":
            why = f": {m.detail}" if m.detail else ""
            return self._open(Alert(
                "trigger", key, "warning", f"{name} quarantined after {m.failures} failed rounds{why}",
                component=name, group="series",
                details={"exchange": k.exchange, "symbol": k.symbol, "timeframe": k.timeframe, "status": m.status,
                         "failures": m.failures, "last_ts": m.last_ts, "detail": m.detail, "actor": m.path},
            ))
        return self._close(key, f"{name} released from quarantine (now {m.status})")

    def _storage(self, m: StorageStatus) -> Alert | None:
        key = storage_key()
        if not m.ok:
            return self._open(Alert(
                "trigger", key, "critical", f"storage failing: {m.detail or 'unknown error'}",
                component="storage", group="storage", details={"ok": False, "detail": m.detail},
            ))
        return self._close(key, "storage ok again")

    def _lifecycle(self, ev: LifecycleEvent) -> Alert | None:
        if ev.kind in ("gave_up", "escalated"):
            key = gave_up_key(ev.path)
            now = self._clock()
            last = self.state.one_shot.get(key)
            if last is not None and now - last < self.one_shot_cooldown:
                self.state.counts["deduplicated"] += 1
                return None
            self.state.one_shot[key] = now
            self.state.counts["triggered"] += 1
            return Alert(
                "trigger", key, "critical",
                f"supervisor {ev.path} gave up (restart intensity exceeded): {ev.reason or 'no reason given'}",
                component=ev.path, group="supervisor",
                details={"event": ev.kind, "path": ev.path, "supervisor": ev.supervisor, "reason": ev.reason},
            )
        if ev.kind == "stopped" and ev.reason == "deleted":  # a series removed at run time
            removed = self.state.series_keys.pop(ev.path, None)
            if removed is not None:
                return self._close(removed, f"{ev.path.removeprefix('root/')} removed, quarantine alert closed")
        return None

    # -- transitions -----------------------------------------------------------------------

    def _open(self, alert: Alert) -> Alert | None:
        if alert.dedup_key in self.state.active:
            self.state.counts["deduplicated"] += 1
            return None  # already open: the same state reported again (or a failed probe)
        self.state.active[alert.dedup_key] = alert
        self.state.counts["triggered"] += 1
        return alert

    def _close(self, key: str, summary: str) -> Alert | None:
        opened = self.state.active.pop(key, None)
        if opened is None:
            return None  # nothing open: no resolve for an incident never triggered
        self.state.counts["resolved"] += 1
        return replace(opened, action="resolve", severity="info", summary=summary)
