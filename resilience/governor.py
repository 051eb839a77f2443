"""The rate governor: our own pacing, corrected by what the exchange says of its budget.

Requests are paced at `PACING` of the exchange's `rate` (budget units a second; a request costs
its endpoint's units, charged when it goes and corrected by `settle` once the answer says what it
really cost). The pace allows a small burst, so that a late timer does not lose the exchange's
time. And whatever the pace, no window of the exchange's length holds more than one window allows,
as the exchange counts: a log keeps every request from when it went until its answer came back
plus a window (+ `GUARD`), for the exchange counted it somewhere in between. A request slow to
leave (a busy loop, a new connection, the network) never puts one too many into a window.

Exchanges that report their own count (Binance's used weight per minute, Bybit's and KuCoin's
remaining budget and reset time) also count other clients on the same address. The governor keeps
the exchange's latest word as its view of the current window (less what is in flight, less what it
sent since), and holds every request until the window resets when going on would leave less than
a reserve: a second client eating most of the budget never pushes this one into a rate-limit
answer. A rate-limit or ban answer holds everything for its Retry-After (`penalize`); one that
says nothing holds for the exchange's window, doubled for each further one in a row.
"""

from __future__ import annotations

from collections import deque

from ..supervisors.clock import Clock, monotonic

PACING = 0.99  # the fraction of the allowed rate used: even, with room for a late timer to catch up
RESERVE = 0.02  # the share of the exchange's reported budget left to races with other clients
MAX_PENALTY_S = 600.0
GUARD = 0.01  # seconds added to every window of the exchange's (timers, the edges of its windows)


