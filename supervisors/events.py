"""Lifecycle events: what supervisors tell whoever subscribes (the health actor, alerts, tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pykka
import structlog

log = structlog.get_logger("candlekeeper.events")

EventKind = Literal["started", "crashed", "restarted", "stopped", "gave_up", "escalated"]


@dataclass(frozen=True)
class LifecycleEvent:
    """One thing that happened to one child of one supervisor.

    `path` is the child's full path in the tree (e.g. ``root/binance/series/BTC/USDT@1m``),
    `kind_of_actor` its spec's kind (``worker`` or ``supervisor``, or a finer label such as
    ``series``), `reason` a one-line description of why it died.
    """

    kind: EventKind
    path: str
    child_id: str
    supervisor: str
    kind_of_actor: str = "worker"
    reason: str | None = None
    restarts: int = 0
    delay: float = 0.0
    at: float = field(default_factory=time.time)


Subscriber = pykka.ActorRef[Any] | Callable[[Any], None]


class EventBus:
    """Fan-out of events (lifecycle events, stored candles) to actor refs (told) and callables
    (called inline).

    Callables run on the publishing supervisor's thread, so they must be quick; an actor ref is
    the right subscriber for anything that does work. Dead refs are dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def publish(self, event: Any) -> None:
        for sub in self._subscribers:
            if isinstance(sub, pykka.ActorRef):
                try:
                    sub.tell(event)
                except pykka.ActorDeadError:
                    self.unsubscribe(sub)
            else:
                try:
                    sub(event)
                except Exception:
                    log.exception("event_subscriber_failed", subscriber=repr(sub), event=type(event).__name__)
