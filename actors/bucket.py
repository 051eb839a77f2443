import time
class TokenBucket:
    def __init__(self, rate=100.0, burst=None, *, clock=time.monotonic, priority_reserve=0.0):
        self.rate=rate; self.burst=burst or max(1.0,rate); self.clock=clock; self._tokens=self.burst; self.t=clock(); self.blocked_until=0.0
    def _refill(self):
        now=self.clock()
        if now<self.blocked_until: self.t=now; self._tokens=0; return
        self._tokens=min(self.burst,self._tokens+(now-max(self.t,self.blocked_until))*self.rate); self.t=now
    def time_until(self, cost=1.0, *, priority=False):
        self._refill(); now=self.clock()
        if now<self.blocked_until: return self.blocked_until-now+cost/self.rate
        return 0.0 if self._tokens>=cost else (cost-self._tokens)/self.rate
    def try_acquire(self, cost=1.0, *, priority=False):
        w=self.time_until(cost)
        if w>0: return w
        self._tokens-=cost; return 0.0
    def penalize(self, seconds):
        self._tokens=0; self.blocked_until=max(self.blocked_until,self.clock()+seconds)
