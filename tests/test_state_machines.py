"""The resilience state machines, driven by random event sequences on a fake clock."""

from __future__ import annotations

import itertools
import random
import time

import ccxt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from candlekeeper.actors.market.candles import InvalidCandles
from candlekeeper.actors.market.errors import BadResponse, counts_against_exchange, is_retryable
from candlekeeper.resilience.breaker import BreakerConfig, CircuitBreaker
from candlekeeper.resilience.bucket import TokenBucket
from candlekeeper.resilience.quarantine import Quarantine
from candlekeeper.resilience.retry import GiveUp, Retry, RetryPolicy, parse_retry_after
from candlekeeper.supervisors.clock import FakeClock

# -- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_threshold_and_probes_after_timeout() -> None:
    clock = FakeClock()
    transitions: list[tuple[str, str]] = []
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, recovery_timeout=10, jitter=0), clock=clock,
                       listener=lambda o, n: transitions.append((o, n)))
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # resets the consecutive count
    for _ in range(3):
        b.record_failure()
    assert b.state == "open" and not b.allow()
    assert b.time_until_probe() == 10
    clock.advance(9.99)
    assert not b.allow()
    clock.advance(0.01)
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # one probe
    b.record_failure()  # probe failed: open again, for twice as long
    assert b.state == "open" and b.time_until_probe() == 20
    clock.advance(20)
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.snapshot()["openings"] == 0
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "open"),
                           ("open", "half_open"), ("half_open", "closed")]


def test_breaker_manual_reset() -> None:
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=1), clock=clock)
    b.record_failure()
    assert b.state == "open"
    b.reset()
    assert b.state == "closed" and b.allow() and b.snapshot()["openings"] == 0


@pytest.mark.parametrize(
    ("exc", "against"),
    [
        (ccxt.BadSymbol("x"), False), (ccxt.DDoSProtection("429"), False), (ccxt.RateLimitExceeded("x"), False),
        (InvalidCandles("garbage"), False), (ccxt.BadRequest("x"), False), (ccxt.BadResponse("x"), False),
        (ccxt.RequestTimeout("t"), True), (ccxt.OperationFailed("503"), True), (ccxt.NetworkError("x"), True),
        (ccxt.ExchangeNotAvailable("x"), True), (ConnectionResetError(), True), (TimeoutError(), True),
    ],
)
def test_what_counts_against_the_exchange(exc: BaseException, against: bool) -> None:
    """The classifier decides which errors open the breaker: the exchange unreachable or failing,
    never a rate-limit answer, one symbol's error or garbage candles."""
    assert counts_against_exchange(exc) is against


def test_breaker_slow_calls_count_as_failures() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=2, slow_call_duration=1.0), clock=FakeClock())
    b.record_success(duration=0.5)
    b.record_success(duration=1.5)
    assert b.state == "closed"
    b.record_success(duration=3.0)
    assert b.state == "open"


def test_breaker_failure_rate_window() -> None:
    clock = FakeClock()
    cfg = BreakerConfig(mode="rate", window_size=10, minimum_calls=6, failure_rate_threshold=0.5)
    b = CircuitBreaker(cfg, clock=clock)
    for failed in [True, False, True, False, True]:  # 60 % failures but only 5 calls
        (b.record_failure if failed else b.record_success)()
        clock.advance(1)
    assert b.state == "closed"
    b.record_success()  # 6 calls, 50 %: not yet (the call that crosses it is a success)
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open"


def test_breaker_rate_window_forgets_old_calls() -> None:
    """Only the last window_size calls count: old failures slide out of the window."""
    b = CircuitBreaker(BreakerConfig(mode="rate", window_size=4, minimum_calls=4, failure_rate_threshold=0.75),
                       clock=FakeClock())
    for failed in [True, True, False, False, False, False]:  # the two failures slide out
        (b.record_failure if failed else b.record_success)()
    b.record_failure()
    b.record_failure()  # window S, S, F, F: 50 %
    assert b.state == "closed"
    b.record_failure()  # window S, F, F, F: 75 %
    assert b.state == "open"


def test_breaker_config_validation() -> None:
    for bad in [dict(failure_threshold=0), dict(recovery_timeout=0), dict(half_open_max_calls=0),
                dict(failure_rate_threshold=0), dict(max_recovery_timeout=1), dict(jitter=1.5),
                dict(mode="windowed"), dict(window_size=5, minimum_calls=6)]:
        with pytest.raises(ValueError):
            BreakerConfig(**bad)


