"""Faults in every dialect, each rendered in the exchange's own error shape, and the exact
ccxt exception class each one surfaces as (ccxt 4.5.90); the README's tables come from here."""

from __future__ import annotations

import ccxt
import pytest

from candlekeeper.simulator import FaultKind, Faults, OutageMode, PoisonKind
from candlekeeper.simulator.history import align_down
from tests.test_sim_support import DIALECT_NAMES, MIN, SPECS, START, T0, FakeClock, FakeMonotonic, Log, client, running

E = ccxt  # short alias for the tables

#: fault -> exact ccxt class, per dialect (None: ccxt raises nothing)
FAULT_TO_CCXT: dict[str, dict[FaultKind, type | None]] = {
    "binance": {FaultKind.HTTP_500: E.OperationFailed, FaultKind.HTTP_502: E.ExchangeNotAvailable,
                FaultKind.HTTP_503: E.OperationFailed, FaultKind.HTTP_504: E.RequestTimeout,
                FaultKind.HTTP_429: E.DDoSProtection, FaultKind.HTTP_418: E.DDoSProtection},
    "okx": {FaultKind.HTTP_500: E.ExchangeNotAvailable, FaultKind.HTTP_502: E.ExchangeNotAvailable,
            FaultKind.HTTP_503: E.OnMaintenance, FaultKind.HTTP_504: E.RequestTimeout,
            FaultKind.HTTP_429: E.RateLimitExceeded, FaultKind.HTTP_418: E.RateLimitExceeded},
    "bybit": {FaultKind.HTTP_500: E.ExchangeError, FaultKind.HTTP_502: E.ExchangeNotAvailable,
              FaultKind.HTTP_503: E.ExchangeNotAvailable, FaultKind.HTTP_504: E.RequestTimeout,
              FaultKind.HTTP_429: E.RateLimitExceeded, FaultKind.HTTP_418: E.RateLimitExceeded},
    "kraken": {FaultKind.HTTP_500: E.ExchangeNotAvailable,
               FaultKind.HTTP_502: E.ExchangeNotAvailable,
               FaultKind.HTTP_503: E.ExchangeNotAvailable, FaultKind.HTTP_504: E.RequestTimeout,
               FaultKind.HTTP_429: E.DDoSProtection, FaultKind.HTTP_418: E.DDoSProtection},
    "coinbase": {FaultKind.HTTP_500: E.ExchangeError, FaultKind.HTTP_502: E.ExchangeNotAvailable,
                 FaultKind.HTTP_503: E.ExchangeError, FaultKind.HTTP_504: E.RequestTimeout,
                 FaultKind.HTTP_429: E.RateLimitExceeded,
                 FaultKind.HTTP_418: E.RateLimitExceeded},
    "kucoin": {FaultKind.HTTP_500: E.ExchangeNotAvailable,
               FaultKind.HTTP_502: E.ExchangeNotAvailable,
               FaultKind.HTTP_503: E.ExchangeNotAvailable, FaultKind.HTTP_504: E.RequestTimeout,
               FaultKind.HTTP_429: E.RateLimitExceeded, FaultKind.HTTP_418: E.RateLimitExceeded},
}
for _table in FAULT_TO_CCXT.values():  # the transport-level faults map the same everywhere
    _table.update({FaultKind.RESET: E.NetworkError, FaultKind.SHORT_READ: E.NetworkError,
                   FaultKind.STALL: E.RequestTimeout, FaultKind.TRUNCATED: None})

CASES = [(d, k) for d in DIALECT_NAMES for k in FAULT_TO_CCXT[d]]
UNKNOWN_SYMBOL = {"binance": E.BadSymbol, "okx": E.BadSymbol, "bybit": E.BadSymbol,
                  "kraken": E.ExchangeError, "coinbase": E.ExchangeError, "kucoin": E.BadRequest}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _fetch(ex: ccxt.Exchange, dialect: str) -> list:
    return ex.fetch_ohlcv(SPECS[dialect].symbol, "1m", since=T0 - 5 * MIN, limit=3)


