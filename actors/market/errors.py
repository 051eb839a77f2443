"""What went wrong with a request, decided in one place.

Every question the daemon asks of an exchange error (retry it? count it against the exchange's
breaker? slow down? which metric outcome?) is answered by `classify`, so the series' retry, the
exchange's breaker, its rate-limit penalty and the request metrics can never disagree.

ccxt's exception hierarchy is the vocabulary, for every source: a source that does not speak ccxt
(OANDA's REST API, say) raises the ccxt class that means the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["ok", "rate_limited", "timeout", "bad_response", "network_error", "exchange_error", "error"]
OUTCOMES: tuple[Outcome, ...] = (
    "ok", "rate_limited", "timeout", "bad_response", "network_error", "exchange_error", "error",
)


class BadResponse(Exception):
    """An exchange answered, but the answer is unusable (garbage, truncated, inconsistent)."""


class EmptyAnswer(BadResponse):
    """No candles where the exchange must have some: it fills minutes without trades, the market
    is listed, and the stretch asked for is closed (a glitch, a trading halt, a delisting)."""


class ListedSymbolRefused(BadResponse):
    """The exchange refused a symbol its own market list has (BadSymbol for a listed market):
    transient, retried, until a refreshed market list says the symbol is gone."""


@dataclass(frozen=True)
class ErrorClass:
    """The answers to every question asked of one failure.

    retryable: another attempt may succeed (the series retries with backoff).
    against_exchange: the exchange itself is unreachable or failing (its breaker counts it).
    rate_limited: the exchange said slow down (its bucket is paused for the Retry-After).
    outcome: the `outcome` label of the request metrics.
    """

    outcome: Outcome
    retryable: bool
    against_exchange: bool
    rate_limited: bool = False


OK = ErrorClass("ok", retryable=False, against_exchange=False)
RATE_LIMITED = ErrorClass("rate_limited", retryable=True, against_exchange=False, rate_limited=True)
TIMEOUT = ErrorClass("timeout", retryable=True, against_exchange=True)
# A garbled body is the transport's or one market's fault (the next answer is usually fine), and
# garbage candles for one market are that series' problem, never the whole exchange's.
GARBLED = ErrorClass("bad_response", retryable=True, against_exchange=False)
UNREACHABLE = ErrorClass("network_error", retryable=True, against_exchange=True)
# BadSymbol, BadRequest, AuthenticationError, NotSupported...: asking again gets the same answer,
# and the exchange answered, so it is up.
REFUSED = ErrorClass("exchange_error", retryable=False, against_exchange=False)
UNKNOWN = ErrorClass("error", retryable=False, against_exchange=False)


def classify(error: BaseException | None) -> ErrorClass:
    """The class of `error` (None: a success).

    Order matters: ccxt's rate-limit answers (429/418; in ccxt 4.5 `RateLimitExceeded` is not a
    `DDoSProtection`) and timeouts are `NetworkError`s, and its `BadResponse` is an
    `OperationFailed`, so they are picked out before the transient family: network errors, the
    exchange unavailable or in maintenance, and 5xx answers with an exchange error code
    (Binance's 500/503 map to `OperationFailed` itself).
    """
    if error is None:
        return OK
    import ccxt  # on first use: `ctl` reads configs (timeframes, this module's vocabulary) without ccxt

    if isinstance(error, ccxt.RateLimitExceeded | ccxt.DDoSProtection):
        return RATE_LIMITED
    if isinstance(error, ccxt.RequestTimeout | TimeoutError):
        return TIMEOUT
    if isinstance(error, BadResponse | ccxt.BadResponse):
        return GARBLED
    if isinstance(error, ccxt.OperationFailed | ConnectionError | OSError):
        return UNREACHABLE
    if isinstance(error, ccxt.ExchangeError):
        return REFUSED
    return UNKNOWN


def is_retryable(error: BaseException) -> bool:
    return classify(error).retryable


def counts_against_exchange(error: BaseException) -> bool:
    return classify(error).against_exchange


def is_rate_limited(error: BaseException) -> bool:
    return classify(error).rate_limited


def describe(error: BaseException) -> str:
    """`Type: message`, followed by the root cause when the message leaves it out: ccxt's
    NetworkError says `binance GET https://...` and keeps `Name or service not known` or
    `Connection refused` only in its `__cause__` chain, which a log line must carry."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    root: BaseException | None = None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        root = cause
        cause = cause.__cause__ or cause.__context__
    if root is None:
        return text
    reason = root.args[0] if len(root.args) == 1 and isinstance(root.args[0], BaseException) else root
    detail = str(getattr(reason, "reason", None) or reason)
    return f"{text} (cause: {detail})" if detail and detail not in text else text
