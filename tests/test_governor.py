"""The rate governor on a fake clock: pacing within every window of the exchange's, costs settled
after the fact, the exchange's own counts (other clients on the same address), penalties."""

from __future__ import annotations

import pytest

from candlekeeper.resilience.governor import GUARD, PACING, RateGovernor


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drive(gov: RateGovernor, clock: FakeClock, cost: float, until: float, *, late: float = 0.0) -> list[float]:
    """Send requests of `cost` as soon as the governor allows (each `late` seconds after it said
    so, like a late timer), each answered at once, until `until`; the send times."""
    sent: list[float] = []
    while clock.t < until:
        wait = gov.time_until(cost)
        if wait > 0:
            clock.t += wait + late
            continue
        gov.answered(gov.take(cost))
        sent.append(clock.t)
    return sent


def most_in_any_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize(("rate", "window", "cost", "limit"), [
    (10.0, 2.0, 1.0, 20),  # OKX history-candles: 20 per 2 s
    (10.0, 1.0, 1.0, 10),  # Coinbase: 10 per second
    (1.0, 1.0, 1.2, 1),  # Kraken, ccxt's OHLC cost: one in any second
    (120.0, 5.0, 1.0, 600),  # Bybit: 600 per 5 s
])
def test_paced_requests_never_exceed_any_window(rate: float, window: float, cost: float, limit: int) -> None:
    clock = FakeClock()
    gov = RateGovernor(rate, clock=clock, window_s=window)
    for late in (0.0, 0.004):
        start = clock.t
        sent = drive(gov, clock, cost, start + 30.0, late=late)
        assert most_in_any_window(sent, window) <= limit
        # and the exchange's time is used: the pace, or a window's worth per window + GUARD
        best = min(PACING * rate, rate * window / (window + GUARD))
        assert len(sent) * cost >= best * 30.0 * (0.97 if late else 0.999) - cost
        clock.t += window  # idle between the runs: the burst after it is bounded too


def test_a_burst_after_idle_is_bounded_by_half_the_slack() -> None:
    clock = FakeClock()
    gov = RateGovernor(100.0, clock=clock, window_s=60.0)  # Binance weight
    clock.t += 3600
    sent = 0
    while gov.time_until(2.0) == 0:
        gov.answered(gov.take(2.0))
        sent += 1
    assert sent * 2.0 <= 0.5 * (1 - PACING) * 6000 + 2.0


def test_the_answer_settles_what_the_request_cost() -> None:
    clock = FakeClock()
    gov = RateGovernor(10.0, clock=clock, window_s=1.0)
    ticket = gov.take(0.5)  # guessed the cheap endpoint
    wait_cheap = gov.time_until(0.5)
    gov.answered(ticket, 1.0)  # the dear one was used
    assert gov.time_until(1.0) == pytest.approx(wait_cheap + 0.5 / (10 * PACING))
    refunded = gov.take(1.0)
    wait = gov.time_until(1.0)
    gov.answered(refunded, 0.5)
    assert gov.time_until(1.0) == pytest.approx(wait - 0.5 / (10 * PACING))


def test_a_request_counts_in_the_window_until_a_window_after_its_answer() -> None:
    """The exchange counted it somewhere between its leaving and its answer: a slow request (a
    new connection, a busy loop) does not free its place in the window early."""
    clock = FakeClock()
    gov = RateGovernor(10.0, clock=clock, window_s=1.0, pacing=1.0)
    tickets = []
    for _ in range(10):
        clock.t += gov.time_until(1.0)
        tickets.append(gov.take(1.0))
    clock.t += 2.0  # long after: but nothing came back yet
    assert gov.time_until(1.0) == pytest.approx(GUARD)
    gov.answered(tickets[0])
    assert gov.time_until(1.0) == pytest.approx(1.0 + GUARD)
    clock.t += 1.0 + GUARD
    assert gov.time_until(1.0) == 0


def test_the_exchanges_count_holds_requests_until_its_window_resets() -> None:
    clock = FakeClock()
    gov = RateGovernor(100.0, clock=clock, window_s=60.0)  # floor: 2 % of 6000 = 120
    assert not gov.report(remaining=5000, limit=6000, reset_in=30.0)
    assert gov.time_until(2.0) == 0
    # another client ate most of the window: 200 left, 40 of ours in flight
    assert not gov.report(remaining=200, limit=6000, reset_in=30.0, in_flight=40.0)
    sent = 0
    while gov.exchange_hold(2.0) == 0:
        clock.t += gov.time_until(2.0)  # the pace
        gov.answered(gov.take(2.0))
        sent += 1
    assert sent == 20  # 160 units down to the floor, not one more
    assert gov.time_until(2.0) == pytest.approx(30.0 - (clock.t - 1000.0), abs=0.01)
    assert gov.held_for > 29
    clock.t += 30.0
    assert gov.time_until(2.0) == 0  # a new window


def test_a_report_at_the_reserve_holds_and_says_so() -> None:
    clock = FakeClock()
    gov = RateGovernor(120.0, clock=clock, window_s=5.0)
    assert gov.report(remaining=10, limit=600, reset_in=2.5)  # under 2 % of 600
    assert gov.time_until(1.0) == pytest.approx(2.5)


def test_no_reset_known_holds_for_the_exchanges_window() -> None:
    """Bybit's reset timestamp is its current time until the limit is exceeded."""
    clock = FakeClock()
    gov = RateGovernor(120.0, clock=clock, window_s=5.0)
    assert not gov.report(remaining=300, limit=600, reset_in=None)
    assert gov.time_until(1.0) == 0
    assert gov.report(remaining=3, limit=600, reset_in=None)
    assert gov.time_until(1.0) == pytest.approx(5.0)


def test_penalties_retry_after_else_the_window_doubling_per_strike() -> None:
    clock = FakeClock()
    gov = RateGovernor(10.0, clock=clock, window_s=2.0)
    assert gov.penalize(7.0, sent_at=clock.t - 0.1) == 7.0
    assert gov.time_until(1.0) == pytest.approx(7.0)
    clock.t += 7.0
    first = clock.t
    assert gov.penalize(None, sent_at=clock.t - 0.05) == 4.0  # the second strike in a row
    # answers to requests sent before that hold began are the same strike
    assert gov.penalize(None, sent_at=first - 0.01) == 4.0
    clock.t += 4.0
    assert gov.penalize(None, sent_at=clock.t - 0.01) == 8.0
    gov.cleared()
    clock.t += 8.0
    assert gov.penalize(None, sent_at=clock.t - 0.01) == 2.0
