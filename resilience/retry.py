"""Retry policy: exponential backoff with full jitter, capped; the caller says which errors to retry.

It decides, it never waits: the caller (a series actor) schedules its next attempt as a message.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    delay: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


Decision = Retry | GiveUp


def _every_exception(_: BaseException) -> bool:
    return True


@dataclass(frozen=True)
class RetryConfig:
    """The numbers of a `RetryPolicy`, as settings carry them."""

    attempts: int = 3
    base_delay: float = 1.0
    max_delay: float = 60.0

    def policy(self, *, rng: random.Random | None = None,
               retryable: Callable[[BaseException], bool] = _every_exception) -> RetryPolicy:
        return RetryPolicy(self.attempts, self.base_delay, self.max_delay, rng=rng, retryable=retryable)


class RetryPolicy:
    """`attempts` counts every attempt, the first included (the plan's "max 3 attempts").

    Which errors are worth another attempt is the owner's call (`retryable`; every one by
    default): the daemon passes its exchange-error classifier, the notifier its HTTP rule."""

    def __init__(
        self,
        attempts: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        *,
        rng: random.Random | None = None,
        retryable: Callable[[BaseException], bool] = _every_exception,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if base_delay < 0 or max_delay < base_delay:
            raise ValueError("need 0 <= base_delay <= max_delay")
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._rng = rng or random.Random()
        self._retryable = retryable

    def max_delay_for(self, attempt: int) -> float:
        """Upper bound of the delay after `attempt` attempts: min(cap, base * 2**(attempt-1))."""
        return min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 1000))

    def decide(self, attempt: int, exc: BaseException, retry_after: float | None = None) -> Decision:
        """After `attempt` attempts (>= 1) the last of which raised `exc`: retry after how long, or give up."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        if not self._retryable(exc):
            return GiveUp(f"{type(exc).__name__} is not retryable")
        if attempt >= self.attempts:
            return GiveUp(f"{attempt} attempts failed, last: {type(exc).__name__}")
        if retry_after is not None and retry_after >= 0:
            return Retry(retry_after)  # the server's word beats our guess
        return Retry(self._rng.uniform(0.0, self.max_delay_for(attempt)))


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """An HTTP Retry-After value (delta-seconds or HTTP-date) as seconds from now, never negative."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now_epoch
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
