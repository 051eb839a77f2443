"""What a series does with one answer: what to store, which gaps are confirmed, what to ask again.

Every stretch of a series' time line ends up one of: stored; a confirmed gap with its reason
(`market.gaps`); or not fetched yet. An answer confirms a missing candle only where it covers its
stretch completely (`market.paging.served`) and either shows a later candle or is old enough that
the exchange will not publish more there (`settle_ms`); what the exchange did not serve is asked
again, never taken for a gap. Pure functions and a small search, no actor state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .candles import Candle
from .gaps import BEFORE_LISTING, MARKET_CLOSED, GapReason
from .paging import Served

Gap = tuple[int, int, GapReason]


@dataclass(frozen=True)
class Outcome:
    """rows: to store; gaps: confirmed gaps to record; refetch: stretches not served, to ask
    again; covered_to: [since, covered_to) is all stored, confirmed or in `refetch`."""

    rows: list[Candle] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    refetch: list[tuple[int, int]] = field(default_factory=list)
    covered_to: int = 0

    @property
    def progressed(self) -> bool:
        return bool(self.rows or self.gaps or self.refetch)


def take(
    candles: Sequence[Candle],
    served: Served,
    *,
    since: int,
    bound: int | None,
    tf_ms: int,
    now_ms: int,
    settle_ms: int,
    first_ever: bool,
    closed_spans: Sequence[tuple[int, int]] = (),
) -> Outcome:
    """The outcome of an answer to a request from `since` (up to `bound`, when filling a hole).

    first_ever: the series has no candle stored before `since` and `since` is its start, so a
    stretch before the first candle the exchange shows is `before_listing`. closed_spans: when
    the market was closed (forex weekends): a missing stretch inside one is `market_closed`, and
    one at the end of the answer need not settle (see `_open_until`)."""
    end = served.end if bound is None else min(served.end, bound)
    rows = [c for c in candles if since <= c[0] < end]
    gaps: list[Gap] = []
    refetch: list[tuple[int, int]] = []
    start = min(max(since, served.start), max(since, end))
    if start > since:
        if served.before is not None:
            gaps.append((since, start, served.before))
        else:
            refetch.append((since, start))
    listing = first_ever and start == since

    def missing(lo: int, hi: int) -> None:
        nonlocal listing
        reason: GapReason = BEFORE_LISTING if listing else served.missing
        for a, b, why in _split(lo, hi, closed_spans, reason):
            gaps.append((a, b, why))

    expected = start
    for c in rows:
        if c[0] > expected:
            missing(expected, c[0])
        listing = False
        expected = c[0] + tf_ms
    covered_to = expected
    if expected < end and _open_until(expected, end, closed_spans) + settle_ms <= now_ms:
        missing(expected, end)  # old enough: the exchange has nothing more there
        covered_to = end
    elif not rows and refetch:
        covered_to = max(covered_to, start)
    return Outcome(rows, gaps, refetch, covered_to)


def _open_until(lo: int, hi: int, spans: Sequence[tuple[int, int]]) -> int:
    """Where the market was last open in [lo, hi): `hi`, less a closed stretch ending there. Only
    the open part must wait `settle_ms` for late candles: none can come while the market is closed,
    and a window ending in a weekend would otherwise never be old enough while the weekend lasts."""
    end = hi
    for a, b in sorted(spans, reverse=True):
        if a < end <= b:
            end = a
    return max(lo, end)


def _split(lo: int, hi: int, spans: Sequence[tuple[int, int]], reason: GapReason) -> list[Gap]:
    """[lo, hi) cut into the parts inside closed-market spans and the rest."""
    out: list[Gap] = []
    at = lo
    for a, b in sorted(spans):
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        if a > at:
            out.append((at, a, reason))
        out.append((a, b, MARKET_CLOSED))
        at = b
    if at < hi:
        out.append((at, hi, reason))
    return out


class ListingSearch:
    """Where do a market's candles begin, somewhere in [lo, hi)? Found in about log2 of the
    windows in between, for exchanges that serve windows (an empty window before a listing is a
    valid answer, so paging one window at a time from years before it would take thousands of
    requests). It assumes a market has candles from its listing on; a window probed empty is
    taken to have nothing before it either."""

    def __init__(self, lo: int, hi: int, window_ms: int) -> None:
        self.empty_to = lo  # nothing before this (confirmed, or assumed by the search)
        self.data_at = hi  # a candle is known here (or the horizon)
        self.window_ms = window_ms

    @property
    def done(self) -> bool:
        return self.data_at - self.empty_to < self.window_ms  # one window from empty_to shows it

    def probe(self) -> int:
        """The `since` of the next window to ask for (aligned to the window's own grid)."""
        windows = (self.data_at - self.empty_to) // self.window_ms
        return self.empty_to + (windows // 2) * self.window_ms

    def record(self, since: int, first: int | None, window_end: int) -> None:
        """The window from `since` showed its first candle at `first` (None: empty to `window_end`)."""
        if first is None:
            self.empty_to = max(self.empty_to, window_end)
            return
        self.data_at = min(self.data_at, first)
        if first > since:  # nothing from `since` to `first`: with candles from the listing on, it is `first`
            self.empty_to = max(self.empty_to, first)
