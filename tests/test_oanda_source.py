"""The real `OandaSource` (aiohttp) against the simulated OANDA v20 API on loopback: markets,
a backfill across the weekend (a gap `closed_until` agrees with), only complete candles,
price components, every error class it maps to, the whole-request deadline, and a token that
appears nowhere but in the Authorization header."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import ccxt
import pytest

from candlekeeper.actors.market.candles import TIMEFRAME_MS, validate
from candlekeeper.actors.market.errors import classify
from candlekeeper.actors.sources.base import Page, SourceFailure
from candlekeeper.actors.sources.forex_hours import kind_of, reopens_at
from candlekeeper.actors.sources.oanda import (
    GRANULARITIES,
    PROFILE,
    OandaSettings,
    OandaSource,
    _retry_after,
    first_open,
    instrument_of,
    parse_time,
    symbol_of,
    token_problem,
)
from candlekeeper.simulator import ExchangeSimulator, FaultKind, Faults, OutageMode, PoisonKind
from candlekeeper.simulator.dialects.oanda import market_closed

NY = ZoneInfo("America/New_York")
MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
TOKEN = "tok-3f9a1c0d2b7e44e1a6"
T = TypeVar("T")


def ny(*args: int) -> int:
    return int(datetime(*args, tzinfo=NY).timestamp()) * 1000  # type: ignore[misc]


FRIDAY_CLOSE = ny(2023, 11, 10, 17, 0)  # 22:00 UTC
SUNDAY_OPEN = ny(2023, 11, 12, 17, 0)
NOW = ny(2023, 11, 13, 5, 0) + 30_123  # Monday, mid-candle
HISTORY_START = FRIDAY_CLOSE - 10 * DAY


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@contextmanager
def oanda(clock: Clock | None = None, **kwargs: Any) -> Iterator[ExchangeSimulator]:
    kwargs.setdefault("history_start_ms", HISTORY_START)
    options = {"token": TOKEN, **kwargs.pop("dialect_options", {})}
    kwargs.setdefault("monotonic", lambda: 1000.0)
    with ExchangeSimulator(dialect="oanda", now_ms=clock or Clock(), dialect_options=options,
                           **kwargs) as sim:
        yield sim


def source(sim: ExchangeSimulator, token: str | None = TOKEN, **settings: Any) -> OandaSource:
    settings.setdefault("timeout", 2.0)
    env = {} if token is None else {"OANDA_TOKEN": token}
    return OandaSource(OandaSettings(api_base=sim.url, **settings), environ=env)


def run(src: OandaSource, use: Callable[[OandaSource], Awaitable[T]]) -> T:
    """Run `use(src)` on a fresh loop, closing the source's session after."""
    async def main() -> T:
        try:
            return await use(src)
        finally:
            await src.close()
    return asyncio.run(main())


def failure(src: OandaSource, use: Callable[[OandaSource], Awaitable[Any]]) -> SourceFailure:
    with pytest.raises(SourceFailure) as info:
        run(src, use)
    return info.value


async def backfill(src: OandaSource, symbol: str, timeframe: str, since: int, limit: int,
                   end: int = NOW) -> tuple[list[list[Any]], int]:
    """Page forward the way a series backfills a "window" exchange: [since, since + limit
    candles), then the next window, until `end`. Returns (rows, pages)."""
    tf = TIMEFRAME_MS[timeframe]
    rows: list[list[Any]] = []
    pages = 0
    while since < end:
        until = since + limit * tf
        page = await src.fetch_ohlcv(symbol, timeframe, since, limit, until)
        assert all(since <= r[0] < until for r in page.rows)
        rows += page.rows
        pages += 1
        since = until
    return rows, pages


def expected(sim: ExchangeSimulator, symbol: str, tf: str, start: int, end: int, **kw: Any) -> list[list[Any]]:
    return [list(r) for r in sim.expected_candles(symbol, tf, start, end, **kw)]


