import random, time
from dataclasses import dataclass
from typing import Callable
@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    recovery_timeout: float = 60.0
    half_open_max_calls: int = 1
    max_recovery_timeout: float = 600.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.1
    is_failure: Callable = lambda e: True
class CircuitBreaker:
    def __init__(self, config=BreakerConfig(), *, clock=time.monotonic, rng=None, listener=None):
        self.c=config; self.clock=clock; self.rng=rng or random.Random(); self._state="closed"; self.fails=0; self.openings=0; self.next_probe_at=None; self.inflight=0; self.forced=False
    @property
    def state(self):
        if self._state=="open" and self.next_probe_at is not None and self.clock()>=self.next_probe_at:
            self._state="half_open"; self.inflight=0
        return self._state
    def allow(self):
        s=self.state
        if s=="closed": return True
        if s=="open": return False
        if self.inflight < self.c.half_open_max_calls: self.inflight+=1; return True
        return False
    def _open(self):
        t=min(self.c.recovery_timeout*self.c.backoff_multiplier**self.openings, self.c.max_recovery_timeout)*self.rng.uniform(1-self.c.jitter,1+self.c.jitter)
        self.openings+=1; self._state="open"; self.next_probe_at=self.clock()+t
    def record_success(self, duration=None):
        s=self.state
        if s=="half_open": self._state="closed"; self.openings=0; self.next_probe_at=None
        if s!="open": self.fails=0
    def record_failure(self, duration=None):
        s=self.state
        if s=="half_open": self._open(); return
        if s=="open": return
        self.fails+=1
        if self.fails>=self.c.failure_threshold: self._open()
    def record_exception(self, exc, duration=None):
        (self.record_failure if self.c.is_failure(exc) else self.record_success)(duration)
    def reset(self): self._state="closed"; self.fails=0; self.openings=0; self.next_probe_at=None; self.forced=False
    def force_open(self): self._state="open"; self.next_probe_at=None; self.forced=True
    def time_until_probe(self):
        if self.state!="open" or self.next_probe_at is None: return None
        return max(0.0,self.next_probe_at-self.clock())
    def snapshot(self): return {"state":self.state,"consecutive_failures":self.fails,"openings":self.openings,"next_probe_in":self.time_until_probe(),"forced":self.forced}