class BreakerMachine(RuleBasedStateMachine):
    """Random sequences of calls, results, time and operator actions; invariants after each."""

    @initialize(threshold=st.integers(1, 6), recovery=st.floats(0.5, 30), probes=st.integers(1, 3),
                mult=st.floats(1, 4), jitter=st.floats(0, 0.5), seed=st.integers(0, 1000),
                mode=st.sampled_from(["consecutive", "rate"]))
    def setup(self, threshold: int, recovery: float, probes: int, mult: float, jitter: float, seed: int,
              mode: str) -> None:
        self.clock = FakeClock()
        self.cfg = BreakerConfig(failure_threshold=threshold, recovery_timeout=recovery, half_open_max_calls=probes,
                                 backoff_multiplier=mult, max_recovery_timeout=recovery * 8, jitter=jitter,
                                 mode=mode, window_size=8, minimum_calls=threshold)  # type: ignore[arg-type]
        self.seen: list[tuple[str, str]] = []
        self.b = CircuitBreaker(self.cfg, clock=self.clock, rng=random.Random(seed),
                                listener=lambda o, n: self.seen.append((o, n)))
        self.admitted_in_half_open = 0
        self.last_state = "closed"
        self.failures_in_a_row = 0

    def _track(self) -> None:
        state = self.b.state
        if state != "half_open":
            self.admitted_in_half_open = 0
        self.last_state = state

    @rule()
    def call(self) -> None:
        state = self.b.state
        ok = self.b.allow()
        if state == "open":
            assert not ok, "an open breaker admitted a call before its probe time"
        if state == "closed":
            assert ok
        if state == "half_open" and ok:
            self.admitted_in_half_open += 1
        self._track()

    @rule()
    def success(self) -> None:
        self.b.record_success()
        self._track()

    @rule()
    def failure(self) -> None:
        before = self.b.state
        at = self.clock()
        k = self.b.snapshot()["openings"]
        self.b.record_failure()
        if self.b.state == "open" and before != "open":
            probe_in = self.b.next_probe_at - at
            low = self.cfg.open_time(k) * (1 - self.cfg.jitter) - 1e-9
            high = self.cfg.max_recovery_timeout * (1 + self.cfg.jitter) + 1e-9
            assert low <= probe_in <= high
        self._track()


    @rule(dt=st.floats(0, 100))
    def wait(self, dt: float) -> None:
        self.clock.advance(dt)
        self._track()

    @rule()
    def reset(self) -> None:
        self.b.reset()
        assert self.b.state == "closed" and self.b.allow()
        self._track()

    @invariant()
    def probes_bounded(self) -> None:
        assert self.admitted_in_half_open <= self.cfg.half_open_max_calls

    @invariant()
    def transitions_are_consistent(self) -> None:
        for (_, new), (old, _) in itertools.pairwise(self.seen):
            assert new == old, "listener missed or repeated a transition"
        if self.seen:
            assert self.seen[-1][1] == self.b._state


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# -- retry -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(attempts=st.integers(1, 10), base=st.floats(0, 5), cap_factor=st.floats(1, 100), seed=st.integers(0, 10**6))
def test_retry_delays_within_bounds(attempts: int, base: float, cap_factor: float, seed: int) -> None:
    policy = RetryPolicy(attempts, base, base * cap_factor, rng=random.Random(seed))
    for n in range(1, attempts + 3):
        decision = policy.decide(n, ccxt.RequestTimeout("t"))
        if n >= attempts:
            assert isinstance(decision, GiveUp)
        else:
            assert isinstance(decision, Retry)
            assert 0 <= decision.delay <= min(base * cap_factor, base * 2 ** (n - 1)) + 1e-12


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (ccxt.NetworkError("x"), True), (ccxt.RequestTimeout("x"), True), (ccxt.ExchangeNotAvailable("x"), True),
        (ccxt.OnMaintenance("x"), True), (ccxt.DDoSProtection("x"), True), (ccxt.RateLimitExceeded("x"), True),
        (ccxt.OperationFailed("500"), True), (ccxt.BadResponse("x"), True), (ccxt.NullResponse("x"), True),
        (BadResponse("garbage"), True), (InvalidCandles("garbage"), True), (ConnectionResetError(), True),
        (TimeoutError(), True),
        (ccxt.BadSymbol("x"), False), (ccxt.BadRequest("x"), False), (ccxt.AuthenticationError("x"), False),
        (ccxt.PermissionDenied("x"), False), (ccxt.ExchangeError("x"), False), (ValueError("bug"), False),
    ],
)
def test_retry_classification(exc: BaseException, retryable: bool) -> None:
    assert is_retryable(exc) is retryable
    decision = RetryPolicy(3, retryable=is_retryable).decide(1, exc)
    assert isinstance(decision, Retry) is retryable


