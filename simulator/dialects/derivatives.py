"""Expiry dates for the few plausible derivative markets each dialect lists.

Derivatives are only there so ccxt's default `load_markets` sees every listing it asks for
(and a test can make one fail); their candles are not served. Expiries are computed from the
exchange's clock so the listings stay plausible whatever the fake clock says.
"""

from __future__ import annotations

import calendar
import time

#: Binance's "no delivery" date for perpetuals (2100-12-25).
PERPETUAL_EXPIRY_MS = 4_133_404_800_000
_DAY = 86_400_000
_SETTLE_MS = 8 * 3_600_000  # deliveries settle at 08:00 UTC
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def weekly_expiry(now_ms: int, weeks_ahead: int = 0) -> int:
    """Next Friday 08:00 UTC strictly after now (plus `weeks_ahead` weeks)."""
    day = now_ms - now_ms % _DAY
    weekday = time.gmtime(day / 1000).tm_wday  # Monday = 0, Friday = 4
    t = day + ((4 - weekday) % 7) * _DAY + _SETTLE_MS
    if t <= now_ms:
        t += 7 * _DAY
    return t + weeks_ahead * 7 * _DAY


def quarterly_expiry(now_ms: int) -> int:
    """Last Friday 08:00 UTC of the current quarter (of the next one if that has passed)."""
    tm = time.gmtime(now_ms / 1000)
    year, month = tm.tm_year, ((tm.tm_mon - 1) // 3 + 1) * 3
    for _ in range(2):
        last_day = calendar.monthrange(year, month)[1]
        last = calendar.timegm((year, month, last_day, 0, 0, 0)) * 1000
        weekday = time.gmtime(last / 1000).tm_wday
        t = last - ((weekday - 4) % 7) * _DAY + _SETTLE_MS
        if t > now_ms:
            return t
        month += 3
        if month > 12:
            year, month = year + 1, month - 12
    raise AssertionError("unreachable")


def yymmdd(ms: int) -> str:
    return time.strftime("%y%m%d", time.gmtime(ms / 1000))


def ddmmmyy(ms: int) -> str:
    """Bybit/Deribit style: 27MAR26 (day without leading zero)."""
    tm = time.gmtime(ms / 1000)
    return f"{tm.tm_mday}{_MONTHS[tm.tm_mon - 1]}{tm.tm_year % 100:02d}"


def month_code(expiry_ms: int) -> str:
    """Futures month letter + year: 2026-03-27 -> "H26"."""
    tm = time.gmtime(expiry_ms / 1000)
    return "FGHJKMNQUVXZ"[tm.tm_mon - 1] + f"{tm.tm_year % 100:02d}"
