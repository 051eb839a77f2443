"""Alert delivery, the pure part: one `Outbox` per destination paces posts, keeps each key's posts
in order and decides, from each HTTP outcome, sent, retry later or give up.

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

import random
from collections import deque
from dataclasses import dataclass, replace

from ...resilience.bucket import TokenBucket
from ...resilience.retry import GiveUp, Retry, RetryPolicy
from ...supervisors.clock import Clock, monotonic
from .rules import Alert, AlertTuning

DEFAULT_TUNING = AlertTuning()


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
        tuning: AlertTuning = DEFAULT_TUNING,
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
