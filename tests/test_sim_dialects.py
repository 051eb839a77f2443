"""Every dialect, driven by the REAL ccxt client: market lists, paging from `since`, page
caps, the in-progress candle, listing times, minutes without trades, reach, markets listed at
run time, server clock and Date header."""

from __future__ import annotations

import email.utils
import http.client
import itertools

import ccxt
import pytest

from candlekeeper.simulator import DEFAULT_MARKETS, ExchangeSimulator
from candlekeeper.simulator.__main__ import _parse
from candlekeeper.simulator.history import align_down
from tests.test_sim_support import DIALECT_NAMES, MIN, SPECS, START, T0, FakeClock, Log, client, running, walk

pytestmark = pytest.mark.parametrize("dialect", DIALECT_NAMES)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ------------------------------------------------------------------------------ markets
def test_load_markets_lists_the_catalogue_under_the_exchanges_ids(dialect: str,
                                                                  clock: FakeClock) -> None:
    with running(dialect, clock, symbols=[f"ZZZ/{SPECS[dialect].quote}"]) as sim:
        markets = client(sim).load_markets()
        spot = {s for s, m in markets.items() if m["spot"]}
        assert spot == set(sim.markets())
        assert set(DEFAULT_MARKETS[dialect]) | {f"ZZZ/{SPECS[dialect].quote}"} == spot
        assert len(spot) >= 39
        for s in spot:
            assert markets[s]["id"] == sim.market_id(s)
            assert markets[s]["active"] is True


def test_realistic_price_levels(dialect: str, clock: FakeClock) -> None:
    q = SPECS[dialect].quote
    with running(dialect, clock) as sim:
        ex = client(sim, clock)
        levels = {"BTC": 90_000, "ETH": 3_000, "SOL": 150, "XRP": 2, "DOGE": 0.15}
        for base, level in levels.items():
            close = ex.fetch_ohlcv(f"{base}/{q}", "1m", since=START, limit=1)[0][4]
            assert level * 0.6 < close < level * 1.6, (base, close)


# ------------------------------------------------------------------------------- paging
def test_paging_forward_from_since_loses_and_repeats_nothing(dialect: str,
                                                             clock: FakeClock) -> None:
    with running(dialect, clock) as sim:
        ex = client(sim, clock)
        sym = SPECS[dialect].symbol
        got, pages = walk(ex, sym, START, T0, limit=17)
        expected = sim.expected_candles(sym, "1m", START, T0)
        assert len(expected) == (align_down(T0, "1m") - START) // MIN
        assert got == [list(c) for c in expected]
        assert pages >= len(expected) // 17


def test_paging_higher_interval(dialect: str, clock: FakeClock) -> None:
    with running(dialect, clock, history_start_ms=START - 2 * 86_400_000) as sim:
        ex = client(sim, clock)
        sym = SPECS[dialect].symbol
        got, _ = walk(ex, sym, START - 86_400_000, T0, limit=5, timeframe="1h")
        assert got == [list(c) for c in sim.expected_candles(sym, "1h", START - 86_400_000, T0)]
        assert len(got) == 25