# ---------------------------------------------------------------------------- markets
def test_markets_come_from_the_tokens_account() -> None:
    with oanda(symbols=["EUR/NOK"]) as sim:
        src = source(sim)
        markets = run(src, lambda s: s.load_markets())
        assert set(markets) == set(sim.markets())
        assert {"EUR/USD", "USD/JPY", "XAU/USD", "SPX500/USD", "EUR/NOK"} <= set(markets)
        assert markets["EUR/USD"].symbol == "EUR/USD" and markets["EUR/USD"].listed_ms is None
        paths = [p for p in sim.stats().by_path]
        assert paths == ["/v3/accounts", "/v3/accounts/101-004-1234567-001/instruments"]


def test_a_configured_account_is_used_as_is() -> None:
    with oanda(dialect_options={"account_id": "001-011-7654321-002"}) as sim:
        assert run(source(sim, account_id="001-011-7654321-002"), lambda s: s.load_markets())
        assert list(sim.stats().by_path) == ["/v3/accounts/001-011-7654321-002/instruments"]
        err = failure(source(sim, account_id="001-011-0000000-001"), lambda s: s.load_markets())
        assert type(err.error) is ccxt.PermissionDenied and not classify(err.error).retryable


def test_the_instrument_type_decides_the_market_hours() -> None:
    with oanda() as sim:
        src = source(sim)
        run(src, lambda s: s.load_markets())
        tuesday_break = ny(2023, 11, 14, 17, 30)
        assert src.closed_until("XAU/USD", tuesday_break) == ny(2023, 11, 14, 18, 0)
        assert src.closed_until("EUR/USD", tuesday_break) is None
        assert src._types["SPX500/USD"] == "CFD"


# ---------------------------------------------------------------------------- candles
def test_backfill_across_the_weekend_is_exact_and_the_gap_is_the_closed_market() -> None:
    with oanda() as sim:
        src = source(sim)
        since = FRIDAY_CLOSE - 6 * HOUR
        rows, pages = run(src, lambda s: backfill(s, "EUR/USD", "1m", since, 500))
        want = expected(sim, "EUR/USD", "1m", since, NOW)
        assert rows == want and len(rows) == 360 + 720  # Friday, then since Sunday's open
        assert pages == 8  # 66 hours of 500-minute windows, the weekend's mostly empty
        assert validate(rows, MIN, NOW)  # the daemon's own validation accepts every row
        times = [r[0] for r in rows]
        assert FRIDAY_CLOSE - MIN in times and SUNDAY_OPEN in times
        assert not [t for t in times if FRIDAY_CLOSE <= t < SUNDAY_OPEN]
        # every missing minute is closed until Sunday's open; every served one is open
        for t in range(FRIDAY_CLOSE, SUNDAY_OPEN, MIN):
            assert src.closed_until("EUR/USD", t) == SUNDAY_OPEN
        for t in times:
            assert src.closed_until("EUR/USD", t) is None
        assert all(r[5] == int(r[5]) > 0 for r in rows)  # tick volume
        # a window inside the weekend: asked once, answered empty, and the source says why
        saturday = FRIDAY_CLOSE + 12 * HOUR
        before = sim.stats().total
        page = run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", saturday, 500, saturday + 500 * MIN))
        assert page.rows == [] and sim.stats().total == before + 1
        assert src.closed_until("EUR/USD", saturday) == SUNDAY_OPEN


@pytest.mark.parametrize("timeframe", ["1h", "4h", "1d", "1w"])
def test_longer_timeframes_align_like_the_daemon_expects(timeframe: str) -> None:
    with oanda() as sim:
        since = HISTORY_START
        rows, _ = run(source(sim), lambda s: backfill(s, "GBP/USD", timeframe, since, 5000))
        assert rows == expected(sim, "GBP/USD", timeframe, since, NOW)
        assert rows
        if timeframe == "1w":
            assert all(datetime.fromtimestamp(r[0] / 1000, UTC).weekday() == 0 for r in rows)
        if timeframe == "1d":  # no Saturday candle
            assert all(datetime.fromtimestamp(r[0] / 1000, UTC).weekday() != 5 for r in rows)


