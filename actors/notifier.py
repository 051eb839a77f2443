"""The notifier actor: status reports in, alerts out (log lines always, webhooks when configured).

It receives what the health actor receives (`System.status` is a fanout of both): exchange,
series and storage status and the supervisors' lifecycle events. `candlekeeper.actors.alerting` decides what
is an alert transition (with dedup) and how each destination is paced and retried; this actor
only does what it says:

- every transition is logged as one structured line, event `alert`, with `action`,
  `dedup_key`, `severity` and `summary`, whether or not a webhook is configured;
- with `[alerts] slack_webhook` and/or `[alerts] pagerduty_routing_key`, it is POSTed as JSON
  (Slack incoming-webhook message, PagerDuty Events API v2 event) by a small thread pool it
  owns. The worker tells the outcome back as a message and the actor decides: done, retry later
  (a scheduled message, never a sleep), or give up with a log line.

Nothing a webhook does can block ingestion: other actors only `tell` this one, and its own
mailbox never waits on the network. A stop waits for posts in flight at most one HTTP timeout
(5 s); whatever is still queued then is logged as dropped. The webhook URL and the routing key
are secrets: they are never logged (error texts are redacted too).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from ..resilience.retry import GiveUp, Retry, parse_retry_after
from ..supervisors.child import Child
from ..supervisors.events import LifecycleEvent
from .alerting import (
    DEFAULT_PAGERDUTY_URL,
    Alert,
    AlertState,
    AlertTracker,
    AlertTuning,
    Delivery,
    Outbox,
    Outcome,
    Sent,
    pagerduty_payload,
    redact,
    slack_payload,
)
from .messages import ExchangeStatus, SeriesStatus, StorageStatus

log = structlog.get_logger("candlekeeper.notifier")

USER_AGENT = "candlekeeper-alerts/1"
MAX_RESPONSE = 64 * 1024  # bytes of a response body read (and ignored)


@dataclass(frozen=True)
class NotifierSettings:
    """Where alerts go besides the log (`[alerts]`); the webhook URL and the key are secrets."""

    slack_webhook: str | None = field(default=None, repr=False)
    pagerduty_routing_key: str | None = field(default=None, repr=False)
    pagerduty_url: str = DEFAULT_PAGERDUTY_URL


@dataclass(frozen=True)
class _Destination:
    name: str
    url: str
    build: Callable[[Alert], dict[str, Any]]


@dataclass(frozen=True)
class _Posted:
    delivery: Delivery
    outcome: Outcome


@dataclass(frozen=True)
class _RetryDue:
    delivery: Delivery


class _Pump:
    pass


_PUMP = _Pump()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured: never re-send the body elsewhere (3xx = give up)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class NotifierActor(Child):
    def __init__(
        self, settings: NotifierSettings | None = None, state: AlertState | None = None,
        tuning: AlertTuning | None = None,
    ) -> None:
        super().__init__()
        config = settings or NotifierSettings()
        self.tuning = tuning or AlertTuning()
        self.state = state if state is not None else AlertState()
        self.tracker = AlertTracker(
            self.state, clock=self.runtime.clock, one_shot_cooldown=self.tuning.one_shot_cooldown
        )
        self._secrets = [config.slack_webhook, config.pagerduty_routing_key]
        self.destinations: dict[str, _Destination] = {}
        if config.slack_webhook:
            self.destinations["slack"] = _Destination("slack", config.slack_webhook, slack_payload)
        if config.pagerduty_routing_key:
            key = config.pagerduty_routing_key
            self.destinations["pagerduty"] = _Destination(
                "pagerduty", config.pagerduty_url, lambda a: pagerduty_payload(a, key)
            )
        self.outboxes = {
            name: Outbox(
                name, self.tuning, clock=self.runtime.clock, rng=self.runtime.rng,
                counters=self.state.destinations.setdefault(name, {}),
            )
            for name in self.destinations
        }
        self._seq = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: set[concurrent.futures.Future[None]] = set()
        self._pump_timer: Any = None
        self._opener = urllib.request.build_opener(_NoRedirect)

    # -- lifecycle -----------------------------------------------------------------------

    def on_start(self) -> None:
        if self.destinations:
            workers = self.tuning.max_in_flight * len(self.destinations)
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"{self.path}/post"
            )
        self.log.info("notifier_started", destinations=sorted(self.destinations), open_alerts=len(self.state.active))

    def on_stop(self) -> None:
        self._shutdown(wait=self.tuning.http_timeout)

    def on_failure(self, *_: Any) -> None:
        self._shutdown(wait=0.0)  # a crash must not wait: its replacement starts now

    def _shutdown(self, *, wait: float) -> None:
        if self._pump_timer is not None:
            self._pump_timer.cancel()
            self._pump_timer = None
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.shutdown(wait=False, cancel_futures=True)
        dropped = {name: box.abandon() for name, box in self.outboxes.items()}
        if any(dropped.values()):
            self.log.warning("alerts_dropped_at_stop", **dropped)
        if wait > 0:
            # posts in flight finish within one HTTP timeout; then their threads exit
            deadline = time.monotonic() + wait
            concurrent.futures.wait(list(self._futures), timeout=wait)
            for thread in list(getattr(pool, "_threads", ())):
                thread.join(max(0.0, deadline - time.monotonic()))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Posted):
            self._on_posted(message)
        elif isinstance(message, _RetryDue):
            box = self.outboxes[message.delivery.destination]
            box.requeue(message.delivery)
            self._pump()
        elif message is _PUMP:
            self._pump_timer = None
            self._pump()
        else:
            alerts = self.tracker.observe(message)
            if not alerts and not _known(message):
                return super().on_receive(message)
            for alert in alerts:
                self._alert(alert)
        return None

    # -- public API (asked through the proxy) --------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts per destination (sent, failed, retried, dropped, queued, in_flight), alert
        transitions, and the dedup_keys of the alerts open now."""
        return {
            "destinations": {name: box.stats() for name, box in self.outboxes.items()},
            "alerts": dict(self.state.counts),
            "open": self.tracker.open_keys,
        }

    # -- alerts --------------------------------------------------------------------------

    def _alert(self, alert: Alert) -> None:
        if alert.action == "resolve":
            level = "info"
        else:
            level = "error" if alert.severity in ("critical", "error") else "warning"
        getattr(self.log, level)(
            "alert", action=alert.action, dedup_key=alert.dedup_key, severity=alert.severity, summary=alert.summary,
            component=alert.component, group=alert.group,
        )
        for name, dest in self.destinations.items():
            self._seq += 1
            body = json.dumps(dest.build(alert), default=str).encode()
            for lost in self.outboxes[name].add(Delivery(self._seq, name, alert, body)):
                self.log.warning(
                    "alert_dropped", destination=name, dedup_key=lost.key, action=lost.alert.action,
                    reason="queue full", dropped_total=self.outboxes[name].counters["dropped"],
                )
        self._pump()

    def _pump(self) -> None:
        if self._pool is None:
            return
        soonest: float | None = None
        for box in self.outboxes.values():
            ready, wait = box.take()
            for delivery in ready:
                self._submit(delivery)
            if wait is not None and (soonest is None or wait < soonest):
                soonest = wait
        if soonest is not None:
            self._pump_later(soonest)

    def _pump_later(self, delay: float) -> None:
        self._pump_timer = self.schedule_soonest(self._pump_timer, delay, _PUMP)

    def _submit(self, delivery: Delivery) -> None:
        assert self._pool is not None
        self._futures = {f for f in self._futures if not f.done()}
        url = self.destinations[delivery.destination].url
        self._futures.add(self._pool.submit(self._post, url, delivery))

    def _on_posted(self, posted: _Posted) -> None:
        d, outcome = posted.delivery, posted.outcome
        box = self.outboxes[d.destination]
        decision = box.finished(d, outcome)
        fields = {"destination": d.destination, "dedup_key": d.key, "action": d.alert.action, "attempt": d.attempt}
        if isinstance(decision, Sent):
            self.log.info("alert_delivered", status=outcome.status, **fields)
        elif isinstance(decision, Retry):
            self.log.warning(
                "alert_delivery_retry", error=outcome.describe(), retry_in=round(decision.delay, 3), **fields
            )
            if self._pool is not None:
                self.schedule(decision.delay, _RetryDue(d))
        else:
            assert isinstance(decision, GiveUp)
            self.log.error("alert_delivery_failed", error=outcome.describe(), reason=decision.reason, **fields)
        self._pump()

    # -- worker side (runs on the pool's threads, never touches actor state) -------------

    def _post(self, url: str, delivery: Delivery) -> None:
        outcome = self._http_post(url, delivery.body)
        try:
            self.actor_ref.tell(_Posted(delivery, outcome))
        except pykka.ActorDeadError:
            log.debug("alert_outcome_dropped_actor_stopped", destination=delivery.destination)

    def _http_post(self, url: str, body: bytes) -> Outcome:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": USER_AGENT}
        )
        try:
            with self._opener.open(request, timeout=self.tuning.http_timeout) as response:
                response.read(MAX_RESPONSE)
                return Outcome(status=response.status)
        except urllib.error.HTTPError as exc:
            retry_after = None
            try:
                header = exc.headers.get("Retry-After") if exc.headers else None
                retry_after = parse_retry_after(header, self.runtime.wall())
                exc.read(MAX_RESPONSE)
            except (OSError, ValueError):
                pass
            finally:
                exc.close()
            return Outcome(status=exc.code, retry_after=retry_after)
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, bad URL...: all go back
            reason = getattr(exc, "reason", None)
            text = f"{type(exc).__name__}: {reason if reason is not None else exc}"
            return Outcome(error=redact(text, self._secrets)[:300])


def _known(message: Any) -> bool:
    """Status messages the notifier receives and may ignore (not an alert transition)."""
    return isinstance(message, ExchangeStatus | SeriesStatus | StorageStatus | LifecycleEvent)