def test_page_cap(dialect: str, clock: FakeClock) -> None:
    """Ask for more than the exchange serves per page: it sends its cap (or refuses)."""
    with running(dialect, clock, history_start_ms=T0 - 2 * 86_400_000) as sim:
        ex = client(sim, clock)
        sym = SPECS[dialect].symbol
        mid = sim.market_id(sym)
        if dialect == "binance":
            rows = ex.publicGetKlines({"symbol": mid, "interval": "1m", "limit": 5000})
            assert len(rows) == 1000
        elif dialect == "okx":
            for call in (ex.publicGetMarketCandles, ex.publicGetMarketHistoryCandles):
                assert len(call({"instId": mid, "bar": "1m", "limit": 1000})["data"]) == 300
        elif dialect == "bybit":
            r = ex.publicGetV5MarketKline({"category": "spot", "symbol": mid, "interval": "1",
                                           "limit": 5000})
            assert len(r["result"]["list"]) == 1000
        elif dialect == "kraken":
            r = ex.publicGetOHLC({"pair": mid, "interval": 1, "since": 0})
            assert len(r["result"][mid]) == 720
        elif dialect == "coinbase":
            now_s = T0 // 1000
            call = ex.v3PublicGetBrokerageMarketProductsProductIdCandles
            ok = call({"product_id": mid, "granularity": "ONE_MINUTE",
                       "start": now_s - 350 * 60, "end": now_s})
            assert len(ok["candles"]) == 350
            with pytest.raises(ccxt.BadRequest):  # a range of more than 350 bars is refused
                call({"product_id": mid, "granularity": "ONE_MINUTE",
                      "start": now_s - 351 * 60, "end": now_s})
        else:
            r = ex.publicGetMarketCandles({"symbol": mid, "type": "1min",
                                           "startAt": (T0 - 1700 * MIN) // 1000,
                                           "endAt": T0 // 1000})
            rows = r["data"]
            assert len(rows) == 1500
            assert int(rows[0][0]) * 1000 == align_down(T0, "1m")  # the newest 1500 win
        # ccxt's own paging never exceeds the cap: a full page is exactly its max
        cap = {"binance": 1000, "okx": 300, "bybit": 1000, "kraken": 720, "coinbase": 300,
               "kucoin": 1500}[dialect]
        assert ex.features["spot"]["fetchOHLCV"]["limit"] == cap
        rows = ex.fetch_ohlcv(sym, "1m", since=T0 - 1000 * MIN, limit=cap)
        assert len(rows) == min(cap, 1000 if dialect != "kraken" else 720)


# -------------------------------------------------------------------------- in progress
def test_in_progress_candle(dialect: str, clock: FakeClock) -> None:
    with running(dialect, clock) as sim:
        ex = client(sim, clock)
        sym = SPECS[dialect].symbol
        open_t = align_down(T0, "1m")
        first = ex.fetch_ohlcv(sym, "1m", since=open_t - 2 * MIN, limit=3)
        assert [r[0] for r in first] == [open_t - 2 * MIN, open_t - MIN, open_t]
        clock.advance(7_000)
        second = ex.fetch_ohlcv(sym, "1m", since=open_t - 2 * MIN, limit=3)
        assert second[:2] == first[:2]  # closed candles do not change
        assert second[2][0] == open_t and second[2][5] > first[2][5]  # volume grows
        assert sim.expected_candles(sym, "1m", open_t, open_t + MIN) == []
        assert [list(c) for c in sim.expected_candles(sym, "1m", open_t - 2 * MIN, T0)] \
            == first[:2]
        clock.now = open_t + MIN  # now it closes
        final = ex.fetch_ohlcv(sym, "1m", since=open_t, limit=1)
        assert final == [list(c) for c in sim.expected_candles(sym, "1m", open_t, open_t + MIN)]
        assert final[0] not in (first[2], second[2])


# ------------------------------------------------------------------------ listing times
def test_listing_time(dialect: str, clock: FakeClock) -> None:
    new = SPECS[dialect].sym("NEW")
    listed = START + 30 * MIN + 20_000  # mid-minute
    with running(dialect, clock, symbols=[new], listed_at={new: listed}) as sim:
        ex = client(sim, clock)
        rows = ex.fetch_ohlcv(new, "1m", since=START, limit=50)
        assert rows and rows[0][0] == align_down(listed, "1m")  # straddling: starts at listing
        closed = [r for r in rows if r[0] + MIN <= T0]
        assert closed == [list(c) for c in sim.expected_candles(new, "1m", START, T0)][:len(closed)]
        assert sim.expected_candles(new, "1m", START, listed - 20_000) == []
        # a window wholly before the listing is empty (Kraken's `since` has no end: n/a)
        before = {"binance": {"until": listed - 2 * MIN}, "bybit": {"until": listed - 2 * MIN}}
        if dialect != "kraken":
            assert ex.fetch_ohlcv(new, "1m", since=START, limit=10,
                                  params=before.get(dialect, {})) == []
        if dialect == "okx":
            raw = ex.publicGetMarketCandles({"instId": sim.market_id(new), "bar": "1m",
                                             "after": listed - 2 * MIN})
            assert raw["data"] == [] and raw["code"] == "0"
            assert ex.load_markets()[new]["created"] == listed  # listTime


def test_listed_in_the_future_has_no_candles_yet(dialect: str, clock: FakeClock) -> None:
    new = SPECS[dialect].sym("NEW")
    with running(dialect, clock, symbols=[new], listed_at={new: T0 + 10 * MIN}) as sim:
        ex = client(sim, clock)
        assert new in ex.load_markets()
        assert ex.fetch_ohlcv(new, "1m", since=START, limit=10) == []
        clock.now = T0 + 12 * MIN
        assert [r[0] for r in ex.fetch_ohlcv(new, "1m", since=T0, limit=20)] == [
            align_down(T0 + 10 * MIN, "1m"), align_down(T0 + 11 * MIN, "1m"),
            align_down(T0 + 12 * MIN, "1m")]


def test_market_listed_at_run_time(dialect: str, clock: FakeClock) -> None:
    late = SPECS[dialect].sym("LATE")
    fresh = SPECS[dialect].sym("FRESH")
    with running(dialect, clock, unlisted=[late], listed_at={late: START}) as sim:
        ex = client(sim, clock)
        assert late not in ex.load_markets() and late not in sim.markets()
        with pytest.raises(ccxt.BaseError):
            ex.fetch_ohlcv(late, "1m", since=START, limit=3)  # ccxt refuses: BadSymbol
        raw_unknown = {"binance": ccxt.BadSymbol, "okx": ccxt.BadSymbol, "bybit": ccxt.BadSymbol,
                       "kraken": ccxt.ExchangeError, "coinbase": ccxt.ExchangeError,
                       "kucoin": ccxt.BadRequest}[dialect]
        with pytest.raises(raw_unknown):  # and so does the exchange
            _raw_candles(ex, dialect, sim.market_id(late))
        sim.list_symbol(late)
        sim.list_symbol(fresh)  # never known: listed (and trading) from now on
        markets = ex.load_markets(reload=True)
        assert late in markets and fresh in markets
        rows = ex.fetch_ohlcv(late, "1m", since=START, limit=5)
        assert rows[0][0] == START
        assert [r[0] for r in ex.fetch_ohlcv(fresh, "1m", since=T0 - 2 * MIN, limit=5)] == [
            align_down(T0, "1m")]  # only its in-progress candle so far


def _raw_candles(ex: ccxt.Exchange, dialect: str, mid: str) -> object:
    if dialect == "binance":
        return ex.publicGetKlines({"symbol": mid, "interval": "1m"})
    if dialect == "okx":
        return ex.publicGetMarketCandles({"instId": mid, "bar": "1m"})
    if dialect == "bybit":
        return ex.publicGetV5MarketKline({"category": "spot", "symbol": mid, "interval": "1"})
    if dialect == "kraken":
        return ex.publicGetOHLC({"pair": mid, "interval": 1})
    if dialect == "coinbase":
        return ex.v3PublicGetBrokerageMarketProductsProductIdCandles(
            {"product_id": mid, "granularity": "ONE_MINUTE", "start": T0 // 1000 - 600,
             "end": T0 // 1000})
    return ex.publicGetMarketCandles({"symbol": mid, "type": "1min"})


# ----------------------------------------------------------------------- no-trade minutes
OMITS = {"binance": False, "okx": False, "bybit": False, "kraken": True, "coinbase": True,
         "kucoin": True}
#: dialects whose ccxt page is a time window (since .. since + limit bars), not a row count
WINDOWED = {"okx", "coinbase", "kucoin"}


def test_minutes_without_trades(dialect: str, clock: FakeClock) -> None:
    sym = SPECS[dialect].symbol
    quiet = {START + 5 * MIN, START + 6 * MIN} | {START + i * MIN for i in range(10, 15)}
    with running(dialect, clock, no_trade={sym: quiet}) as sim:
        ex = client(sim, clock)
        rows = ex.fetch_ohlcv(sym, "1m", since=START, limit=30)
        expected = [list(c) for c in sim.expected_candles(sym, "1m", START, T0)]
        if dialect in WINDOWED:  # an omitted minute shortens the page
            assert rows == [r for r in expected if r[0] < START + 30 * MIN]
        else:  # the page is filled up with later minutes
            assert rows == expected[:30]
        ts = {r[0] for r in rows}
        if OMITS[dialect]:
            assert not ts & quiet
        else:
            assert quiet <= ts
            flat = [r for r in rows if r[0] in quiet]
            assert all(r[5] == 0 and r[1] == r[2] == r[3] == r[4] for r in flat)
            assert all(r[1] == prev[4] for prev, r in itertools.pairwise(rows) if r[0] in quiet)
        # a 5m candle whose every minute is quiet is empty too; one with some trades is not
        five = ex.fetch_ohlcv(sym, "5m", since=START, limit=4)
        by_ts = {r[0]: r for r in five}
        assert (START + 10 * MIN in by_ts) is not OMITS[dialect]
        assert by_ts[START + 5 * MIN][5] > 0
        assert five == [list(c) for c in sim.expected_candles(sym, "5m", START, T0)][:len(five)]


def test_empty_candle_policy_can_be_overridden(dialect: str, clock: FakeClock) -> None:
    sym = SPECS[dialect].symbol
    quiet = {START + 3 * MIN}
    policy = "fill" if OMITS[dialect] else "omit"
    with running(dialect, clock, no_trade={sym: lambda t: t in quiet},
                 empty_candles=policy) as sim:
        rows = client(sim, clock).fetch_ohlcv(sym, "1m", since=START, limit=6)
        assert (START + 3 * MIN in {r[0] for r in rows}) is (policy == "fill")
        assert rows == [list(c) for c in sim.expected_candles(sym, "1m", START, T0)][:len(rows)]


# ---------------------------------------------------------------------------------- reach
def test_reach(dialect: str, clock: FakeClock) -> None:
    """Kraken keeps only the last 720 bars: an older `since` gets those 720. Others reach
    back to the listing."""
    sym = SPECS[dialect].symbol
    early = T0 - 86_400_000
    with running(dialect, clock, history_start_ms=T0 - 2 * 86_400_000) as sim:
        ex = client(sim, clock)
        reach = sim.reachable_from(sym, "1m")
        if dialect == "kraken":
            assert reach == align_down(T0, "1m") - 719 * MIN
            rows = ex.fetch_ohlcv(sym, "1m", since=early)
            assert len(rows) == 720 and rows[0][0] == reach and rows[-1][0] == align_down(T0, "1m")
            expected = sim.expected_candles(sym, "1m", early, T0)
            assert expected[0][0] == reach and len(expected) == 719
            assert rows[:-1] == [list(c) for c in expected]
            # a store that polled since `early` could hold everything from there
            first = sim.expected_candles(sym, "1m", early, T0, reach_at_ms=early)[0][0]
            assert first == align_down(early, "1m") + MIN
        else:
            assert reach == T0 - 2 * 86_400_000 - (T0 - 2 * 86_400_000) % MIN
            rows = ex.fetch_ohlcv(sym, "1m", since=early, limit=3)
            assert rows[0][0] == early - early % MIN + (MIN if early % MIN else 0)


# --------------------------------------------------------------------- clock and headers
TIME_PRECISION_MS = {"kraken": 1000, "coinbase": 1000}


def test_server_time_skew_and_date_header(dialect: str, clock: FakeClock) -> None:
    with running(dialect, clock) as sim:
        ex = client(sim)
        precision = TIME_PRECISION_MS.get(dialect, 1)
        assert ex.fetch_time() == T0 // precision * precision
        sim.set_clock_skew(+90_000)
        skewed = T0 + 90_000
        assert sim.now_ms() == skewed
        assert ex.fetch_time() == skewed // precision * precision
        date = email.utils.parsedate_to_datetime(ex.last_response_headers["Date"])
        assert int(date.timestamp()) == skewed // 1000
        # the exchange's candles follow its own clock: its in-progress candle is skewed's
        ex2 = client(sim, sim.now_ms)
        last = ex2.fetch_ohlcv(SPECS[dialect].symbol, "1m", since=skewed - 2 * MIN, limit=3)[-1]
        assert last[0] == align_down(skewed, "1m")
        sim.update_faults(date_header=False)
        ex.fetch_time()
        assert "Date" not in ex.last_response_headers
        sim.set_clock_skew(-3_600_000)
        assert ex.fetch_time() == (T0 - 3_600_000) // precision * precision


def test_date_header_follows_a_fake_clock(dialect: str, clock: FakeClock) -> None:
    clock.now = 1_600_000_000_000
    with running(dialect, clock, history_start_ms=clock.now - 86_400_000) as sim:
        conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
        try:
            conn.request("GET", "/nowhere")
            r = conn.getresponse()
            r.read()
            assert r.getheader("Date") == "Sun, 13 Sep 2020 12:26:40 GMT"
        finally:
            conn.close()


# ---------------------------------------------------------------------------- misc
def test_request_log_and_cli(dialect: str, clock: FakeClock) -> None:
    log = Log()
    with running(dialect, clock, on_request=log, catalogue=False,
                 symbols=[SPECS[dialect].symbol]) as sim:
        ex = client(sim)
        assert [s for s, m in ex.load_markets().items() if m["spot"]] == [SPECS[dialect].symbol]
        assert log.entries and all(e[2] == 200 for e in log.entries)
        assert sim.stats().total == len(log.entries)
    a = _parse(["--dialect", dialect, "--port", "0"])
    assert a.dialect == dialect


def test_unknown_dialect_is_refused(dialect: str) -> None:
    with pytest.raises(ValueError):
        ExchangeSimulator(dialect=dialect + "x")