@pytest.mark.parametrize(("timeframe", "span"), [
    ("5s", HOUR), ("10s", HOUR), ("15s", HOUR), ("30s", 2 * HOUR), ("2m", DAY), ("4m", DAY), ("10m", DAY),
    ("3h", 8 * DAY),
])
def test_seconds_and_odd_lengths_are_served_as_the_daemon_expects(timeframe: str, span: int) -> None:
    """S5..S30, M2, M4, M10 and H3: every closed candle once, across the weekend for H3, on the
    daemon's alignment (the validator accepts them)."""
    with oanda() as sim:
        since = NOW - span
        rows, _ = run(source(sim), lambda s: backfill(s, "EUR/USD", timeframe, since, 5000))
        assert rows and rows == expected(sim, "EUR/USD", timeframe, since, NOW)
        assert [list(c) for c in validate(rows, TIMEFRAME_MS[timeframe], NOW)] == rows


def test_only_complete_candles_become_rows() -> None:
    with oanda() as sim:
        rows = run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW - 5 * MIN, 100, None)).rows
        assert [r[0] for r in rows] == [NOW - NOW % MIN - i * MIN for i in (4, 3, 2, 1)]
        assert rows == expected(sim, "EUR/USD", "1m", NOW - 5 * MIN, NOW)
    with oanda(dialect_options={"complete_lag_ms": 45_000}) as sim:  # closed 30 s ago, not complete
        rows = run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW - 5 * MIN, 100, None)).rows
        assert [r[0] for r in rows] == [NOW - NOW % MIN - i * MIN for i in (4, 3, 2)]


def test_until_bounds_the_window_and_the_count() -> None:
    log: list[dict[str, str]] = []
    with oanda(on_request=lambda path, params, status, fault: log.append(dict(params))) as sim:
        since = NOW - HOUR - NOW % MIN + 20_000  # not aligned: starts at the next candle
        page = run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", since, 1000, since + 10 * MIN))
        first = since - 20_000 + MIN
        assert [r[0] for r in page.rows] == [first + i * MIN for i in range(10)]
        assert log[-1]["count"] == "10" and log[-1]["from"] == str(first // 1000)
        assert log[-1]["includeFirst"] == "true" and log[-1]["alignmentTimezone"] == "UTC"
        page = run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", since, 1000, since))
        assert page.rows == [] and len(log) == 1  # an empty window asks nothing
        run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", HISTORY_START, 99_999, None))
        assert log[-1]["count"] == "5000"


def test_concurrent_fetches_share_a_few_kept_alive_connections() -> None:
    open_conns: list[int] = []
    with oanda() as sim:
        sim.add_request_hook(lambda *_: open_conns.append(len(sim._httpd._conns)))
        src = source(sim, connections=2)

        async def many(s: OandaSource) -> list[Page]:
            symbols = ["EUR/USD", "USD/JPY", "GBP/USD", "AUD/USD", "XAU/USD"] * 4
            return await asyncio.gather(*(s.fetch_ohlcv(sym, "1m", NOW - HOUR, 60, None) for sym in symbols))

        pages = run(src, many)
        assert [len(p.rows) for p in pages] == [59] * 20  # NOW - HOUR is mid-candle: 59 closed since
        assert len(open_conns) == 20 and max(open_conns) <= 2


@pytest.mark.parametrize("price", ["M", "B", "A"])
def test_the_configured_price_component_is_stored(price: str) -> None:
    with oanda() as sim:
        since = NOW - HOUR
        rows = run(source(sim, price=price), lambda s: s.fetch_ohlcv("USD/JPY", "1m", since, 100, None)).rows
        assert rows == expected(sim, "USD/JPY", "1m", since, NOW, price=price)
        mid = expected(sim, "USD/JPY", "1m", since, NOW)
        sign = {"M": 0, "B": -1, "A": 1}[price]
        assert all((r[4] > m[4]) - (r[4] < m[4]) == sign for r, m in zip(rows, mid, strict=True))


def test_a_from_ahead_of_oandas_clock_is_an_empty_page() -> None:
    with oanda() as sim:
        page = run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW + 2 * MIN, 10, None))
        assert page.rows == [] and page.answer.server_ms == NOW - NOW % 1000


def test_heartbeat_reads_the_servers_clock() -> None:
    with oanda() as sim:
        sim.set_clock_skew(-3_000)
        answer = run(source(sim), lambda s: s.heartbeat())
        assert answer.server_ms == (NOW - 3_000) // 1000 * 1000
        assert list(sim.stats().by_path) == ["/v3/accounts"]


