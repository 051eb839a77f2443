"""What one answer to a candle request proves, by how the exchange serves candles (its `Profile`).

An exchange answers `(since, limit[, until])` with some rows. Which stretches of time does that
answer cover completely, so that a candle missing there is known not to exist, and which did it
merely not serve? That depends on the exchange (see `actors/sources/base.py: Profile`), and getting
it wrong loses data silently: an over-full window of a newest-first exchange loses its start, a
Kraken answer starts where its history reach does. `served` answers it, as a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sources.base import Profile
from .gaps import BEYOND_REACH, EXCHANGE_HOLE, NO_TRADES, GapReason


@dataclass(frozen=True)
class Served:
    """The stretch [start, end) an answer covers completely: every candle the exchange has there
    was returned. [since, start) was not served: `before` says why nothing can be had there
    (beyond the exchange's reach), or is None when it must be asked again. A candle missing
    inside the stretch is missing for `missing`."""

    start: int
    end: int
    before: GapReason | None
    missing: GapReason


def window_end(profile: Profile, since: int, limit: int, tf_ms: int, until: int | None) -> int | None:
    """The `until` to ask with: the end of the window [since, since + limit candles) for exchanges
    that serve windows (capped by `until` when the caller asks for less), None for the others."""
    if profile.paging != "window":
        return None
    end = since + limit * tf_ms
    return end if until is None else min(end, until)


def served(profile: Profile, *, since: int, limit: int, until: int | None, opens: list[int], tf_ms: int,
           horizon_ms: int) -> Served:
    """What an answer covers. `opens`: the open times it returned at or after `since`, ascending
    (closed or not: the exchange served them); `horizon_ms`: the first open time not closed yet by
    the exchange's clock; `until`: the window's end asked for (None: no window)."""
    missing = NO_TRADES if profile.omits_empty else EXCHANGE_HOLE
    n = len(opens)
    full = n >= limit or n in profile.caps
    if profile.paging == "recent":
        # Only the newest `reach` candles are served: an answer starting after `since` with the
        # exchange's whole reach in it means the history before its first row is out of reach. A
        # page cut at `limit` (ccxt trims it) covers only up to its last row.
        end = min(opens[-1] + tf_ms, horizon_ms) if opens and n >= limit else horizon_ms
        # the oldest candle the exchange still serves (its `reach` counts the one in progress)
        at_reach = profile.reach is not None and bool(opens) and opens[0] <= horizon_ms - (profile.reach - 2) * tf_ms
        if opens and opens[0] > since and at_reach:
            return Served(opens[0], max(opens[0], end), BEYOND_REACH, missing)
        return Served(since, max(since, end), None, missing)
    end = horizon_ms if until is None else min(until, horizon_ms)
    if not full or not opens:
        # nothing was cut: everything the exchange has in [since, end) is here
        return Served(since, max(since, end), None, missing)
    if profile.cut == "start" and profile.paging == "window":
        # newest-first: an over-full window keeps its newest rows; its start was not served
        return Served(opens[0], max(opens[0], end), None, missing)
    # oldest-first: the answer is complete up to its last row
    return Served(since, min(opens[-1] + tf_ms, max(since, end)), None, missing)