@pytest.mark.parametrize("dialect,kind", CASES, ids=[f"{d}-{k.value}" for d, k in CASES])
def test_fault_maps_to_ccxt_exception(dialect: str, kind: FaultKind, clock: FakeClock) -> None:
    log = Log()
    with running(dialect, clock, on_request=log) as sim:
        ex = client(sim, clock, timeout_ms=300)
        ex.load_markets()
        sim.set_faults(Faults(rates={kind: 1.0}, stall_s=30.0))
        expected = FAULT_TO_CCXT[dialect][kind]
        if expected is None:  # truncated JSON: ccxt swallows it, a page that "has no rows"
            assert _fetch(ex, dialect) == []
        else:
            with pytest.raises(ccxt.BaseError) as info:
                _fetch(ex, dialect)
            assert type(info.value) is expected
        assert sim.stats().by_fault[kind] == 1 and log.entries[-1][3] is kind
        sim.set_faults(Faults())
        ex.timeout = 2000
        assert len(_fetch(ex, dialect)) == 3  # and the client recovers


@pytest.mark.parametrize("dialect", DIALECT_NAMES)
def test_unknown_symbol(dialect: str, clock: FakeClock) -> None:
    with running(dialect, clock) as sim:
        ex = client(sim, clock)
        with pytest.raises(ccxt.BadSymbol):  # ccxt refuses unknown unified symbols itself
            ex.fetch_ohlcv("NOPE/" + SPECS[dialect].quote, "1m")
        with pytest.raises(ccxt.BaseError) as info:  # the exchange refuses unknown ids
            SPECS[dialect].unknown(ex)
        assert type(info.value) is UNKNOWN_SYMBOL[dialect]


@pytest.mark.parametrize("dialect", DIALECT_NAMES)
@pytest.mark.parametrize("kind", list(PoisonKind))
def test_poisoned_symbol(dialect: str, kind: PoisonKind, clock: FakeClock) -> None:
    with running(dialect, clock) as sim:
        ex = client(sim, clock)
        sym, other = SPECS[dialect].symbol, SPECS[dialect].sym("ETH")
        sim.poison(sym, kind)
        healthy = ex.fetch_ohlcv(other, "1m", since=START, limit=3)
        assert healthy == [list(c) for c in sim.expected_candles(other, "1m", START,
                                                                 START + 3 * MIN)]
        if kind in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
            with pytest.raises(ccxt.BaseError) as info:
                ex.fetch_ohlcv(sym, "1m", since=START, limit=3)
            assert type(info.value) is UNKNOWN_SYMBOL[dialect]  # a listed symbol, though
        else:
            rows = ex.fetch_ohlcv(sym, "1m", since=START, limit=3)
            if kind is PoisonKind.EMPTY:
                assert rows == []
            elif kind is PoisonKind.NULLS:
                assert rows and all(r[1:] == [None] * 5 for r in rows)
            else:
                assert rows and all(r[2] < r[3] for r in rows)  # high < low
        assert sim.stats().by_fault[FaultKind.POISON] == 1
        sim.unpoison(sym)
        assert all(r[2] >= r[3] for r in ex.fetch_ohlcv(sym, "1m", since=START, limit=3))


# --------------------------------------------------------------------------- rate limits
RATE_LIMIT_CLASS = {"binance": E.DDoSProtection, "okx": E.RateLimitExceeded,
                    "bybit": E.RateLimitExceeded, "kraken": E.DDoSProtection,
                    "coinbase": E.RateLimitExceeded, "kucoin": E.RateLimitExceeded}
#: (HTTP status, header that must be present) of the rate-limit answer
RATE_LIMIT_WIRE = {"binance": (429, "Retry-After"), "okx": (429, None),
                   "bybit": (200, "X-Bapi-Limit-Status"), "kraken": (200, None),
                   "coinbase": (429, None), "kucoin": (429, "gw-ratelimit-remaining")}