def test_poisoned_pages_reach_the_validator_or_fail_as_bad_symbol() -> None:
    with oanda() as sim:
        src_rows = lambda: run(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW - HOUR, 10, None)).rows  # noqa: E731
        sim.poison("EUR/USD", PoisonKind.EMPTY)
        assert src_rows() == []
        sim.poison("EUR/USD", PoisonKind.NULLS)
        assert src_rows()[0][1:] == [None] * 5
        sim.poison("EUR/USD", PoisonKind.INVERTED)
        rows = src_rows()
        assert rows and all(r[2] < r[3] for r in rows)
        for kind in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
            sim.poison("EUR/USD", kind)
            err = failure(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW - HOUR, 10, None))
            assert type(err.error) is ccxt.BadSymbol


# ----------------------------------------------------------------------------- errors
def test_unauthorized_is_a_config_problem_asked_once() -> None:
    with oanda() as sim:
        err = failure(source(sim, token="not-the-token"), lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW - HOUR, 10, None))
        assert type(err.error) is ccxt.AuthenticationError
        assert "401" in str(err.error) and "Insufficient authorization" in str(err.error)
        assert not classify(err.error).retryable and not classify(err.error).against_exchange
        assert sim.stats().total == 1  # no retry inside the source
        err = failure(source(sim, token=None), lambda s: s.load_markets())
        assert type(err.error) is ccxt.AuthenticationError and "OANDA_TOKEN is not set" in str(err.error)
        assert sim.stats().total == 1  # nothing sent without a token


def test_rate_limited_with_retry_after() -> None:
    with oanda(faults=Faults(rates={FaultKind.HTTP_429: 1.0}, retry_after_s=7)) as sim:
        err = failure(source(sim), lambda s: s.heartbeat())
        assert type(err.error) is ccxt.RateLimitExceeded and err.retry_after == 7.0
        assert classify(err.error).rate_limited and err.answer.server_ms is not None
    with oanda() as sim:
        sim.set_rate_limit(1)
        async def twice(s: OandaSource) -> None:
            await s.heartbeat()
            await s.heartbeat()
        err = failure(source(sim), twice)
        assert type(err.error) is ccxt.RateLimitExceeded and err.retry_after == 1.0


@pytest.mark.parametrize(("faults", "cls"), [
    (Faults(rates={FaultKind.HTTP_500: 1.0}), ccxt.ExchangeNotAvailable),
    (Faults(rates={FaultKind.HTTP_502: 1.0}), ccxt.ExchangeNotAvailable),
    (Faults(rates={FaultKind.HTTP_503: 1.0}), ccxt.ExchangeNotAvailable),
    (Faults(outage=OutageMode.HTTP_503), ccxt.ExchangeNotAvailable),
    (Faults(rates={FaultKind.HTTP_504: 1.0}), ccxt.RequestTimeout),
    (Faults(rates={FaultKind.HTTP_418: 1.0}), ccxt.RateLimitExceeded),
    (Faults(rates={FaultKind.RESET: 1.0}), ccxt.NetworkError),
    (Faults(outage=OutageMode.RESET), ccxt.NetworkError),
    (Faults(outage=OutageMode.REFUSE), ccxt.NetworkError),
    (Faults(rates={FaultKind.SHORT_READ: 1.0}), ccxt.NetworkError),
    (Faults(rates={FaultKind.TRUNCATED: 1.0}), ccxt.BadResponse),
    (Faults(rates={FaultKind.STALL: 1.0}, stall_s=30), ccxt.RequestTimeout),
    (Faults(rates={FaultKind.TRICKLE: 1.0}, trickle_bytes_per_s=20), ccxt.RequestTimeout),
])
def test_faults_map_to_the_classifiers_vocabulary(faults: Faults, cls: type[Exception]) -> None:
    slow = FaultKind.STALL in faults.rates or FaultKind.TRICKLE in faults.rates
    with oanda(faults=faults) as sim:
        for use in (lambda s: s.load_markets(), lambda s: s.heartbeat(),
                    lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW - HOUR, 10, None)):
            err = failure(source(sim, timeout=0.3 if slow else 5.0), use)
            assert type(err.error) is cls, err
            assert classify(err.error).retryable
        # one request each (a refused one is never counted), but aiohttp sends an idempotent
        # request again, once, when its connection is reset (RFC 9112's retry)
        resets = (FaultKind.RESET, OutageMode.RESET)
        reset = faults.outage in resets or FaultKind.RESET in faults.rates
        assert sim.stats().total <= (6 if reset else 3)


