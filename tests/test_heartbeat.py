"""Health between candles: a caught-up exchange is asked how it is (its server time) every
`heartbeat` seconds when nothing else was sent, through the same breaker, so an outage and the
recovery are both noticed before the next candle closes (on the shared clock, none closes here)."""

from __future__ import annotations

from typing import Any

from candlekeeper.simulator.faults import OutageMode
from tests.test_ingest import complete, make_config, running, sim, sim_start, wait_until  # noqa: F401 - fixtures


def _exchange(system: Any) -> dict[str, Any]:
    return system.health()["exchanges"][0]


def time_requests(sim: Any) -> int:
    return sim.stats().by_path.get("/api/v3/time", 0)


def test_an_outage_and_its_end_are_noticed_between_candles(tmp_path, sim, sim_start, running) -> None:
    cfg = make_config(tmp_path, sim, sim_start, heartbeat="500ms", breaker_threshold=2, breaker_recovery="500ms")
    system = running(cfg)
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), what="backfill")
    wait_until(lambda: all(s["status"] == "ok" for s in system.health()["series"]), what="caught up")
    beats = time_requests(sim)
    wait_until(lambda: time_requests(sim) >= beats + 2, timeout=10, what="heartbeats while idle")
    sim.set_outage(OutageMode.HTTP_503)
    wait_until(lambda: _exchange(system)["breaker"] != "closed", timeout=15, what="the outage noticed")
    assert system.health()["status"] != "ok"
    sim.set_outage(None)
    wait_until(lambda: _exchange(system)["breaker"] == "closed" and system.health()["status"] == "ok",
               timeout=20, what="the recovery noticed")


def test_no_heartbeat_when_off_or_busy(tmp_path, sim, sim_start, running) -> None:
    """`heartbeat = "off"` sends none; and none is sent while requests are going out anyway."""
    cfg = make_config(tmp_path, sim, sim_start, heartbeat="off")
    system = running(cfg)
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), what="backfill")
    assert time_requests(sim) <= 1  # at most the clock measurement after the markets load
    del system
