"""Exceptions shared by the actors, so callers can react by kind, not by text."""


class BadResponse(Exception):
    """An exchange answered, but the answer is unusable (garbage, truncated, inconsistent)."""


class CircuitOpen(Exception):
    """The circuit breaker for an exchange is open: calls are refused until it recovers."""
