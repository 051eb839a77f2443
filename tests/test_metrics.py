"""Metrics: scraped over real HTTP from a running system and checked against what happened."""

from __future__ import annotations

import sqlite3
import tempfile
import urllib.request
from datetime import UTC, datetime

import ccxt
import pytest
from prometheus_client.parser import text_string_to_metric_families

import candlekeeper
from candlekeeper import SocketInUse
from candlekeeper.actors.market.errors import BadResponse
from candlekeeper.actors.metrics import Metrics, outcome
from candlekeeper.simulator.faults import FaultKind, Faults
from candlekeeper.simulator.server import BinanceSimulator
from tests.test_ingest import TF, now_ms, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(host: str, port: int) -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_outcome_labels_are_a_closed_set() -> None:
    assert outcome(None) == "ok"
    assert outcome(ccxt.RateLimitExceeded("429")) == "rate_limited"
    assert outcome(ccxt.DDoSProtection("418")) == "rate_limited"
    assert outcome(ccxt.RequestTimeout("t")) == "timeout"
    assert outcome(ccxt.NetworkError("reset")) == "network_error"
    assert outcome(ccxt.ExchangeNotAvailable("503")) == "network_error"
    assert outcome(BadResponse("truncated")) == "bad_response"
    assert outcome(ccxt.BadSymbol("x")) == "exchange_error"
    assert outcome(ValueError("?")) == "error"


def test_two_systems_have_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.request("binance", None, 0.1)
    assert a.registry.get_sample_value("candlekeeper_requests_total", {"exchange": "binance", "outcome": "ok"}) == 1
    assert b.registry.get_sample_value("candlekeeper_requests_total", {"exchange": "binance", "outcome": "ok"}) is None


def test_scraped_metrics_match_what_happened() -> None:
    start = (now_ms() // TF) * TF - 2 * 3600_000
    d = tempfile.mkdtemp(dir="/tmp")
    db = f"{d}/candles.db"
    faults = Faults(rates={FaultKind.HTTP_500: 0.15}, seed=3, paths=frozenset({"/api/v3/klines"}))
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start, faults=faults) as sim:
        system = candlekeeper.start({
            "storage": {"path": db},
            "control": {"socket": f"{d}/ctl.sock", "chaos": True},
            "metrics": {"listen": "127.0.0.1:0"},
            "ingest": {"since": datetime.fromtimestamp(start / 1000, UTC).isoformat(), "poll_interval": "1s"},
            # a breaker opened by timeouts on a loaded machine is probed again after a second
            "resilience": {"retry_base_delay": "50ms", "retry_attempts": 10, "breaker_recovery": "1s"},
            # small pages and a low rate: the backfill needs ~26 requests at 10/s, so requests queue
            "exchanges": {"binance": {"symbols": ["BTC/USDT", "ETH/USDT"], "api_base": sim.url, "rate_limit": 10,
                                      "page_limit": 10, "timeout": "2s"}},
        })
        try:
            address = system.metrics_address()
            assert address is not None and address[1] > 0

            def stored() -> int:
                with sqlite3.connect(db) as conn:
                    return conn.execute("SELECT count(*) FROM candles").fetchone()[0]

            expected = 2 * 119
            wait_until(lambda: stored() >= expected, timeout=90, what="backfill")
            system.crash("binance/series/BTC/USDT@1m")
            wait_until(lambda: value(scrape(*address), "candlekeeper_restarts_total", kind="series") >= 1,
                       what="series restart counted")
            system.crash("health")  # restart counts live outside the health actor: none are lost
            wait_until(lambda: system.health().get("restarts_by_kind") == {"series": 1, "health": 1},
                       what="restart counts kept across a health restart")
            # the restarted series resumes (backfilling, which the roll-up counts as ok) before it is ok
            wait_until(lambda: system.health()["status"] == "ok"
                       and all(s["status"] == "ok" for s in system.health()["series"]), what="health ok")
            m = scrape(*address)

            assert value(m, "candlekeeper_breaker_state", exchange="binance", state="closed") == 1
            assert value(m, "candlekeeper_breaker_state", exchange="binance", state="open") == 0
            assert value(m, "candlekeeper_up") == 1
            assert value(m, "candlekeeper_series", exchange="binance", status="ok") == 2
            ok = value(m, "candlekeeper_requests_total", exchange="binance", outcome="ok")
            failed = total(m, "candlekeeper_requests_total", exchange="binance") - ok
            assert ok >= 2 * 12 and failed >= 1  # pages of 10 over 119 candles per series, plus markets
            assert value(m, "candlekeeper_retries_total", exchange="binance") >= 1
            assert value(m, "candlekeeper_crashes_total", kind="series") == 1
            assert value(m, "candlekeeper_restarts_total", kind="health") == 1
            assert value(m, "candlekeeper_candles_stored_total") == stored()
            assert value(m, "candlekeeper_candles_written_total", exchange="binance") >= stored()
            assert value(m, "candlekeeper_rate_limit_wait_seconds_total", exchange="binance") > 0
            assert value(m, "candlekeeper_request_duration_seconds_count", exchange="binance") == ok + failed
            for symbol in ("BTC/USDT", "ETH/USDT"):
                lag = m[("candlekeeper_series_lag_seconds",
                         (("exchange", "binance"), ("symbol", symbol), ("timeframe", "1m")))]
                assert 0 <= lag < 120  # the newest closed candle is stored within a poll
        finally:
            system.stop()


def test_metrics_port_in_use_fails_fast() -> None:
    import socket

    d = tempfile.mkdtemp(dir="/tmp")
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        with pytest.raises(SocketInUse, match="metrics"):
            candlekeeper.start({
                "storage": {"path": f"{d}/c.db"},
                "control": {"socket": f"{d}/ctl.sock"},
                "metrics": {"listen": f"127.0.0.1:{port}"},
                "exchanges": {"binance": {"symbols": ["BTC/USDT"], "api_base": "http://127.0.0.1:9"}},
            })
    finally:
        taken.close()
