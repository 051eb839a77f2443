"""The OANDA v20 dialect over plain HTTP: auth, accounts and instruments, the candles endpoint's
parameters and limits, the `complete` flag, closed-market gaps, price components, the rate
limit and every injected fault in OANDA's error shape. (The real client, `OandaSource`, is
tested against it in test_oanda_source.py.)"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import pytest

from candlekeeper.simulator import ExchangeSimulator, FaultKind, Faults, OutageMode, PoisonKind
from candlekeeper.simulator.__main__ import _parse
from candlekeeper.simulator.dialects.oanda import GRANULARITIES, format_time, market_closed, parse_time

NY = ZoneInfo("America/New_York")
MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
TOKEN = "sim-token-7c1e"
ACCOUNT = "101-004-1234567-001"
UTC_ALIGN = {"alignmentTimezone": "UTC", "dailyAlignment": "0", "weeklyAlignment": "Monday"}


def ny(*args: int) -> int:
    """UTC ms of a New York wall time."""
    return int(datetime(*args, tzinfo=NY).timestamp()) * 1000  # type: ignore[misc]


# Monday 2023-11-13 05:00:30.123 New York (10:00:30 UTC, after the November DST change)
NOW = ny(2023, 11, 13, 5, 0) + 30_123
FRIDAY_NOON_UTC = ny(2023, 11, 10, 7, 0)  # 12:00 UTC


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@contextmanager
def oanda(clock: Clock | None = None, **kwargs: Any) -> Iterator[ExchangeSimulator]:
    kwargs.setdefault("history_start_ms", FRIDAY_NOON_UTC - 7 * DAY)
    options = {"token": TOKEN, **kwargs.pop("dialect_options", {})}
    with ExchangeSimulator(dialect="oanda", now_ms=clock or Clock(), dialect_options=options,
                           **kwargs) as sim:
        yield sim


def get(sim: ExchangeSimulator, path: str, params: dict[str, Any] | None = None, *,
        token: str | None = TOKEN, unix: bool = True) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON or raw text)."""
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if unix:
        headers["Accept-Datetime-Format"] = "UNIX"
    try:
        conn.request("GET", path + (f"?{urlencode(params)}" if params else ""), headers=headers)
        r = conn.getresponse()
        raw = r.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def candles(sim: ExchangeSimulator, instrument: str = "EUR_USD", **params: Any) -> tuple[int, Any]:
    params.setdefault("granularity", "M1")
    status, _, body = get(sim, f"/v3/instruments/{instrument}/candles", params)
    return status, body


def times(body: dict) -> list[int]:
    return [parse_time(c["time"]) for c in body["candles"]]


# --------------------------------------------------------------------------------- auth
def test_every_request_needs_the_bearer_token() -> None:
    with oanda() as sim:
        for token in (None, "wrong", ""):
            status, _, body = get(sim, "/v3/accounts", token=token)
            assert status == 401
            assert body == {"errorMessage": "Insufficient authorization to perform request."}
        assert get(sim, "/v3/accounts")[0] == 200
        assert TOKEN not in repr(sim.dialect)


def test_without_a_configured_token_any_bearer_token_passes() -> None:
    with oanda(dialect_options={"token": None}) as sim:
        assert get(sim, "/v3/accounts", token="anything")[0] == 200
        assert get(sim, "/v3/accounts", token=None)[0] == 401


