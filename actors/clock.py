import time
monotonic = time.monotonic
class FakeClock:
    def __init__(self, start=0.0): self.now=start
    def __call__(self): return self.now
    def advance(self, dt): self.now+=dt
