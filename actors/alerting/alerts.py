"""Alerts, the pure part: status messages in, alert transitions and webhook deliveries out.

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

Delivery (`Outbox`, one per destination): a token bucket (20 per minute, burst 10) paces
posts; what it holds back waits in a bounded queue (100; when full the oldest is dropped and
counted); posts for one dedup_key are strictly ordered (a delivery is not started while an
earlier one for the same key is in flight or waiting to be retried), so a resolve never
overtakes its trigger. Outcomes: 2xx sent; connection errors, timeouts, 5xx and 429 retried
with full-jitter exponential backoff (`candlekeeper.resilience.retry.RetryPolicy`: 6 attempts, base 1 s, cap
60 s; a 429's Retry-After wins, capped at 5 min, and also holds back the whole destination);
any other status (4xx, 3xx) gives up at once.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ...resilience.bucket import TokenBucket
from ...resilience.retry import GiveUp, Retry, RetryPolicy
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


# -- payloads ------------------------------------------------------------------------------

SLACK_ICONS = {
    "critical": ":rotating_light:", "error": ":red_circle:", "warning": ":warning:", "info": ":information_source:"
}
RESOLVED_ICON = ":large_green_circle:"


def slack_payload(alert: Alert) -> dict[str, Any]:
    """A Slack incoming-webhook message: a readable `text` line (what notifications show) and
    the same in blocks with a context line."""
    if alert.action == "resolve":
        text = f"{RESOLVED_ICON} resolved: {alert.summary}"
    else:
        text = f"{SLACK_ICONS.get(alert.severity, ':red_circle:')} {alert.severity.upper()}: {alert.summary}"
    context = f"{SOURCE} · {alert.group} `{alert.component}` · dedup_key `{alert.dedup_key}`"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


def pagerduty_payload(alert: Alert, routing_key: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 event: `trigger` with its payload, or `resolve` (key only)."""
    body: dict[str, Any] = {"routing_key": routing_key, "event_action": alert.action, "dedup_key": alert.dedup_key}
    if alert.action == "trigger":
        body["payload"] = {
            "summary": alert.summary[:MAX_SUMMARY],
            "source": SOURCE,
            "severity": alert.severity,
            "component": alert.component,
            "group": alert.group,
            "custom_details": jsonable(dict(alert.details)),
        }
    return body


# -- delivery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One alert to post to one destination; `attempt` counts the attempts made so far."""

    seq: int
    destination: str
    alert: Alert
    body: bytes
    attempt: int = 0

    @property
    def key(self) -> str:
        return self.alert.dedup_key


@dataclass(frozen=True)
class Outcome:
    """What one POST got: an HTTP status, or an error before any (connection, timeout)."""

    status: int | None = None
    error: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else (self.error or "no response")


class DeliveryFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.describe())
        self.outcome = outcome


@dataclass(frozen=True)
class Sent:
    pass


Decision = Sent | Retry | GiveUp


def delivery_policy(tuning: AlertTuning, rng: random.Random | None = None) -> RetryPolicy:
    return RetryPolicy(
        attempts=tuning.attempts, base_delay=tuning.base_delay, max_delay=tuning.max_delay, rng=rng,
        retryable=lambda exc: isinstance(exc, DeliveryFailed) and exc.outcome.retryable,
    )


def decide(policy: RetryPolicy, attempt: int, outcome: Outcome, max_retry_after: float = 300.0) -> Decision:
    """After `attempt` attempts (>= 1), the last of which got `outcome`: done, retry, or give up."""
    if outcome.ok:
        return Sent()
    retry_after = outcome.retry_after if outcome.status == 429 else None
    decision = policy.decide(attempt, DeliveryFailed(outcome), retry_after)
    if isinstance(decision, GiveUp):
        if not outcome.retryable:
            return GiveUp(f"{outcome.describe()} is not retryable")
        return GiveUp(f"{attempt} attempts failed, last: {outcome.describe()}")
    return Retry(min(decision.delay, max_retry_after))


COUNTERS = ("sent", "failed", "retried", "dropped")


