"""Why a stretch of a series has no candles although the store is complete there.

Every stretch of a series' time line is one of: stored; a confirmed gap with one of these reasons
(recorded once, never refetched, shown by `ctl coverage`); or not fetched yet.
"""

from __future__ import annotations

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