class RateGovernor:
    """Admission by budget; plain class, injected clock, no threads."""

    def __init__(self, rate: float, *, clock: Clock = monotonic, window_s: float = 1.0,
                 reserve: float = RESERVE, pacing: float = PACING) -> None:
        """`rate`: units a second the exchange allows; `window_s`: the window it counts them in;
        `reserve`: the share of the exchange's reported budget left untouched."""
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.window_s = window_s
        self.reserve = reserve
        self._clock = clock
        self._pace = rate * pacing
        # tokens may go below zero (a request dearer than what is there goes, and the next waits
        # for the debt); they never exceed half the slack the pacing leaves in one window
        self._capacity = 0.5 * (1.0 - pacing) * rate * window_s
        self._tokens = self._capacity
        self._updated = clock()
        self._held_until = 0.0
        # the exchange's own count: its window's end (our clock) and what is left of it
        self._window_end: float | None = None
        self._window_left = 0.0
        self._window_limit: float | None = None
        # the log: requests in flight (ticket -> units), and those answered in the last window
        # (+ GUARD): (answered at, units), oldest first; and what they add up to
        self._budget = rate * window_s
        self._flying: dict[int, float] = {}
        self._tickets = 0
        self._answered: deque[tuple[float, float]] = deque()
        self._logged = 0.0
        self._strikes = 0
        self._struck_at = -1e18

    # -- pacing ---------------------------------------------------------------------------

    def _refill(self) -> float:
        now = self._clock()
        if now > self._updated:
            self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._pace)
            self._updated = now
        return now

    def time_until(self, cost: float) -> float:
        """Seconds until a request of `cost` units (of the exchange's own count) may go (0: now)."""
        now = self._refill()
        wait = max(-self._tokens / self._pace, self._held_until - now, self.exchange_hold(cost),
                   self._log_wait(cost, now))
        return wait if wait > 1e-9 else 0.0

    def _log_wait(self, cost: float, now: float) -> float:
        """Until `cost` more fits in the exchange's window with what it may still count (a
        request dearer than a whole window, as Kraken's OHLC at 1.2 of its 1 a second, goes
        alone). While requests in flight fill the window, the next answer decides: GUARD."""
        span = self.window_s + GUARD
        answered = self._answered
        while answered and answered[0][0] <= now - span + 1e-9:
            self._logged -= answered.popleft()[1]
        if not answered and not self._flying:
            self._logged = 0.0
            return 0.0
        excess = self._logged + cost - self._budget
        if excess <= 1e-9:
            return 0.0
        for at, units in answered:  # the oldest leave first
            excess -= units
            if excess <= 1e-9:
                return at + span - now
        if self._flying:
            return GUARD  # an answer frees room (and the exchange actor looks again then)
        return answered[-1][0] + span - now  # dearer than a window: alone in one

    def exchange_hold(self, cost: float) -> float:
        """Seconds a request of `cost` units waits for the exchange's window to reset, because
        its own count (other clients included) leaves no more than the reserve (0: none)."""
        now = self._clock()
        end = self._window_end
        if end is not None and now < end and self._window_left - cost < self._floor():
            return end - now
        return 0.0

    def take(self, cost: float, counted: float | None = None) -> int:
        """Charge a request that goes now (after `time_until` said 0): `cost` units of our pace,
        `counted` units of the exchange's own count (default: the same). Returns its ticket, for
        `answered` when its answer is back."""
        self._refill()
        self._tokens -= cost
        self._tickets += 1
        self._flying[self._tickets] = cost
        self._logged += cost
        if self._window_end is not None:
            self._window_left -= cost if counted is None else counted
        return self._tickets

    def answered(self, ticket: int, cost: float | None = None) -> None:
        """The answer to a request is back, and said it cost `cost` units (None: as charged):
        the pace pays or is refunded the difference, and the log keeps it a window from now."""
        now = self._refill()
        charged = self._flying.pop(ticket, None)
        if charged is None:
            return
        units = charged if cost is None else cost
        self._tokens = min(self._capacity, self._tokens - (units - charged))
        self._logged += units - charged
        self._answered.append((now, units))

    # -- the exchange's word --------------------------------------------------------------

    def penalize(self, seconds: float | None, *, sent_at: float | None = None) -> float:
        """The exchange said stop (429, 418, a ban) for `seconds` (None: it did not say). Holds
        every request for that long; without a Retry-After, for the exchange's window, doubled for
        each rate-limit answer in a row to a request sent after the previous hold began (answers to
        requests already in flight then are the same strike). Returns the hold in seconds."""
        now = self._refill()
        fresh = sent_at is None or sent_at >= self._struck_at
        if fresh:
            self._strikes += 1
            self._struck_at = now
        hold = seconds if seconds is not None else min(
            MAX_PENALTY_S, self.window_s * 2 ** max(0, self._strikes - 1))
        self._tokens = min(self._tokens, 0.0)
        self._held_until = max(self._held_until, now + max(0.0, hold))
        return hold

    def cleared(self) -> None:
        """A request went through: rate-limit answers are no longer in a row."""
        self._strikes = 0

    def report(self, *, remaining: float | None, limit: float | None, reset_in: float | None,
               in_flight: float = 0.0) -> bool:
        """What the exchange said of its own count: `remaining` units of `limit` left until its
        window resets in `reset_in` seconds (None: not said), with `in_flight` units of ours sent
        but not yet answered (perhaps not counted yet). True when it is at the reserve: requests
        are held until the window resets (or, with no reset known, for the exchange's window;
        see `exchange_hold`)."""
        if remaining is None:
            return False
        now = self._refill()
        if limit:
            self._window_limit = limit
        if reset_in is None or reset_in <= 0:
            if remaining - in_flight > self._floor():
                return False
            reset_in = self.window_s  # nothing said of the reset: wait a whole window
        self._window_end = now + reset_in
        self._window_left = remaining - in_flight
        return self._window_left < self._floor() + 1e-9

    def view(self) -> dict[str, float | None]:
        """What the governor believed when it was caught out (for the log line saying why): the
        exchange's last word on its window (less what was sent since), and our pace's tokens."""
        now = self._refill()
        end = self._window_end
        known = end is not None and now < end
        return {
            "exchange_left": round(self._window_left, 2) if known else None,
            "exchange_limit": self._window_limit,
            "window_ends_in": round(end - now, 3) if known and end is not None else None,
            "pace_tokens": round(self._tokens, 2),
        }

    def _floor(self) -> float:
        return self.reserve * self._window_limit if self._window_limit else 1.0

    @property
    def held_for(self) -> float:
        """Seconds left of a hold (by the exchange's word or a penalty)."""
        # (a hold by the exchange's count: when not even a request of one unit would go)
        return max(0.0, self._held_until - self._clock(), self.exchange_hold(1.0))