# ------------------------------------------------------------------- accounts, instruments
def test_accounts_and_instruments() -> None:
    with oanda(symbols=["EUR/NOK"]) as sim:
        status, headers, body = get(sim, "/v3/accounts")
        assert status == 200 and body == {"accounts": [{"id": ACCOUNT, "tags": []}]}
        assert headers["requestid"].isdigit()
        status, _, body = get(sim, f"/v3/accounts/{ACCOUNT}/instruments")
        assert status == 200
        by_name = {i["name"]: i for i in body["instruments"]}
        assert set(by_name) == {sim.market_id(s) for s in sim.markets()}
        assert {"EUR_USD", "USD_JPY", "XAU_USD", "SPX500_USD", "EUR_NOK"} <= set(by_name)
        assert by_name["EUR_USD"]["type"] == "CURRENCY" and by_name["EUR_USD"]["displayPrecision"] == 5
        assert by_name["USD_JPY"]["pipLocation"] == -2 and by_name["USD_JPY"]["displayPrecision"] == 3
        assert by_name["XAU_USD"]["type"] == "METAL" and by_name["SPX500_USD"]["type"] == "CFD"
        assert by_name["EUR_USD"]["displayName"] == "EUR/USD"
        status, _, body = get(sim, f"/v3/accounts/{ACCOUNT}/instruments", {"instruments": "EUR_USD,XAU_USD"})
        assert [i["name"] for i in body["instruments"]] == ["EUR_USD", "XAU_USD"]
        status, _, body = get(sim, "/v3/accounts/101-004-9999999-001/instruments")
        assert status == 403 and body == {"errorMessage": "The provided request was forbidden."}


def test_realistic_forex_levels_and_calm_moves() -> None:
    levels = {"EUR_USD": 1.08, "USD_JPY": 150, "GBP_USD": 1.27, "AUD_USD": 0.66, "XAU_USD": 2400}
    with oanda() as sim:
        for name, level in levels.items():
            status, body = candles(sim, name, count=60)
            assert status == 200
            for c in body["candles"]:
                mid = {k: float(v) for k, v in c["mid"].items()}
                assert level * 0.8 < mid["c"] < level * 1.2, (name, mid)
                assert (mid["h"] - mid["l"]) / mid["c"] < 0.002, (name, mid)  # pips, not percent


