"""The simulator speaks Binance well enough for the REAL ccxt.binance client, and its faults
surface in ccxt as the exception classes the daemon's error classification relies on."""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
from collections.abc import Iterator

import ccxt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeeper.simulator import BinanceSimulator, CandleHistory, FaultKind, Faults, OutageMode, PoisonKind
from candlekeeper.simulator.ccxt_client import binance_options, make_binance
from candlekeeper.simulator.history import INTERVALS, align_down

MIN = 60_000
T0 = 1_700_006_430_123  # mid-candle "now" for the fake clock
START = align_down(T0, "1h") - 6 * 3_600_000  # 6-7 hours of history


class FakeClock:
    """The exchange's clock, advanced by hand (klines do not depend on ccxt's clock)."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Log:
    """Request-log hook; entries exist before the client sees the response (no sleeping)."""

    def __init__(self) -> None:
        self.entries: list[tuple] = []
        self.lock = threading.Lock()

    def __call__(self, path, params, status, fault) -> None:
        with self.lock:
            self.entries.append((path, dict(params), status, fault))

    def paths(self) -> list[str]:
        return [e[0] for e in self.entries]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def sim(clock: FakeClock, log: Log) -> Iterator[BinanceSimulator]:
    with BinanceSimulator(now_ms=clock, history_start_ms=START, on_request=log) as s:
        yield s


@pytest.fixture
def ex(sim: BinanceSimulator) -> ccxt.binance:
    e = make_binance(sim.url, timeout_ms=2000)
    e.load_markets()
    return e


def _raw_get(sim: BinanceSimulator, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- dialect
def test_load_markets_calls_only_exchange_info(sim: BinanceSimulator, log: Log) -> None:
    e = make_binance(sim.url, timeout_ms=2000)
    markets = e.load_markets()
    assert log.paths() == ["/api/v3/exchangeInfo"]
    m = markets["BTC/USDT"]
    assert (m["id"], m["base"], m["quote"], m["spot"], m["active"]) == (
        "BTCUSDT", "BTC", "USDT", True, True)
    assert set(markets) == {"BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "ETH/BTC"}
    assert e.last_response_headers["x-mbx-used-weight-1m"] == "20"


def test_options_and_rebased_urls() -> None:
    opts = binance_options()
    assert opts["fetchMarkets"] == {"types": ["spot"]} and opts["fetchCurrencies"] is False
    e = make_binance("http://127.0.0.1:9")
    assert e.urls["api"]["public"] == "http://127.0.0.1:9/api/v3"
    assert all(u.startswith("http://127.0.0.1:9/") for u in e.urls["api"].values())


def test_backfill_paginates_and_matches_expected(sim: BinanceSimulator, ex: ccxt.binance,
                                                 log: Log) -> None:
    since, got = START, []
    while True:
        page = ex.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=150)
        closed = [c for c in page if c[0] + MIN <= T0]
        got += closed
        if len(closed) < len(page) or not page:
            break
        since = page[-1][0] + MIN
    expected = sim.expected_candles("BTC/USDT", "1m", START, T0)
    assert len(expected) == (align_down(T0, "1m") - START) // MIN
    assert got == [list(c) for c in expected]
    assert len([p for p in log.paths() if p == "/api/v3/klines"]) == -(-len(expected) // 150)


def test_klines_without_start_end_with_in_progress_candle(ex: ccxt.binance,
                                                          sim: BinanceSimulator) -> None:
    rows = ex.fetch_ohlcv("ETH/USDT", "5m", limit=4)
    assert [r[0] for r in rows] == [align_down(T0, "5m") - i * 5 * MIN for i in (3, 2, 1, 0)]
    expected = sim.expected_candles("ETH/USDT", "5m", rows[0][0], rows[-1][0])
    assert rows[:3] == [list(c) for c in expected]


def test_last_candle_is_in_progress_and_changes(clock: FakeClock, ex: ccxt.binance,
                                                sim: BinanceSimulator) -> None:
    open_t = align_down(T0, "1m")
    first = ex.fetch_ohlcv("BTC/USDT", "1m", limit=1)[0]
    clock.advance(7_000)
    second = ex.fetch_ohlcv("BTC/USDT", "1m", limit=1)[0]
    assert first[0] == second[0] == open_t
    assert first != second and second[5] > first[5]  # volume grows while in progress
    assert sim.expected_candles("BTC/USDT", "1m", open_t, open_t + MIN) == []
    clock.now = open_t + MIN  # now it closes
    final = ex.fetch_ohlcv("BTC/USDT", "1m", since=open_t, limit=1)[0]
    assert [final] == [list(c) for c in sim.expected_candles("BTC/USDT", "1m", open_t,
                                                            open_t + MIN)]
    assert final not in (first, second)


def test_history_start_and_gaps(clock: FakeClock) -> None:
    gap = START + 10 * MIN
    with BinanceSimulator(now_ms=clock, history_start_ms=START, gaps={"BTC/USDT": [gap]}) as s:
        e = make_binance(s.url, timeout_ms=2000)
        rows = e.fetch_ohlcv("BTC/USDT", "1m", since=START - 100 * MIN, limit=20)
        ts = [r[0] for r in rows]
        assert ts[0] == START and len(ts) == 20 and gap not in ts
        assert ts == [START + i * MIN for i in range(21) if START + i * MIN != gap]
        assert gap not in [c[0] for c in s.expected_candles("BTC/USDT", "1m", START, gap + MIN)]
        assert gap in [r[0] for r in e.fetch_ohlcv("ETH/USDT", "1m", since=gap, limit=1)]


def test_unknown_symbol_is_bad_symbol(ex: ccxt.binance, log: Log) -> None:
    with pytest.raises(ccxt.BadSymbol):
        ex.fetch_ohlcv("NOPE/USDT", "1m")  # ccxt refuses before asking
    with pytest.raises(ccxt.BadSymbol):
        ex.publicGetKlines({"symbol": "NOPEUSDT", "interval": "1m"})  # the server refuses
    assert log.entries[-1][2] == 400


def test_time_ping_and_unknown_path(sim: BinanceSimulator, clock: FakeClock) -> None:
    e = make_binance(sim.url, timeout_ms=2000)
    assert e.fetch_time() == T0
    assert _raw_get(sim, "/api/v3/ping")[::2] == (200, b"{}")
    assert _raw_get(sim, "/api/v3/nope")[0] == 404


# ---------------------------------------------------------------- fault -> ccxt mapping
FAULT_TO_CCXT = [
    (FaultKind.HTTP_500, ccxt.OperationFailed),  # body {"code": -1000}
    (FaultKind.HTTP_502, ccxt.ExchangeNotAvailable),  # HTML gateway page
    (FaultKind.HTTP_503, ccxt.OperationFailed),  # body {"code": -1001}
    (FaultKind.HTTP_504, ccxt.RequestTimeout),  # HTML gateway page
    (FaultKind.HTTP_429, ccxt.DDoSProtection),  # not RateLimitExceeded: binance checks 429 first
    (FaultKind.HTTP_418, ccxt.DDoSProtection),
    (FaultKind.RESET, ccxt.NetworkError),
    (FaultKind.SHORT_READ, ccxt.NetworkError),
    (FaultKind.STALL, ccxt.RequestTimeout),
]


@pytest.mark.parametrize("kind,exc", FAULT_TO_CCXT, ids=[k.value for k, _ in FAULT_TO_CCXT])
def test_fault_maps_to_ccxt_exception(sim: BinanceSimulator, ex: ccxt.binance, log: Log,
                                      kind: FaultKind, exc: type) -> None:
    ex.timeout = 300
    sim.set_faults(Faults(rates={kind: 1.0}, stall_s=30.0))
    with pytest.raises(ccxt.BaseError) as info:
        ex.fetch_ohlcv("BTC/USDT", "1m", limit=5)
    assert type(info.value) is exc
    assert sim.stats().by_fault[kind] == 1
    assert log.entries[-1][3] is kind
    sim.set_faults(Faults())
    ex.timeout = 2000
    assert len(ex.fetch_ohlcv("BTC/USDT", "1m", limit=5)) == 5  # and the client recovers


def test_retry_after_header_on_429_and_418(sim: BinanceSimulator) -> None:
    sim.set_faults(Faults(rates={FaultKind.HTTP_429: 1.0}, retry_after_s=7))
    status, headers, body = _raw_get(sim, "/api/v3/time")
    assert (status, headers["retry-after"]) == (429, "7") and b'"code":-1003' in body
    sim.set_faults(Faults(rates={FaultKind.HTTP_418: 1.0}, retry_after_s=9))
    status, headers, _ = _raw_get(sim, "/api/v3/time")
    assert (status, headers["retry-after"]) == (418, "9")
    assert (sim.stats().http_429, sim.stats().http_418) == (1, 1)


def test_truncated_json_is_silent_in_ccxt(sim: BinanceSimulator, ex: ccxt.binance) -> None:
    """ccxt swallows the JSON error and parses the *string* body: no exception at all."""
    sim.set_faults(Faults(rates={FaultKind.TRUNCATED: 1.0}))
    rows = ex.fetch_ohlcv("BTC/USDT", "1m", limit=5)
    assert rows and all(None in r[1:] for r in rows)  # garbage rows, made of single chars
    assert ex.fetch_ohlcv("BTC/USDT", "1m", since=START, limit=5) == []  # looks like "no data"
    e = make_binance(sim.url, timeout_ms=2000)
    assert e.load_markets() == {}  # "succeeds" with zero markets
    with pytest.raises(ccxt.BadSymbol):
        e.market("BTC/USDT")


@pytest.mark.parametrize("kind", list(PoisonKind))
def test_poisoned_symbol(sim: BinanceSimulator, ex: ccxt.binance, kind: PoisonKind) -> None:
    sim.poison("BTC/USDT", kind)
    healthy = ex.fetch_ohlcv("ETH/USDT", "1m", since=START, limit=3)
    assert healthy == [list(c) for c in sim.expected_candles("ETH/USDT", "1m", START,
                                                             START + 3 * MIN)]
    if kind in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):  # 200 or 400: BadSymbol
        with pytest.raises(ccxt.BadSymbol):
            ex.fetch_ohlcv("BTC/USDT", "1m", limit=3)
    else:
        rows = ex.fetch_ohlcv("BTC/USDT", "1m", limit=3)
        if kind is PoisonKind.EMPTY:
            assert rows == []
        elif kind is PoisonKind.NULLS:
            assert rows and all(r[1:] == [None] * 5 for r in rows)
        else:
            assert rows and all(r[2] < r[3] for r in rows)  # high < low
    assert sim.stats().by_fault[FaultKind.POISON] == 1
    sim.unpoison("BTC/USDT")
    assert all(r[2] >= r[3] for r in ex.fetch_ohlcv("BTC/USDT", "1m", limit=3))


# ----------------------------------------------------------------- limits and outages
def test_server_side_rate_limit_and_ban(clock: FakeClock, log: Log) -> None:
    mono = FakeMonotonic()
    faults = Faults(rate_limit_per_s=5, ban_after_violations=3, ban_s=30)
    with BinanceSimulator(now_ms=clock, history_start_ms=START, faults=faults, on_request=log,
                          monotonic=mono) as s:
        statuses = [_raw_get(s, "/api/v3/ping")[0] for _ in range(8)]
        # frozen clock: all in one second; the 7th and 8th ignore the 6th's Retry-After
        assert statuses == [200] * 5 + [429, 429, 429]
        e = make_binance(s.url, timeout_ms=2000)
        with pytest.raises(ccxt.DDoSProtection):
            e.fetch_time()  # 3rd request while told to back off: banned
        assert log.entries[-1][2:] == (418, FaultKind.BAN)
        mono.t += 5  # window free again, but the ban holds
        status, headers, _ = _raw_get(s, "/api/v3/ping")
        assert (status, headers["retry-after"]) == (418, "25")
        mono.t += 26
        assert e.fetch_time() == T0
        st_ = s.stats()
        assert (st_.http_429, st_.http_418) == (3, 2)
        assert (st_.by_fault[FaultKind.RATE_LIMIT], st_.by_fault[FaultKind.BAN]) == (3, 2)


def test_rate_limit_without_ban_recovers_after_window(clock: FakeClock) -> None:
    mono = FakeMonotonic()
    with BinanceSimulator(now_ms=clock, history_start_ms=START, monotonic=mono) as s:
        s.set_rate_limit(2)
        assert [_raw_get(s, "/api/v3/ping")[0] for _ in range(4)] == [200, 200, 429, 429]
        assert _raw_get(s, "/api/v3/ping")[1]["retry-after"] == "1"
        mono.t += 1.0
        assert _raw_get(s, "/api/v3/ping")[0] == 200
        s.set_rate_limit(None)
        assert {_raw_get(s, "/api/v3/ping")[0] for _ in range(5)} == {200}


def test_outage_refuse_then_restore_same_port(sim: BinanceSimulator, ex: ccxt.binance) -> None:
    port = sim.port
    sim.set_outage(OutageMode.REFUSE)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((sim.host, port), timeout=2).close()
    with pytest.raises(ccxt.NetworkError):  # the pooled keep-alive connection was reset too
        ex.fetch_ohlcv("BTC/USDT", "1m", limit=2)
    sim.set_outage(None)
    assert sim.port == port and len(ex.fetch_ohlcv("BTC/USDT", "1m", limit=2)) == 2


@pytest.mark.parametrize("mode,exc", [(OutageMode.RESET, ccxt.NetworkError),
                                      (OutageMode.HTTP_503, ccxt.OperationFailed)])
def test_outage_modes(sim: BinanceSimulator, ex: ccxt.binance, mode: OutageMode,
                      exc: type) -> None:
    sim.set_outage(mode)
    for _ in range(3):
        with pytest.raises(ccxt.BaseError) as info:
            ex.fetch_time()
        assert type(info.value) is exc
    assert sim.stats().by_fault[FaultKind.OUTAGE] == 3
    sim.set_outage(None)
    assert ex.fetch_time() == T0


def test_faults_limited_to_paths(sim: BinanceSimulator, ex: ccxt.binance) -> None:
    sim.set_faults(Faults(rates={FaultKind.HTTP_500: 1.0}, paths=frozenset({"/api/v3/klines"})))
    assert ex.fetch_time() == T0
    with pytest.raises(ccxt.OperationFailed):
        ex.fetch_ohlcv("BTC/USDT", "1m", limit=1)


def test_seeded_fault_schedule_is_deterministic(clock: FakeClock) -> None:
    def schedule(seed: int) -> list[tuple]:
        log = Log()
        with BinanceSimulator(now_ms=clock, history_start_ms=START, on_request=log,
                              faults=Faults.uniform(0.6, kinds=(
                                  FaultKind.HTTP_500, FaultKind.HTTP_503, FaultKind.HTTP_429,
                                  FaultKind.RESET, FaultKind.TRUNCATED), seed=seed)) as s:
            for _ in range(40):
                try:
                    _raw_get(s, "/api/v3/time")
                except (OSError, http.client.HTTPException):
                    pass
        return [(e[2], e[3]) for e in log.entries]

    a, b, c = schedule(7), schedule(7), schedule(8)
    assert a == b and a != c
    assert len({f for _, f in a}) >= 4  # a real mix, not all-or-nothing


def test_stall_does_not_block_other_requests(sim: BinanceSimulator, ex: ccxt.binance) -> None:
    stalled = threading.Event()
    sim.add_request_hook(lambda p, q, s, f: f is FaultKind.STALL and stalled.set())
    sim.set_faults(Faults(rates={FaultKind.STALL: 1.0}, paths=frozenset({"/api/v3/klines"}),
                          stall_s=60.0))
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=30)
    conn.request("GET", "/api/v3/klines?symbol=BTCUSDT&interval=1m")  # never answered
    assert stalled.wait(5)
    assert ex.fetch_time() == T0  # served while the other request hangs
    conn.close()


def test_stop_leaves_no_threads_behind(clock: FakeClock) -> None:
    before = set(threading.enumerate())
    s = BinanceSimulator(now_ms=clock, history_start_ms=START,
                         faults=Faults(rates={FaultKind.STALL: 1.0}, stall_s=600.0,
                                       paths=frozenset({"/api/v3/klines"}))).start()
    try:
        keeper = make_binance(s.url)
        keeper.load_markets()  # an idle keep-alive connection: a server thread in recv
        e = make_binance(s.url, timeout_ms=200)
        with pytest.raises(ccxt.RequestTimeout):
            e.fetch_ohlcv("BTC/USDT", "1m")  # a server thread stalled for 600 s
        idle = socket.create_connection((s.host, s.port))  # connected, never sends a byte
        assert len(set(threading.enumerate()) - before) >= 3  # serve loop, idle, stalled
    finally:
        s.stop()
    assert set(threading.enumerate()) == before
    idle.close()
    del keeper
    s.stop()  # idempotent


def test_several_exchanges_side_by_side(clock: FakeClock) -> None:
    with BinanceSimulator(now_ms=clock, history_start_ms=START, seed=1, name="a") as a, \
            BinanceSimulator(now_ms=clock, history_start_ms=START, seed=2, name="b",
                             faults=Faults(rates={FaultKind.HTTP_503: 1.0})) as b:
        assert a.port != b.port
        ea, eb = make_binance(a.url, timeout_ms=2000), make_binance(b.url, timeout_ms=2000)
        ea.load_markets()
        with pytest.raises(ccxt.OperationFailed):
            eb.load_markets()
        assert a.expected_candles("BTC/USDT", "1h", START, T0) != \
            b.expected_candles("BTC/USDT", "1h", START, T0)
        assert a.stats().total == 1 and b.stats().total == 1


def test_default_clock_is_wall_time() -> None:
    import time
    with BinanceSimulator(symbols=["BTC/USDT"]) as s:
        e = make_binance(s.url, timeout_ms=2000)
        before = time.time_ns() // 1_000_000
        last = e.fetch_ohlcv("BTC/USDT", "1m", limit=2)[-1]
        after = time.time_ns() // 1_000_000
        assert align_down(before, "1m") <= last[0] <= align_down(after, "1m")


# ------------------------------------------------------------------- history properties
_hist = CandleHistory(["BTC/USDT", "DOGE/USDT", "ETH/BTC"], START, gaps={
    "DOGE/USDT": [START + 3 * MIN, START + 4 * MIN]})


@settings(max_examples=60, deadline=None)
@given(sym=st.sampled_from(["BTC/USDT", "DOGE/USDT", "ETH/BTC"]),
       interval=st.sampled_from(list(INTERVALS)),
       start=st.integers(START - 10 * 86_400_000, T0 + MIN),
       limit=st.integers(1, 60), now_off=st.integers(0, 10 * 86_400_000))
def test_klines_properties(sym: str, interval: str, start: int, limit: int,
                           now_off: int) -> None:
    now = T0 + now_off
    ms = INTERVALS[interval][0]
    rows = _hist.klines(sym, interval, now, start_ms=start, limit=limit)
    assert len(rows) <= limit
    ts = [c.open_time for c in rows]
    assert ts == sorted(set(ts))
    assert all(t >= start and t >= align_down(START, interval) and t <= now for t in ts)
    assert all(align_down(t, interval) == t for t in ts)
    for c in rows:
        _, o, h, lo, cl, v = c.ohlcv()
        assert h >= max(o, cl) and lo <= min(o, cl) and lo > 0 and v >= 0
        assert c.close_time == c.open_time + ms - 1
        # the same candle, asked for on its own, is the same (O(1), no hidden state)
        assert _hist.candle(sym, interval, c.open_time, now) == c
    if rows and rows[-1].open_time + ms > now:
        assert rows[-1].ohlcv() != _hist.candle(sym, interval, rows[-1].open_time,
                                                rows[-1].open_time + ms).ohlcv()


def test_consecutive_candles_join_up() -> None:
    rows = _hist.klines("BTC/USDT", "15m", T0, start_ms=START, limit=20)
    assert all(a.close == b.open for a, b in itertools.pairwise(rows))