class Outbox:
    """The deliveries of one destination: rate limit, bounded queue, per-key order, retries.

    The owner calls `add` for new deliveries, `take` for those that may be posted now (and how
    long until the next may, to schedule a wake-up), `finished` with each post's outcome, and
    `requeue` when a retry's delay is over.
    """

    def __init__(
        self,
        name: str,
        tuning: AlertTuning = AlertTuning(),
        *,
        clock: Clock = monotonic,
        rng: random.Random | None = None,
        counters: dict[str, int] | None = None,
    ) -> None:
        self.name = name
        self.tuning = tuning
        self._clock = clock
        self.bucket = TokenBucket(rate=tuning.rate_per_minute / 60.0, burst=tuning.burst, clock=clock)
        self.policy = delivery_policy(tuning, rng)
        self.queue: deque[Delivery] = deque()
        self.busy: dict[str, int] = {}  # dedup_key -> seq of its delivery in flight or waiting to retry
        self.in_flight = 0
        self.hold_until = clock()  # a 429's Retry-After holds back the whole destination until then
        self.counters = counters if counters is not None else {}
        for c in COUNTERS:
            self.counters.setdefault(c, 0)

    def add(self, delivery: Delivery) -> list[Delivery]:
        """Queue `delivery`; returns what was dropped (the oldest) to keep the queue bounded."""
        self.queue.append(delivery)
        dropped = []
        while len(self.queue) > self.tuning.max_queue:
            dropped.append(self.queue.popleft())
        self.counters["dropped"] += len(dropped)
        return dropped

    def take(self) -> tuple[list[Delivery], float | None]:
        """Deliveries to post now (marked in flight), and seconds until `take` may give more
        (None: nothing is waiting for a token; an outcome or a retry will wake the owner)."""
        out: list[Delivery] = []
        skipped: deque[Delivery] = deque()
        wait: float | None = None
        while self.queue and self.in_flight < self.tuning.max_in_flight:
            d = self.queue[0]
            if d.key in self.busy:  # an earlier delivery of this key is not finished: keep order
                skipped.append(self.queue.popleft())
                continue
            wait = max(self.hold_until - self._clock(), self.bucket.time_until(1.0))
            if wait > 0:
                break
            wait = None
            self.bucket.try_acquire(1.0)
            self.queue.popleft()
            self.busy[d.key] = d.seq
            self.in_flight += 1
            out.append(replace(d, attempt=d.attempt + 1))
        self.queue.extendleft(reversed(skipped))
        return out, wait

    def finished(self, delivery: Delivery, outcome: Outcome) -> Decision:
        """Account for the outcome of `delivery`'s latest attempt and say what comes next.

        On `Retry`, its key stays busy (nothing overtakes it) until `requeue`."""
        self.in_flight = max(0, self.in_flight - 1)
        decision = decide(self.policy, delivery.attempt, outcome, self.tuning.max_retry_after)
        if isinstance(decision, Retry):
            self.counters["retried"] += 1
            if outcome.status == 429:  # the destination said slow down: hold all of it back
                self.hold_until = max(self.hold_until, self._clock() + decision.delay)
        else:
            self.counters["sent" if isinstance(decision, Sent) else "failed"] += 1
            if self.busy.get(delivery.key) == delivery.seq:
                del self.busy[delivery.key]
        return decision

    def requeue(self, delivery: Delivery) -> None:
        """A retry is due: it goes first, ahead of anything queued after it."""
        if self.busy.get(delivery.key) == delivery.seq:
            del self.busy[delivery.key]
        self.queue.appendleft(delivery)

    def abandon(self) -> int:
        """Forget everything not yet sent (the owner is stopping); returns how many."""
        n = len(self.queue)
        self.queue.clear()
        return n

    def stats(self) -> dict[str, int]:
        return {**{c: self.counters[c] for c in COUNTERS}, "queued": len(self.queue), "in_flight": self.in_flight}


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret (and a URL secret's path) replaced by `***`."""
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, "***")
        _, sep, rest = secret.partition("://")
        if sep and "/" in rest:
            path = rest[rest.index("/"):]
            if len(path) > 1:
                text = text.replace(path, "/***")
    return text