def test_requests_the_exchange_refuses() -> None:
    with oanda() as sim:
        err = failure(source(sim), lambda s: s.fetch_ohlcv("NOK/SEK", "1m", NOW - HOUR, 10, None))
        assert type(err.error) is ccxt.BadSymbol and "'instrument'" in str(err.error)
        err = failure(source(sim), lambda s: s.fetch_ohlcv("EUR/USD", "3m", NOW - HOUR, 10, None))
        assert type(err.error) is ccxt.NotSupported
        err = failure(source(sim), lambda s: s.fetch_ohlcv("BTC/USDT:USDT", "1m", NOW - HOUR, 10, None))
        assert type(err.error) is ccxt.BadSymbol
        assert sim.stats().total == 1  # the last two never reached the exchange
        for e in (ccxt.BadSymbol("x"), ccxt.NotSupported("x")):
            assert not classify(e).retryable


# ------------------------------------------------------------------------------ token
def test_the_token_appears_in_no_log_repr_or_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    scenarios = [
        Faults(rates={FaultKind.HTTP_500: 1.0}), Faults(rates={FaultKind.HTTP_429: 1.0}),
        Faults(rates={FaultKind.RESET: 1.0}), Faults(rates={FaultKind.TRUNCATED: 1.0}),
        Faults(rates={FaultKind.STALL: 1.0}, stall_s=30), Faults(outage=OutageMode.REFUSE),
        Faults(),
    ]
    for faults in scenarios:
        for token in (TOKEN, TOKEN[::-1]):  # right and wrong
            with oanda(faults=faults) as sim:
                src = source(sim, token=token, timeout=0.1 if FaultKind.STALL in faults.rates else 5.0)
                seen += [repr(src), str(src), repr(src.settings)]
                for use in (lambda s: s.load_markets(), lambda s: s.heartbeat(),
                            lambda s: s.fetch_ohlcv("EUR/USD", "1m", NOW - HOUR, 10, None),
                            lambda s: s.fetch_ohlcv("NOPE/USD", "1m", NOW - HOUR, 10, None)):
                    try:
                        run(src, use)
                    except SourceFailure as e:
                        seen += [str(e), repr(e), str(e.error), repr(e.error), repr(e.answer),
                                 "".join(traceback.format_exception(e))]
                        assert e.__cause__ is None and e.error.__cause__ is None
                        assert e.error.__context__ is None
    assert len(seen) > 100
    for text in [*seen, caplog.text]:
        assert TOKEN not in text and TOKEN[::-1] not in text


def test_settings_are_checked_and_the_token_problem_is_named_not_shown() -> None:
    with pytest.raises(ValueError, match="environment"):
        OandaSettings(environment="sandbox")
    with pytest.raises(ValueError, match=r"price must be one of M, B, A, got 'BA' \(a candle row holds one price"):
        OandaSettings(price="BA")
    with pytest.raises(ValueError, match=r"price must be one of M, B, A, got 'X'$"):
        OandaSettings(price="X")
    with pytest.raises(ValueError, match="timeout"):
        OandaSettings(timeout=0)
    assert OandaSettings().base_url == "https://api-fxpractice.oanda.com"
    assert OandaSettings(environment="live").base_url == "https://api-fxtrade.oanda.com"
    assert OandaSettings(environment="live", api_base="http://127.0.0.1:9/").base_url == "http://127.0.0.1:9"
    assert token_problem("OANDA_TOKEN", {}) == "environment variable OANDA_TOKEN is not set"
    assert token_problem("OANDA_TOKEN", {"OANDA_TOKEN": " "}) == "environment variable OANDA_TOKEN is empty"
    assert token_problem("OANDA_TOKEN", {"OANDA_TOKEN": TOKEN}) is None


