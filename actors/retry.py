import random
from dataclasses import dataclass
import ccxt
@dataclass(frozen=True)
class Retry: delay: float
@dataclass(frozen=True)
class GiveUp: reason: str
def is_retryable(e):
    return isinstance(e,(ccxt.OperationFailed,ConnectionError,TimeoutError,OSError)) or type(e).__name__ in ("BadResponse","InvalidCandles")
class RetryPolicy:
    def __init__(self, attempts=3, base_delay=1.0, max_delay=60.0, *, rng=None, retryable=is_retryable):
        self.attempts=attempts; self.base=base_delay; self.max=max_delay; self.rng=rng or random.Random(); self.retryable=retryable
    def decide(self, attempt, exc, retry_after=None):
        if not self.retryable(exc): return GiveUp(f"not retryable: {type(exc).__name__}")
        if attempt>=self.attempts: return GiveUp("attempts exhausted")
        if retry_after is not None and retry_after>=0: return Retry(retry_after)
        return Retry(self.rng.uniform(0,min(self.max,self.base*2**(attempt-1))))
def parse_retry_after(value, now_epoch):
    try: return max(0.0,float(value))
    except (TypeError,ValueError): return None
