"""Why a stretch of a series has no candles although the store is complete there.

Every stretch of a series' time line is one of: stored; a confirmed gap with one of these reasons
(recorded once, never refetched, shown by `ctl coverage`); or not fetched yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

GapReason = Literal["before_listing", "no_trades", "beyond_reach", "exchange_hole", "market_closed",
                    "operator_accepted"]

BEFORE_LISTING: GapReason = "before_listing"  # the market did not exist yet
NO_TRADES: GapReason = "no_trades"  # the exchange leaves out minutes without trades
BEYOND_REACH: GapReason = "beyond_reach"  # older than the history the exchange serves
EXCHANGE_HOLE: GapReason = "exchange_hole"  # the exchange has candles after it but none there
MARKET_CLOSED: GapReason = "market_closed"  # a market with trading hours (forex weekends)
# an operator accepted the stretch as lost (`ctl accept-gap`): the exchange serves nothing valid there
OPERATOR_ACCEPTED: GapReason = "operator_accepted"

REASONS: tuple[GapReason, ...] = (BEFORE_LISTING, NO_TRADES, BEYOND_REACH, EXCHANGE_HOLE, MARKET_CLOSED,
                                  OPERATOR_ACCEPTED)


#: reason -> (stretches, candles): a series' confirmed gaps, counted
GapTotals = dict[str, tuple[int, int]]


def add_gaps(totals: GapTotals, gaps: Iterable[tuple[int, int, str]], tf_ms: int) -> GapTotals:
    """`totals` with the [from, to) stretches of `gaps` counted in, by reason."""
    out = dict(totals)
    for lo, hi, reason in gaps:
        stretches, candles = out.get(reason, (0, 0))
        out[reason] = (stretches + 1, candles + max(0, hi - lo) // tf_ms)
    return out


def gaps_note(totals: Mapping[str, tuple[int, int]]) -> str | None:
    """What a series' health `detail` says of its confirmed gaps when it has nothing more pressing
    to say (an operator seeing candles missing sees at once that they are accounted for)."""
    if not totals:
        return None
    parts = [f"{reason} {n} ({candles} candle{'s' if candles != 1 else ''})"
             for reason, (n, candles) in sorted(totals.items(), key=lambda kv: REASONS.index(kv[0])
                                                 if kv[0] in REASONS else len(REASONS))]
    return "confirmed gaps: " + ", ".join(parts)
