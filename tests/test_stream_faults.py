"""Stream faults end to end: each fault of the loopback stream simulator (drops, duplicates,
reordering, missed updates and finals, stalls, expiring connections) against the real system and
the real ccxt.pro client; the store is exact afterwards (see tests/stream_support.py)."""

from __future__ import annotations

import pytest

from candlekeeper.simulator.ws import StallMode, StreamFault, StreamFaults
from tests.stream_support import (
    GRACE_S,
    fast_stream,  # noqa: F401 - a fixture
    live_exchange,
    sources,
    stream_row,
    wait_until,
)

EXCHANGES = ("binance", "okx", "bybit")


@pytest.mark.parametrize("fault", [StreamFault.DROP_RESET, StreamFault.DROP_CLOSE, StreamFault.DUPLICATE,
                                   StreamFault.REORDER, StreamFault.MISS, StreamFault.MISS_FINAL])
@pytest.mark.long
def test_random_stream_faults_leave_the_store_exact(fault, clock, tmp_path, fast_stream) -> None:
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        live.ws.set_faults(StreamFaults({fault: 0.4}, seed=7))
        for _ in range(3):
            ts = live.to_close(system)
            # the candle comes by the stream, or by REST `GRACE_S` after the close where the
            # stream failed (a missed one is noticed when a later one arrives)
            wait_until(lambda ts=ts: all((live.last(s) or 0) >= ts for s in live.symbols),
                       timeout=GRACE_S + 20, what=f"candle {ts} stored")
        live.ws.set_faults(StreamFaults())
        live.next_candle(system)
        live.wait_complete()
        live.assert_exact()
        assert live.ws.stats().faults.get(fault, 0) > 0


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_connections_expiring_and_dropping_are_reconnected(exchange, clock, tmp_path, fast_stream) -> None:
    with live_exchange(exchange, clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: stream_row(system).get("state") == "up", what="stream up")
        live.ws.update_rules(max_age_s=1.0)
        live.next_candle(system)
        wait_until(lambda: stream_row(system).get("reconnects", 0) >= 2, what="reconnects")
        live.ws.update_rules(max_age_s=None)
        live.ws.drop_connections()
        live.next_candle(system)
        live.wait_complete()
        live.assert_exact()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="back on the stream")


@pytest.mark.parametrize("stall", [StallMode.DATA, StallMode.SILENT])
def test_a_stalled_feed_is_noticed_and_reconnected(stall, clock, tmp_path, fast_stream) -> None:
    """ccxt.pro never notices a data stall (its keepalive is answered): the idle watchdog does."""
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: stream_row(system).get("state") == "up", what="stream up")
        live.ws.update_faults(stall=stall)
        wait_until(lambda: stream_row(system).get("reconnects", 0) >= 1, what="stall noticed")
        assert "no message for" in (stream_row(system).get("last_error") or "")
        live.ws.update_faults(stall=None)
        wait_until(lambda: stream_row(system).get("state") == "up", what="stream up again")
        live.next_candle(system)
        live.assert_exact()


def test_after_an_outage_the_stream_is_back_by_its_own_probe_not_the_exchanges(clock, tmp_path, fast_stream) -> None:
    """Upgrades refused long enough to open the stream's breaker: once the exchange takes
    connections again, the stream probes within `stream_max_recovery`, not after the REST
    breaker's minute (`breaker_recovery`) or the REST retry cap (`retry_max_delay`). The deadline
    below only tells "seconds" from "a minute": it is no timing claim."""
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start(breaker_recovery="60s", retry_max_delay="60s", breaker_threshold=2,
                            stream_recovery="200ms", stream_max_recovery="1s")
        live.wait_complete()
        wait_until(lambda: stream_row(system).get("state") == "up", what="stream up")
        live.ws.update_faults(handshake_status=503)
        live.ws.drop_connections()
        wait_until(lambda: stream_row(system).get("breaker") == "open", what="the stream's breaker open")
        wait_until(lambda: live.ws.stats().handshakes_refused >= 4,
                   what="probes refused while the exchange is out")
        live.ws.update_faults(handshake_status=None)
        wait_until(lambda: stream_row(system).get("state") == "up", timeout=20.0, what="stream up again")
        live.next_candle(system)
        live.wait_complete()
        live.assert_exact()