BAN_STATUS = {"binance": 418, "okx": 429, "bybit": 403, "kraken": 200, "coinbase": 429,
              "kucoin": 429}


@pytest.mark.parametrize("dialect", DIALECT_NAMES)
def test_server_side_rate_limit_and_ban(dialect: str, clock: FakeClock) -> None:
    mono = FakeMonotonic()
    log = Log()
    faults = Faults(rate_limit_per_s=3, ban_after_violations=2, ban_s=30)
    with running(dialect, clock, faults=faults, monotonic=mono, on_request=log) as sim:
        ex = client(sim, clock)
        for _ in range(3):
            ex.fetch_time()
        with pytest.raises(ccxt.BaseError) as info:
            ex.fetch_time()  # 4th in the same (frozen) second
        assert type(info.value) is RATE_LIMIT_CLASS[dialect]
        status, header = RATE_LIMIT_WIRE[dialect]
        assert log.entries[-1][2:] == (status, FaultKind.RATE_LIMIT)
        if header is not None:
            assert header.lower() in {k.lower() for k in ex.last_response_headers}
        if dialect == "bybit":
            assert ex.last_response_headers["X-Bapi-Limit-Status"] == "0"
        with pytest.raises(ccxt.BaseError):
            ex.fetch_time()  # ignores the back-off ...
        with pytest.raises(ccxt.BaseError) as info:
            ex.fetch_time()  # ... twice: banned
        assert log.entries[-1][2:] == (BAN_STATUS[dialect], FaultKind.BAN)
        assert isinstance(info.value, (ccxt.DDoSProtection, ccxt.RateLimitExceeded))
        mono.t += 31
        assert ex.fetch_time() > 0


@pytest.mark.parametrize("dialect", DIALECT_NAMES)
def test_rate_limit_headers_on_every_response(dialect: str, clock: FakeClock) -> None:
    headers = {"binance": ("x-mbx-used-weight-1m",), "okx": (),
               "bybit": ("X-Bapi-Limit-Status", "X-Bapi-Limit", "X-Bapi-Limit-Reset-Timestamp"),
               "kraken": (), "coinbase": (),
               "kucoin": ("gw-ratelimit-limit", "gw-ratelimit-remaining", "gw-ratelimit-reset")}
    with running(dialect, clock) as sim:
        ex = client(sim, clock)
        _fetch(ex, dialect)
        first = dict(ex.last_response_headers)
        _fetch(ex, dialect)
        for h in headers[dialect]:
            assert h in first and h in ex.last_response_headers
        if dialect == "bybit":  # remaining goes down within the window
            assert int(ex.last_response_headers["X-Bapi-Limit-Status"]) < int(
                first["X-Bapi-Limit-Status"])
            assert int(ex.last_response_headers["X-Bapi-Limit-Reset-Timestamp"]) > T0


# ------------------------------------------------------------------- market-type listings
#: dialect -> (failing listing, class ccxt's DEFAULT load_markets raises, or None if it
#: still succeeds)
FAILING_LISTING = {
    "binance": ({"inverse": 500}, E.OperationFailed),
    "okx": ({"option": 500}, E.ExchangeNotAvailable),
    "bybit": ({"option": 503}, E.ExchangeNotAvailable),
    "kucoin": ({"contract": 500}, E.ExchangeNotAvailable),
    "coinbase": ({"future": 500}, None),  # the sync client swallows the futures failure
    "kraken": ({"currencies": 503}, E.ExchangeNotAvailable),  # no derivatives: currencies
}


