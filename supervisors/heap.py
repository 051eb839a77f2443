"""Full garbage collections at a moment the daemon chooses, not in the middle of a burst.

CPython runs a full (generation 2) collection once enough objects have survived the younger
ones. At 10,000 series that happens in a candle close's burst, the busiest second of the minute,
because the burst is what allocates: the collection scans every object in the process (the
actors, their threads' state, the markets) and stops every thread for over a second (measured:
0.8 to 1.2 s, the whole difference between a close stored within 2 s and one stored in 4).

`HeapKeeper` keeps what lives in the collector's permanent generation (`gc.freeze`), so the
automatic collections scan only what was made since the last settle. It settles at a quiet
instant every `every_s` seconds (`phase_s` past a multiple of it: by default each minute, half a
minute past it, where no candle of a minute or longer closes): it collects what is not frozen
(the minute's survivors, cheap) and freezes what is left. Every `full_every_s` it first lets
everything back (`gc.unfreeze`), so garbage that arose among frozen objects is freed too and
nothing leaks; that one costs what an automatic full collection cost, at a quiet instant.

At start it collects what is not frozen, which in a fresh process is everything. What the
process froze before (a pre-fork server freezes its heap so that its forked children share those
pages instead of each copying them as a collection touches them) stays frozen until the first
whole settle, `full_every_s` later.

The collector is the process's, so this is the daemon's choice (`candlekeeper` runs one); an
application embedding candlekeeper can run one as well, or leave its collector alone.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

from .clock import WallClock
from .scheduler import Scheduler, Timer


def next_quiet(now: float, every_s: float, phase_s: float) -> float:
    """The first instant after `now` that is `phase_s` past a multiple of `every_s` (epoch s)."""
    at = now - now % every_s + phase_s
    return at if at > now else at + every_s


@dataclass(frozen=True)
class Collector:
    """The three calls of the garbage collector the keeper makes (replaced in tests)."""

    collect: Callable[[], object] = gc.collect
    freeze: Callable[[], None] = gc.freeze
    unfreeze: Callable[[], None] = gc.unfreeze


class HeapKeeper:
    """See the module docstring. `start` settles what is not frozen (in a fresh process, the
    whole heap), then every `every_s` what is new, and every `full_every_s` the whole heap."""

    def __init__(self, scheduler: Scheduler, wall: WallClock, *, every_s: float = 60.0, phase_s: float = 30.0,
                 full_every_s: float = 3600.0, collector: Collector | None = None) -> None:
        if not 0 <= phase_s < every_s:
            raise ValueError(f"phase_s must be in [0, every_s), got {phase_s} and {every_s}")
        self._scheduler = scheduler
        self._wall = wall
        self.every_s = every_s
        self.phase_s = phase_s
        self.full_every_s = full_every_s
        self._gc = collector or Collector()
        self._timer: Timer | None = None
        self._running = False
        self._full_at = 0.0  # wall time of the last full settle
        self.settled = 0  # how many times the heap was settled (full ones included)

    def start(self) -> HeapKeeper:
        self._running = True
        self._settle()
        return self

    def stop(self) -> None:
        """The collector as it was: nothing frozen, nothing scheduled."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gc.unfreeze()

    def _settle(self) -> None:
        # on the timer thread: a collection stops every thread whichever one runs it
        if not self._running:
            return
        now = self._wall()
        if self.settled == 0:
            self._full_at = now  # what is not frozen is the whole heap, unless the process froze some
        elif now - self._full_at >= self.full_every_s - self.every_s / 2:
            self._gc.unfreeze()
            self._full_at = now
        self._gc.collect()
        self._gc.freeze()
        self.settled += 1
        now = self._wall()
        self._timer = self._scheduler.call_later(next_quiet(now, self.every_s, self.phase_s) - now, self._settle)
