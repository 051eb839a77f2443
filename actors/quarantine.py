import time
class Quarantine:
    def __init__(self, threshold=10, probe_interval=300.0, *, clock=time.monotonic, max_probe_interval=3600.0, backoff_multiplier=2.0):
        self.threshold=threshold; self.probe_interval=probe_interval; self.clock=clock; self.consecutive_failures=0; self.quarantined=False; self.next_probe_at=None; self.interval=probe_interval; self.maxi=max_probe_interval; self.mult=backoff_multiplier
    def record_failure(self):
        self.consecutive_failures+=1
        if self.quarantined:
            self.interval=min(self.maxi,self.interval*self.mult); self.next_probe_at=self.clock()+self.interval; return False
        if self.consecutive_failures>=self.threshold:
            self.quarantined=True; self.interval=self.probe_interval; self.next_probe_at=self.clock()+self.interval; return True
        return False
    def record_success(self):
        was=self.quarantined; self.reset(); return was
    def reset(self): self.consecutive_failures=0; self.quarantined=False; self.next_probe_at=None
    def time_until_probe(self): return None if self.next_probe_at is None else max(0.0,self.next_probe_at-self.clock())
    def snapshot(self): return {"quarantined":self.quarantined,"consecutive_failures":self.consecutive_failures,"next_probe_in":self.time_until_probe()}