@pytest.mark.parametrize("dialect", DIALECT_NAMES)
def test_failing_listing_never_blocks_spot_when_restricted(dialect: str,
                                                           clock: FakeClock) -> None:
    fail, default_exc = FAILING_LISTING[dialect]
    with running(dialect, clock, fail_listing=fail) as sim:
        default = client(sim, clock, spot_only=False)
        if default_exc is None:
            markets = default.load_markets()
            assert not any(m["contract"] for m in markets.values())
        else:
            with pytest.raises(ccxt.BaseError) as info:
                default.load_markets()
            assert type(info.value) is default_exc
        assert sim.stats().by_fault[FaultKind.LISTING] >= 1
        restricted = client(sim, clock)
        if dialect == "kraken":  # only ccxt's `has` flag keeps currencies out
            restricted.has["fetchCurrencies"] = False
        markets = restricted.load_markets()
        assert {s for s, m in markets.items() if m["spot"]} == set(sim.markets())
        assert len(restricted.fetch_ohlcv(SPECS[dialect].symbol, "1m", since=START,
                                          limit=2)) == 2


@pytest.mark.parametrize("dialect", ["okx", "bybit"])
def test_default_load_markets_asks_for_every_listing(dialect: str, clock: FakeClock) -> None:
    log = Log()
    with running(dialect, clock, on_request=log) as sim:
        markets = client(sim, clock, spot_only=False).load_markets()
        kinds = [sim.dialect.listing_kind(p, q) for p, q, _, _ in log.entries]
        assert set(kinds) == set(sim.dialect.listing_kinds)
        types = {m["type"] for m in markets.values()}
        assert types == {"spot", "swap", "future", "option"}


# ---------------------------------------------------------------------------- slow bodies
@pytest.mark.parametrize("dialect", DIALECT_NAMES)
def test_trickle_outlasts_the_client_timeout_without_tripping_it(dialect: str,
                                                                 clock: FakeClock) -> None:
    """ccxt's `timeout` is a per-read socket timeout: a body trickling in slower than the
    whole timeout but with short gaps completes. Only a whole-request deadline catches it."""
    rate, timeout_s = 160.0, 0.15  # 3 bytes every ~19 ms
    with running(dialect, clock) as sim:
        ex = client(sim, timeout_ms=int(timeout_s * 1000))
        sim.set_faults(Faults(rates={FaultKind.TRICKLE: 1.0}, trickle_bytes_per_s=rate))
        assert ex.fetch_time() // 1000 == T0 // 1000
        body = ex.last_http_response.encode()
        assert len(body) / rate > timeout_s  # the response took longer than the timeout
        assert sim.stats().by_fault[FaultKind.TRICKLE] == 1


def test_trickle_is_cut_short_by_stop(clock: FakeClock) -> None:
    with running("okx", clock, faults=Faults(rates={FaultKind.TRICKLE: 1.0})) as sim:
        ex = client(sim, timeout_ms=5000)
        ex.timeout = 100
        with pytest.raises(ccxt.RequestTimeout):  # 1 byte/s: the first gap trips 100 ms
            ex.fetch_time()
    # leaving the block stopped the server and joined the trickling thread


@pytest.mark.parametrize("dialect", DIALECT_NAMES)
@pytest.mark.parametrize("mode", list(OutageMode))
def test_outage_modes(dialect: str, mode: OutageMode, clock: FakeClock) -> None:
    with running(dialect, clock) as sim:
        ex = client(sim, clock)
        ex.load_markets()
        sim.set_outage(mode)
        with pytest.raises(ccxt.BaseError) as info:
            _fetch(ex, dialect)
        expected = (FAULT_TO_CCXT[dialect][FaultKind.HTTP_503] if mode is OutageMode.HTTP_503
                    else ccxt.NetworkError)
        assert type(info.value) is expected
        sim.set_outage(None)
        assert len(_fetch(ex, dialect)) == 3


def test_in_progress_candle_follows_a_skewed_clock(clock: FakeClock) -> None:
    with running("bybit", clock, faults=Faults(clock_skew_ms=-90_000)) as sim:
        ex = client(sim, sim.now_ms)
        last = ex.fetch_ohlcv("BTC/USDT", "1m", since=T0 - 5 * MIN, limit=10)[-1]
        assert last[0] == align_down(T0 - 90_000, "1m")
        assert int(ex.last_response_headers["Timenow"]) == T0 - 90_000