def test_retry_after_overrides_and_parses() -> None:
    policy = RetryPolicy(3, 1, 60, rng=random.Random(1))
    assert policy.decide(1, ccxt.DDoSProtection("429"), retry_after=7.0) == Retry(7.0)
    now = time.time()
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after("-3", now) == 0.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert 28 <= parse_retry_after(date, now) <= 31
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


# -- token bucket ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 200),
    burst_factor=st.floats(0.01, 3),
    events=st.lists(st.tuples(st.floats(0, 2), st.floats(0.1, 1.0), st.booleans()), min_size=1, max_size=80),
)
def test_bucket_never_grants_more_than_rate_t_plus_burst(rate: float, burst_factor: float, events) -> None:
    clock = FakeClock()
    burst = max(1.0, rate * burst_factor)
    bucket = TokenBucket(rate, burst, clock=clock)
    grants: list[tuple[float, float]] = []
    for dt, cost_frac, _ in events:
        clock.advance(dt)
        cost = max(0.01, cost_frac * burst * 0.8)
        wait = bucket.try_acquire(cost)
        if wait == 0:
            grants.append((clock(), cost))
        else:
            # the wait is exact: after it, the same request is granted
            clock.advance(wait)
            assert bucket.try_acquire(cost) == 0.0
            grants.append((clock(), cost))
    for i in range(len(grants)):
        for j in range(i, len(grants)):
            window = grants[j][0] - grants[i][0]
            total = sum(c for _, c in grants[i : j + 1])
            assert total <= rate * window + burst + 1e-6


def test_bucket_wait_is_exact() -> None:
    clock = FakeClock()
    b = TokenBucket(10, 10, clock=clock)
    for _ in range(10):
        assert b.try_acquire() == 0.0
    assert b.try_acquire() == pytest.approx(0.1)
    clock.advance(0.1 - 1e-6)
    assert b.try_acquire() > 0
    clock.advance(2e-6)
    assert b.try_acquire() == 0.0
    assert b.try_acquire(2) == pytest.approx(0.2, abs=1e-5)  # a request costs its weight
    with pytest.raises(ValueError):
        b.try_acquire(11)  # more than burst: could never be granted


def test_bucket_penalize() -> None:
    clock = FakeClock()
    b = TokenBucket(10, 5, clock=clock)
    b.penalize(3)
    assert b.try_acquire() == pytest.approx(3.1)
    clock.advance(3.1)
    assert b.try_acquire() == 0.0


# -- quarantine --------------------------------------------------------------------------------


def test_quarantine_transitions_and_slow_probes() -> None:
    clock = FakeClock()
    q = Quarantine(threshold=3, probe_interval=10, clock=clock, max_probe_interval=35, backoff_multiplier=2)
    assert not q.record_failure() and not q.record_failure()
    assert q.record_failure() and q.quarantined  # third in a row
    assert q.time_until_probe() == 10
    clock.advance(10)
    assert q.time_until_probe() == 0
    assert not q.record_failure()  # failed probe: the next one is later
    assert q.time_until_probe() == 20
    q.record_failure()
    assert q.time_until_probe() == 35  # capped
    assert q.record_success() and not q.quarantined and q.consecutive_failures == 0
    assert not q.record_success()


@settings(max_examples=300, deadline=None)
@given(threshold=st.integers(1, 12), events=st.lists(st.booleans(), max_size=60))
def test_quarantine_matches_a_run_length_model(threshold: int, events: list[bool]) -> None:
    q = Quarantine(threshold=threshold, clock=FakeClock())
    run = 0
    for failed in events:
        if failed:
            run += 1
            newly = q.record_failure()
            assert newly == (run == threshold)
        else:
            released = q.record_success()
            assert released == (run >= threshold)
            run = 0
        assert q.quarantined == (run >= threshold)
        assert q.consecutive_failures == run