# ---------------------------------------------------------------------------- candles
def test_from_and_count_page_forward_oldest_first() -> None:
    with oanda() as sim:
        start = NOW - 3 * HOUR - (NOW % MIN)
        status, body = candles(sim, **{"from": start // 1000, "count": 7})
        assert status == 200 and body["instrument"] == "EUR_USD" and body["granularity"] == "M1"
        assert times(body) == [start + i * MIN for i in range(7)]
        assert all(c["complete"] is True and isinstance(c["volume"], int) for c in body["candles"])
        # includeFirst=false skips the candle covering `from` (aligned or not)
        for frm in (start, start + 17_000):
            _, body = candles(sim, **{"from": frm / 1000, "count": 2, "includeFirst": "false"})
            assert times(body) == [start + MIN, start + 2 * MIN]
        _, body = candles(sim, **{"from": (start + 17_000) / 1000, "count": 1})
        assert times(body) == [start]


def test_count_limits_and_parameter_errors() -> None:
    with oanda() as sim:
        status, body = candles(sim, count=5000)
        assert status == 200 and len(body["candles"]) == 5000  # the newest 5000, gaps skipped
        assert body["candles"][-1]["complete"] is False
        assert candles(sim)[1]["candles"].__len__() == 500  # default count
        start = NOW - 2 * HOUR
        bad = [
            {"count": 5001}, {"count": 0}, {"count": "x"}, {"granularity": "M7"},
            {"granularity": "M"}, {"granularity": "H3"}, {"price": "X"}, {"price": "MM"},
            {"from": "yesterday"}, {"from": (NOW + MIN) // 1000}, {"to": (NOW + MIN) // 1000},
            {"from": start // 1000, "to": NOW // 1000, "count": 10},
            {"from": (NOW - 5000 * MIN) // 1000, "to": NOW // 1000},
            {"includeFirst": "maybe"}, {"dailyAlignment": 24}, {"alignmentTimezone": "Mars/Olympus"},
            {"weeklyAlignment": "Caturday"}, {"smooth": "true"},
            {"granularity": "H4"},  # default alignment (17:00 New York) is not modelled
            {"granularity": "W", "alignmentTimezone": "UTC", "dailyAlignment": 0},  # Friday weeks
        ]
        for params in bad:
            status, body = candles(sim, **params)
            assert status == 400, params
            assert set(body) == {"errorMessage"} and body["errorMessage"].startswith("Invalid value"), params
        _, body = candles(sim, **{"to": (NOW + MIN) // 1000})
        assert body["errorMessage"] == "Invalid value specified for 'to'. Time is in the future"
        status, body = candles(sim, "NOPE_USD")
        assert (status, body) == (400, {"errorMessage": "Invalid value specified for 'instrument'"})
        _, body = candles(sim, granularity="M", **UTC_ALIGN)
        assert "not modelled" in body["errorMessage"]  # a calendar month
        # the alignment the daemon sends is accepted for every granularity it maps
        for g in GRANULARITIES:
            assert candles(sim, granularity=g, count=3, **UTC_ALIGN)[0] == 200, g


@pytest.mark.parametrize(("granularity", "length"), [
    ("S5", 5_000), ("S10", 10_000), ("S15", 15_000), ("S30", 30_000),
    ("M2", 2 * MIN), ("M4", 4 * MIN), ("M10", 10 * MIN), ("H3", 3 * HOUR),
])
def test_seconds_and_odd_lengths_open_on_multiples_of_their_length(granularity: str, length: int) -> None:
    """S5..S30 open on multiples of their length within the minute, M2/M4/M10 within the hour,
    H3 (UTC-aligned, as the daemon asks) from midnight UTC: all on multiples since the epoch.
    A `from` between two opens starts at the candle covering it; the last is in progress."""
    with oanda() as sim:
        frm = NOW - 3 * length - 1_234  # Monday: the market is open throughout
        status, body = candles(sim, granularity=granularity, count=30, **{"from": frm / 1000}, **UTC_ALIGN)
        assert status == 200 and body["granularity"] == granularity
        got = times(body)
        assert got[0] == frm - frm % length
        assert got == [got[0] + i * length for i in range(len(got))]  # no quiet interval on EUR/USD here
        assert got[-1] == NOW - NOW % length  # the candle in progress
        assert [c["complete"] for c in body["candles"]] == [True] * (len(got) - 1) + [False]
        interval = GRANULARITIES[granularity]
        closed = sim.expected_candles("EUR/USD", interval, got[0], got[-1] + length)
        assert [(t, float(c["mid"]["o"]), float(c["mid"]["c"])) for t, c in zip(got, body["candles"], strict=False)
                if c["complete"]] == [(r[0], r[1], r[4]) for r in closed]


def test_from_and_to_is_a_closed_window_to_and_count_the_newest() -> None:
    with oanda() as sim:
        start = NOW - 2 * HOUR - NOW % MIN
        _, body = candles(sim, **{"from": start // 1000, "to": (start + 10 * MIN) // 1000})
        assert times(body) == [start + i * MIN for i in range(11)]
        _, body = candles(sim, **{"to": (start + 10 * MIN) // 1000, "count": 3})
        assert times(body) == [start + 8 * MIN, start + 9 * MIN, start + 10 * MIN]
        _, body = candles(sim, count=2)
        assert times(body) == [NOW - NOW % MIN - MIN, NOW - NOW % MIN]


def test_complete_flag_marks_the_candle_in_progress_and_may_lag() -> None:
    with oanda() as sim:
        _, body = candles(sim, count=3)
        assert [c["complete"] for c in body["candles"]] == [True, True, False]
    with oanda(dialect_options={"complete_lag_ms": 40_000}) as sim:
        _, body = candles(sim, count=3)  # 30 s after the last close: not complete yet
        assert [c["complete"] for c in body["candles"]] == [True, False, False]


def test_time_formats_follow_accept_datetime_format() -> None:
    with oanda() as sim:
        start = NOW - HOUR - NOW % MIN
        _, _, body = get(sim, "/v3/instruments/EUR_USD/candles",
                         {"granularity": "M1", "count": 1, "from": format_time(start, False)}, unix=False)
        assert body["candles"][0]["time"] == datetime.fromtimestamp(start / 1000, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.000000000Z")
        _, body = candles(sim, count=1, **{"from": format_time(start, True)})
        assert body["candles"][0]["time"] == f"{start // 1000}.000000000"
    assert parse_time("2023-11-13T10:00:00.123456789Z") == parse_time("1699869600.123")
    assert parse_time("2023-11-13T10:00:00+00:00") == 1_699_869_600_000


def test_price_components_bid_mid_ask() -> None:
    with oanda() as sim:
        _, body = candles(sim, count=20, price="BAM")
        for c in body["candles"]:
            for k in "ohlc":
                b, m, a = (float(c[side][k]) for side in ("bid", "mid", "ask"))
                assert b < m < a
                assert abs((a - b) - 2 * 0.00006) < 1e-9  # ~1.2 pips of spread on EUR/USD
        _, body = candles(sim, count=2, price="B")
        assert set(body["candles"][0]) == {"complete", "volume", "time", "bid"}
        start = NOW - HOUR - NOW % MIN
        for price in ("M", "B", "A"):
            _, body = candles(sim, price=price, count=5, **{"from": start // 1000})
            key = {"M": "mid", "B": "bid", "A": "ask"}[price]
            served = [(parse_time(c["time"]), *(float(c[key][k]) for k in "ohlc"), float(c["volume"]))
                      for c in body["candles"]]
            assert served == sim.expected_candles("EUR/USD", "1m", start, start + 5 * MIN, price=price)


# ----------------------------------------------------------------------- market hours
def test_no_candles_while_the_market_is_closed() -> None:
    """Friday 17:00 to Sunday 17:00 New York: M1 pages jump the weekend, D has no Saturday,
    the expected candles leave it out too."""
    with oanda() as sim:
        friday_close, sunday_open = ny(2023, 11, 10, 17, 0), ny(2023, 11, 12, 17, 0)
        _, body = candles(sim, **{"from": (friday_close - 3 * MIN) // 1000, "count": 6})
        assert times(body) == [friday_close - 3 * MIN, friday_close - 2 * MIN, friday_close - MIN,
                               sunday_open, sunday_open + MIN, sunday_open + 2 * MIN]
        _, body = candles(sim, **{"from": (friday_close + HOUR) // 1000,
                                  "to": (sunday_open - MIN) // 1000})
        assert body["candles"] == []
        _, body = candles(sim, granularity="D", count=10, **UTC_ALIGN)
        days = [datetime.fromtimestamp(t / 1000, UTC).strftime("%a") for t in times(body)]
        assert "Sat" not in days and "Sun" in days and "Fri" in days
        expected = sim.expected_candles("EUR/USD", "1m", friday_close - HOUR, sunday_open + HOUR)
        assert len(expected) == 120
        assert all(not friday_close <= row[0] < sunday_open for row in expected)


def test_metals_break_daily_and_reopen_an_hour_later_on_sunday() -> None:
    with oanda(Clock(ny(2023, 11, 15, 12, 0))) as sim:  # a Wednesday
        tuesday_break = ny(2023, 11, 14, 17, 0)
        _, body = candles(sim, "XAU_USD", count=3, **{"from": (tuesday_break - 2 * MIN) // 1000})
        assert times(body) == [tuesday_break - 2 * MIN, tuesday_break - MIN, tuesday_break + HOUR]
        _, body = candles(sim, "EUR_USD", count=3, **{"from": (tuesday_break - 2 * MIN) // 1000})
        assert times(body)[-1] == tuesday_break  # currencies do not break
        sunday = ny(2023, 11, 12, 17, 0)
        _, body = candles(sim, "XAU_USD", count=1, **{"from": (sunday - MIN) // 1000})
        assert times(body) == [sunday + HOUR]


@pytest.mark.parametrize(("when", "close_utc"), [((2023, 7, 14), 21), ((2023, 12, 15), 22)])
def test_the_weekend_moves_with_new_york_daylight_saving(when: tuple[int, int, int], close_utc: int) -> None:
    friday = datetime(*when, close_utc, 0, tzinfo=UTC)
    t = int(friday.timestamp()) * 1000
    assert not market_closed(t - MIN) and market_closed(t)
    assert market_closed(t + 2 * DAY - MIN) and not market_closed(t + 2 * DAY)


def test_a_quiet_minute_is_left_out_like_a_closed_one() -> None:
    quiet = NOW - HOUR - NOW % MIN
    with oanda(no_trade={"EUR/USD": {quiet}}) as sim:
        _, body = candles(sim, count=3, **{"from": (quiet - MIN) // 1000})
        assert times(body) == [quiet - MIN, quiet + MIN, quiet + 2 * MIN]
        assert quiet not in [r[0] for r in sim.expected_candles("EUR/USD", "1m", quiet - MIN, quiet + MIN)]


def test_a_market_listed_at_run_time_has_market_hours_too() -> None:
    with oanda(Clock(ny(2023, 11, 11, 12, 0))) as sim:  # Saturday
        sim.list_symbol("EUR/SEK", listed_at_ms=FRIDAY_NOON_UTC)
        _, body = candles(sim, "EUR_SEK", count=5000)
        assert body["candles"] and max(times(body)) < ny(2023, 11, 10, 17, 0)


# ---------------------------------------------------------------- rate limit and faults
def test_rate_limit_answer() -> None:
    t = [100.0]
    with oanda(monotonic=lambda: t[0]) as sim:
        sim.set_rate_limit(1)
        assert get(sim, "/v3/accounts")[0] == 200
        status, headers, body = get(sim, "/v3/accounts")
        assert status == 429 and headers["retry-after"] == "1" and set(body) == {"errorMessage"}


@pytest.mark.parametrize(("kind", "status"), [
    (FaultKind.HTTP_500, 500), (FaultKind.HTTP_502, 502), (FaultKind.HTTP_503, 503),
    (FaultKind.HTTP_504, 504), (FaultKind.HTTP_429, 429), (FaultKind.HTTP_418, 429),
])
def test_faults_in_oandas_error_shape(kind: FaultKind, status: int) -> None:
    with oanda(faults=Faults(rates={kind: 1.0}, retry_after_s=3)) as sim:
        got, headers, body = get(sim, "/v3/accounts")
        assert got == status
        assert set(body) == {"errorMessage"} and body["errorMessage"]
        assert headers["content-type"].startswith("application/json")
        if status == 429:
            assert headers["retry-after"] == "3"


def test_outage_and_failing_listings_in_oandas_error_shape() -> None:
    with oanda(fail_listing={"accounts": 500, "instruments": 503}) as sim:
        assert get(sim, "/v3/accounts")[0] == 500
        status, _, body = get(sim, f"/v3/accounts/{ACCOUNT}/instruments")
        assert status == 503 and set(body) == {"errorMessage"}
        assert sim.stats().by_fault[FaultKind.LISTING] == 2
        sim.set_outage(OutageMode.HTTP_503)
        status, _, body = get(sim, "/v3/instruments/EUR_USD/candles")
        assert status == 503 and set(body) == {"errorMessage"}


def test_poisoned_instruments() -> None:
    with oanda() as sim:
        sim.poison("EUR/USD", PoisonKind.BAD_SYMBOL)
        assert candles(sim) == (400, {"errorMessage": "Invalid value specified for 'instrument'"})
        sim.poison("EUR/USD", PoisonKind.BAD_SYMBOL_200)
        assert candles(sim) == (200, {"errorMessage": "Invalid value specified for 'instrument'"})
        sim.poison("EUR/USD", PoisonKind.EMPTY)
        assert candles(sim)[1]["candles"] == []
        sim.unpoison("EUR/USD")
        sim.poison("EUR_USD", PoisonKind.NULLS)  # the dialect's own id works too
        c = candles(sim, count=1)[1]["candles"][0]
        assert c["mid"] == {"o": None, "h": None, "l": None, "c": None} and c["volume"] is None
        sim.unpoison("EUR_USD")
        sim.poison("EUR/USD", PoisonKind.INVERTED)
        for c in candles(sim, count=5)[1]["candles"]:
            assert float(c["mid"]["h"]) < float(c["mid"]["l"])
        assert sim.stats().by_fault[FaultKind.POISON] == 5


def test_truncated_body_is_invalid_json() -> None:
    with oanda(faults=Faults(rates={FaultKind.TRUNCATED: 1.0})) as sim:
        status, _, body = get(sim, "/v3/accounts")
        assert status == 200 and isinstance(body, str)


def test_cli_takes_the_dialect_and_its_token() -> None:
    a = _parse(["--dialect", "oanda", "--token", "t0k"])
    assert (a.dialect, a.token) == ("oanda", "t0k")
