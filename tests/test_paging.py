"""What an answer proves (`served`), what a series does with it (`take`), and the listing search:
pure functions, checked case by case and against a brute-force model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeeper.actors.market.paging import Served, served
from candlekeeper.actors.market.progress import ListingSearch, take
from candlekeeper.actors.sources.base import Profile

TF = 60_000
T0 = 1_700_000_000_000 // TF * TF
HORIZON = T0 + 10_000 * TF

CURSOR = Profile(page_limit=1000, caps=(1000,), paging="cursor", cut="end")
WINDOW = Profile(page_limit=300, caps=(300, 100), paging="window", cut="start")
OMITTING = Profile(page_limit=300, caps=(300,), paging="window", cut="start", omits_empty=True)
RECENT = Profile(page_limit=720, caps=(720,), paging="recent", cut="start", omits_empty=True, reach=720)


def opens(*k: int) -> list[int]:
    return [T0 + i * TF for i in k]


def test_cursor_pages() -> None:
    short = served(CURSOR, since=T0, limit=1000, until=None, opens=opens(0, 1, 5), tf_ms=TF, horizon_ms=HORIZON)
    assert short == Served(T0, HORIZON, None, "exchange_hole")  # fewer than asked: nothing more to now
    full = served(CURSOR, since=T0, limit=3, until=None, opens=opens(0, 1, 5), tf_ms=TF, horizon_ms=HORIZON)
    assert (full.start, full.end) == (T0, T0 + 6 * TF)  # complete up to its last row only


def test_window_pages_and_a_cut_start() -> None:
    until = T0 + 300 * TF
    whole = served(WINDOW, since=T0, limit=300, until=until, opens=opens(3, 4, 200), tf_ms=TF, horizon_ms=HORIZON)
    assert (whole.start, whole.end, whole.before) == (T0, until, None)
    rows = opens(*range(200, 300))  # 100 rows: an endpoint cap; newest-first keeps the newest
    cut = served(WINDOW, since=T0, limit=300, until=until, opens=rows, tf_ms=TF, horizon_ms=HORIZON)
    assert (cut.start, cut.end, cut.before) == (T0 + 200 * TF, until, None)  # its start is asked again


def test_recent_reach() -> None:
    horizon = T0 + 2000 * TF
    first = horizon - 719 * TF
    rows = [first + i * TF for i in range(719)]
    out = served(RECENT, since=T0, limit=720, until=None, opens=rows, tf_ms=TF, horizon_ms=horizon)
    assert (out.start, out.before) == (first, "beyond_reach")
    # a quiet minute at `since` inside the reach is no_trades, not beyond reach
    inside = served(RECENT, since=horizon - 10 * TF, limit=720, until=None, opens=[horizon - 8 * TF],
                    tf_ms=TF, horizon_ms=horizon)
    assert (inside.start, inside.before, inside.missing) == (horizon - 10 * TF, None, "no_trades")


def test_take_confirms_only_what_is_proven() -> None:
    now = T0 + 1000 * TF
    cover = Served(T0 + 2 * TF, T0 + 20 * TF, None, "no_trades")
    candles = [(t, 1.0, 1.0, 1.0, 1.0, 1.0) for t in opens(2, 3, 7, 8)]
    out = take(candles, cover, since=T0, bound=None, tf_ms=TF, now_ms=now, settle_ms=60_000, first_ever=False)
    assert out.refetch == [(T0, T0 + 2 * TF)]  # not served: asked again, never a gap
    assert out.gaps[0] == (T0 + 4 * TF, T0 + 7 * TF, "no_trades")  # between rows: confirmed
    assert out.gaps[1] == (T0 + 9 * TF, T0 + 20 * TF, "no_trades")  # old enough: confirmed
    assert out.covered_to == T0 + 20 * TF
    recent = take(candles, cover, since=T0, bound=None, tf_ms=TF, now_ms=T0 + 20 * TF, settle_ms=60_000,
                  first_ever=False)
    assert recent.covered_to == T0 + 9 * TF and len(recent.gaps) == 1  # the tail may still be published


def test_take_names_listings_and_closed_markets() -> None:
    cover = Served(T0, T0 + 100 * TF, None, "no_trades")
    candles = [(t, 1.0, 1.0, 1.0, 1.0, 1.0) for t in opens(40, 41, 70)]
    out = take(candles, cover, since=T0, bound=None, tf_ms=TF, now_ms=T0 + 10_000 * TF, settle_ms=0,
               first_ever=True, closed_spans=[(T0 + 50 * TF, T0 + 60 * TF)])
    reasons = [(a - T0) // TF for a, _, _ in out.gaps], [r for _, _, r in out.gaps]
    assert reasons == ([0, 42, 50, 60, 71], ["before_listing", "no_trades", "market_closed", "no_trades",
                                              "no_trades"])


@settings(max_examples=200, deadline=None)
@given(listing=st.integers(0, 50_000), window=st.sampled_from([100, 300, 1000]), span=st.integers(1, 60_000))
def test_the_listing_search_finds_the_first_candle_in_few_requests(listing: int, window: int, span: int) -> None:
    lo, hi = T0, T0 + (listing + span) * TF
    first = T0 + listing * TF  # candles from here on, none before
    search = ListingSearch(lo, hi, window * TF)
    probes = 0
    while not search.done:
        since = search.probe()
        probes += 1
        end = since + window * TF
        got = max(since, first) if first < end else None
        search.record(since, got, end)
        assert probes < 64
    assert search.empty_to <= first < search.empty_to + window * TF or search.empty_to == first
    assert probes <= max(1, ((listing + span) // window).bit_length() + 1)
