"""Which markets one simulated exchange lists right now, under the exchange's own ids.

The candle history knows every market; the venue decides which are *listed* (visible in the
market list and accepted by the candle endpoint). A hidden market appears at run time through
`list_symbol`, so a daemon's market-list refresh can be tested. Readers never lock: every
change builds new lookup tables and swaps them in whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from .history import CandleHistory, Market, symbol_id


class Venue:
    """Listed markets of one exchange. `market_id`/`aliases` give the dialect's ids (aliases
    are extra ids the exchange accepts, e.g. Kraken's altnames)."""

    def __init__(self, history: CandleHistory, market_id: Callable[[Market], str],
                 aliases: Callable[[Market], Iterable[str]] = lambda m: (),
                 hidden: Iterable[str] = ()) -> None:
        self.history = history
        self._market_id = market_id
        self._aliases = aliases
        self._lock = threading.Lock()
        self._hidden = frozenset(symbol_id(s) for s in hidden)
        for key in self._hidden:
            if history.market(key) is None:
                raise ValueError(f"unlisted symbol {key!r} is not a known symbol")
        self.version = 0
        self._rebuild()

    def _rebuild(self) -> None:
        listed = tuple(m for m in self.history.markets if m.id not in self._hidden)
        by_id: dict[str, Market] = {}
        for m in listed:
            by_id[self._market_id(m)] = m
        for m in listed:
            for a in self._aliases(m):
                by_id.setdefault(a, m)
        self._listed, self._by_id = listed, by_id
        self.version += 1

    def markets(self) -> tuple[Market, ...]:
        """Listed markets, in listing order."""
        return self._listed

    def lookup(self, exchange_id: str) -> Market | None:
        """The listed market with this exchange id (or alias), else None."""
        return self._by_id.get(exchange_id)

    def id_of(self, m: Market) -> str:
        return self._market_id(m)

    def is_listed(self, symbol: str) -> bool:
        m = self.history.market(symbol)
        return m is not None and m.id not in self._hidden

    def list_symbol(self, symbol: str, listed_at_ms: int | None) -> Market:
        """List `symbol` (adding it to the history if unknown). `listed_at_ms`, when given,
        becomes its listing time: no candle opens before the one containing it."""
        with self._lock:
            m = self.history.add_market(symbol)
            if listed_at_ms is not None:
                self.history.set_listed_at(m.id, listed_at_ms)
            self._hidden = self._hidden - {m.id}
            self._rebuild()
            return m
