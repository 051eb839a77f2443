"""When a forex broker's market is closed, as one small rule a series can plan by.

OANDA trades "from approximately 5 p.m. Sunday to 5 p.m. Friday, New York time": nothing ticks
in between, so no candle exists there and a series must neither wait for one nor poll for it.
The rule, in New York time (America/New_York, so daylight saving moves it in UTC):

- currencies (EUR_USD) and CFDs: closed from Friday 17:00 to Sunday 17:00;
- metals (XAU, XAG, XPT, XPD): closed from Friday 17:00 to Sunday 18:00, and every day from
  17:00 to 18:00 Monday to Thursday (spot metals' daily break).

Approximate, and said so: the open is "approximately" 17:00 (the first ticks of the week may
come minutes later: those minutes are quiet, not closed, and OANDA leaves quiet intervals out
anyway); holidays (25 December, 1 January) and the CFDs' own sessions and daily breaks are not
modelled: there the series sees minutes without candles, as on any quiet stretch.

Every boundary falls on a whole UTC hour (New York is a whole number of hours from UTC, and its
clock changes at 02:00), so the answer is the same for every instant of a UTC hour: it is
computed once per hour and kept (a page of 5000 one-minute candles asks 5000 times).
"""

from __future__ import annotations

import functools
from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

NEW_YORK = ZoneInfo("America/New_York")
METALS = frozenset({"XAU", "XAG", "XPT", "XPD"})
#: Friday's close and Sunday's reopening hour (New York) by kind of market
CLOSE_HOUR = 17
REOPEN_HOUR = {"currency": 17, "cfd": 17, "metal": 18}

HOUR_MS = 3_600_000

Kind = Literal["currency", "metal", "cfd"]
_KINDS: dict[str, Kind] = {"CURRENCY": "currency", "METAL": "metal", "CFD": "cfd"}


def kind_of(symbol: str, instrument_type: str | None = None) -> Kind:
    """The kind of market `symbol` ("EUR/USD") is: OANDA's instrument type when known (its
    instrument list says CURRENCY, METAL or CFD), else guessed from the name."""
    if instrument_type in _KINDS:
        return _KINDS[instrument_type]
    base, _, quote = symbol.replace("_", "/").partition("/")
    if base.upper() in METALS:
        return "metal"
    if len(base) == 3 and len(quote) == 3 and (base + quote).isalpha():
        return "currency"
    return "cfd"


def _ms(day: date, hour: int) -> int:
    return int(datetime(day.year, day.month, day.day, hour, tzinfo=NEW_YORK).timestamp()) * 1000


def reopens_at(t_ms: int, kind: Kind) -> int | None:
    """When a market of `kind` closed at `t_ms` reopens (UTC ms), or None if it is open."""
    return _reopens_in_hour(t_ms // HOUR_MS, kind)


@functools.lru_cache(maxsize=8192)
def _reopens_in_hour(utc_hour: int, kind: Kind) -> int | None:
    """`reopens_at` for every instant of the UTC hour `utc_hour` (see the module docstring)."""
    local = datetime.fromtimestamp(utc_hour * HOUR_MS / 1000, NEW_YORK)
    weekday, hour, day = local.weekday(), local.hour, local.date()  # Monday is 0
    sunday_open = REOPEN_HOUR[kind]
    if (weekday == 4 and hour >= CLOSE_HOUR) or weekday == 5 or (weekday == 6 and hour < sunday_open):
        return _ms(day + timedelta(days=6 - weekday), sunday_open)
    if kind == "metal" and weekday <= 3 and hour == CLOSE_HOUR:
        return _ms(day, CLOSE_HOUR + 1)
    return None
