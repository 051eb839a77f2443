"""SIGTERM while a request is in flight (issue 16, point 2): the real daemon process, its exchange's
candle answers trickling at 1 byte/s and a request timeout of a minute, so requests are on the
wire when the signal comes. It exits 0 within a few seconds, whatever the network does."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from candlekeeper.simulator.faults import FaultKind, Faults
from candlekeeper.simulator.server import BinanceSimulator
from tests.test_daemon import RUN, workdir, write_config  # noqa: F401 - workdir is a fixture
from tests.test_ingest import TF, now_ms, wait_until

STOP_BOUND_S = 15.0  # "a few seconds": the exchange actor gives its requests 5 s to end


@pytest.mark.long(10)
def test_sigterm_with_requests_trickling_exits_0_promptly(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 3600_000
    trickle = Faults(rates={FaultKind.TRICKLE: 1.0}, paths=frozenset({"/api/v3/klines"}), trickle_bytes_per_s=1.0)
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start, faults=trickle) as sim:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start / 1000))
        cfg = write_config(workdir, f"""
[storage]
path = "candles.db"
[control]
socket = "ctl.sock"
[ingest]
since = "{since}"
[exchanges.binance]
symbols = ["BTC/USDT", "ETH/USDT"]
api_base = "{sim.url}"
rate_limit = 50
timeout = "60s"
""")
        with open(workdir / "daemon.log", "w") as log:
            proc = subprocess.Popen(RUN + ["--config", str(cfg)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
            try:
                # both series' first pages are on the wire, a byte a second
                wait_until(lambda: sim.stats().by_fault.get(FaultKind.TRICKLE, 0) >= 2 or proc.poll() is not None,
                           timeout=30, what="candle requests in flight")
                assert proc.poll() is None, (workdir / "daemon.log").read_text()[-3000:]
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout=STOP_BOUND_S)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"still running {STOP_BOUND_S:g} s after SIGTERM with requests in flight:\n"
                                         + (workdir / "daemon.log").read_text()[-3000:]) from None
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert code == 0, (workdir / "daemon.log").read_text()[-3000:]
        assert not (workdir / "ctl.sock").exists()
        text = (workdir / "daemon.log").read_text()
        assert "candlekeeper_stopped" in text
