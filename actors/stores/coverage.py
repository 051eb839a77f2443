"""What a store reports about one series' completeness, whatever the database."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coverage:
    """One series in the store: `first_ts`/`last_ts` (open times, ms UTC; None when nothing is
    stored), `count` stored candles, `missing` [from, to) stretches of the range asked about that
    are neither stored nor confirmed gaps, and every confirmed gap as (from, to, reason) (reasons:
    `candlekeeper.actors.market.gaps`)."""

    first_ts: int | None
    last_ts: int | None
    count: int
    missing: tuple[tuple[int, int], ...]
    gaps: tuple[tuple[int, int, str], ...]
