"""Per-series quarantine: a series that keeps failing is probed on a slow schedule, not hammered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..supervisors.clock import Clock, monotonic


@dataclass(frozen=True)
class QuarantineConfig:
    """The numbers of a `Quarantine`, as settings carry them."""

    threshold: int = 10
    probe_interval: float = 60.0
    max_probe_interval: float = 3600.0

    def machine(self, *, clock: Clock = monotonic) -> Quarantine:
        return Quarantine(self.threshold, self.probe_interval, clock=clock, max_probe_interval=self.max_probe_interval)


class Quarantine:
    """After `threshold` failures in a row the series is quarantined; it is probed after
    `probe_interval`, then after intervals growing by `backoff_multiplier` up to
    `max_probe_interval` while probes fail; one success releases it."""

    def __init__(
        self,
        threshold: int = 10,
        probe_interval: float = 300.0,
        *,
        clock: Clock = monotonic,
        max_probe_interval: float = 3600.0,
        backoff_multiplier: float = 2.0,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        if probe_interval <= 0 or max_probe_interval < probe_interval:
            raise ValueError("need 0 < probe_interval <= max_probe_interval")
        if backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be >= 1")
        self.threshold = threshold
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self.backoff_multiplier = backoff_multiplier
        self._clock = clock
        self.consecutive_failures = 0
        self.quarantined = False
        self.next_probe_at: float | None = None
        self._interval = probe_interval

    def record_failure(self) -> bool:
        """True exactly when this failure put the series in quarantine."""
        self.consecutive_failures += 1
        if self.quarantined:
            self._interval = min(self.max_probe_interval, self._interval * self.backoff_multiplier)
            self.next_probe_at = self._clock() + self._interval
            return False
        if self.consecutive_failures >= self.threshold:
            self.quarantined = True
            self._interval = self.probe_interval
            self.next_probe_at = self._clock() + self._interval
            return True
        return False

    def record_success(self) -> bool:
        """True exactly when this success released the series."""
        released = self.quarantined
        self.reset()
        return released

    def reset(self) -> None:
        self.consecutive_failures = 0
        self.quarantined = False
        self.next_probe_at = None
        self._interval = self.probe_interval

    def time_until_probe(self) -> float | None:
        return None if self.next_probe_at is None else max(0.0, self.next_probe_at - self._clock())

    def snapshot(self) -> dict[str, Any]:
        return {
            "quarantined": self.quarantined,
            "consecutive_failures": self.consecutive_failures,
            "next_probe_in": self.time_until_probe(),
        }