# ------------------------------------------------------------------- pure helpers
def test_names_granularities_and_times() -> None:
    assert instrument_of("EUR/USD") == "EUR_USD" and symbol_of("EUR_USD") == "EUR/USD"
    assert instrument_of("SPX500/USD") == "SPX500_USD" and symbol_of("XAU_USD") == "XAU/USD"
    assert symbol_of("EURUSD") is None and symbol_of("A_B_C") is None
    for bad in ("EURUSD", "BTC/USDT:USDT", "/USD", "EUR/"):
        with pytest.raises(ValueError):
            instrument_of(bad)
    # every OANDA granularity of fixed length; not M (a month): a series steps by one fixed length
    assert list(GRANULARITIES.values()) == ["S5", "S10", "S15", "S30", "M1", "M2", "M4", "M5", "M10", "M15", "M30",
                                            "H1", "H2", "H3", "H4", "H6", "H8", "H12", "D", "W"]
    assert set(GRANULARITIES) <= set(TIMEFRAME_MS) and "M" not in GRANULARITIES.values()
    assert first_open(NOW, MIN) == NOW - NOW % MIN + MIN and first_open(NOW - NOW % MIN, MIN) == NOW - NOW % MIN
    monday = first_open(NOW - 3 * DAY, 7 * DAY)
    assert datetime.fromtimestamp(monday / 1000, UTC).weekday() == 0 and monday >= NOW - 3 * DAY
    assert parse_time("1699869600.123000000") == parse_time("2023-11-13T10:00:00.123456789Z") == 1_699_869_600_123
    date = "Wed, 15 Nov 2023 00:00:40 GMT"
    server = int(datetime(2023, 11, 15, 0, 0, 30, tzinfo=UTC).timestamp()) * 1000
    assert _retry_after({"retry-after": date}, server) == 10.0
    assert _retry_after({"retry-after": date}, None) is None  # whose clock? unknown
    assert _retry_after({"retry-after": "2"}, None) == 2.0 and _retry_after({}, server) is None
    assert PROFILE.page_limit == 5000 and PROFILE.paging == "window" and PROFILE.omits_empty
    assert PROFILE.rate == 100.0 and PROFILE.reach is None


def test_market_hours_agree_with_the_simulators_model_across_dst() -> None:
    """Every minute of two weeks around each New York DST change, for currencies and metals:
    the source's rule says closed exactly when the simulated exchange has no market, and the
    reopening it names is the first open minute."""
    for start in (datetime(2024, 3, 4, tzinfo=NY), datetime(2024, 10, 28, tzinfo=NY)):
        t0 = int(start.timestamp()) * 1000
        for symbol, metal in (("EUR/USD", False), ("XAU/USD", True)):
            kind = kind_of(symbol)
            reopen_seen = None
            for t in range(t0, t0 + 14 * DAY, MIN):
                r = reopens_at(t, kind)
                assert (r is not None) == market_closed(t, metal), (symbol, t)
                if r is not None and r != reopen_seen:
                    assert not market_closed(r, metal) and market_closed(r - MIN, metal)
                    reopen_seen = r
    assert kind_of("XAG/USD") == "metal" and kind_of("SPX500/USD") == "cfd" and kind_of("USD/JPY") == "currency"
    assert kind_of("SPX500/USD", "CURRENCY") == "currency"
    # the weekend, in UTC, moves with daylight saving
    summer_friday = int(datetime(2024, 7, 12, 21, 0, tzinfo=UTC).timestamp()) * 1000
    assert reopens_at(summer_friday - MIN, "currency") is None
    assert reopens_at(summer_friday, "currency") == summer_friday + 2 * DAY
    assert timedelta(milliseconds=reopens_at(summer_friday, "metal") - summer_friday) == timedelta(days=2, hours=1)


def test_the_source_satisfies_the_protocol_shape() -> None:
    src = OandaSource(OandaSettings(), environ={"OANDA_TOKEN": TOKEN})
    assert src.profile is PROFILE and src.pending("EUR/USD") is False
    assert isinstance(asyncio.run(_closed(src)), type(None))
    assert isinstance(Page([]), Page)


async def _closed(src: OandaSource) -> None:
    await src.close()  # never opened: nothing to do
    await src.close()
