"""The one grammar of a symbol, for the config and for `ctl add` alike.

A unified symbol as ccxt writes it: `BASE/QUOTE`, with `:SETTLE` for derivatives (`BTC/USDT:USDT`,
`BTC/USD:BTC-250328`). Each part starts with a letter or digit (any script: exchanges list tokens
with non-Latin names) and holds letters, digits, `.`, `_` and `-`; no spaces, no path or control
characters, at most 100 characters in all. Whether the exchange lists it is a separate question,
answered by its market list.
"""

from __future__ import annotations

import re

MAX_LENGTH = 100
_PART = r"[^\W_][\w.-]{0,47}"
SYMBOL = re.compile(rf"{_PART}/{_PART}(?::{_PART})?")


def is_symbol(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_LENGTH and SYMBOL.fullmatch(value) is not None


def check_symbol(value: object) -> str:
    """`value` if it is a well-formed symbol; ValueError with a one-line reason otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"a symbol must be a string, got {type(value).__name__}")
    if len(value) > MAX_LENGTH:
        raise ValueError(f"symbol longer than {MAX_LENGTH} characters")
    if not SYMBOL.fullmatch(value):
        raise ValueError(
            f'{value!r} is not a "BASE/QUOTE" symbol (letters, digits, . _ -; BASE/QUOTE:SETTLE for derivatives)'
        )
    return value
