"""The resilience state machines: circuit breaker, retry policy, token bucket, quarantine.

Plain classes with an injected clock and random source and no threads, so they are tested
exhaustively; the actors wrap them. Nothing here knows an exchange or an exception library:
which errors count, retry or rate-limit is decided by the caller's classifier and passed in.
"""
