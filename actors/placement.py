"""Which live node should own a series: weighted rendezvous (highest-random-weight) hashing.

Every node scores every series with a hash of (node, series) scaled by the node's weight; the
highest score owns the series. No coordination is needed (each daemon computes the same answer
from the same node list), a node joining takes only the series it now wins, and a node leaving
gives up only its own series. With weight w_i a node owns about w_i / sum(w) of the series
(the -w / ln(u) score of Schindelhauer and Schomaker's weighted rendezvous hashing).

Placement only says who *should* own a series; the lease in the database says who does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["rendezvous_owner", "series_id"]

_SCALE = float(2**64)


def series_id(series_key: Any) -> str:
    """A stable text id of a series: ``exchange:symbol@timeframe`` from a SeriesKey-like object
    (attributes), a 3-tuple, or a string used as it is."""
    if isinstance(series_key, str):
        return series_key
    if isinstance(series_key, tuple):
        exchange, symbol, timeframe = series_key
    else:
        exchange, symbol, timeframe = series_key.exchange, series_key.symbol, series_key.timeframe
    return f"{exchange}:{symbol}@{timeframe}"


def _unit(node: str, sid: str) -> float:
    """A uniform number in (0, 1) from (node, series); the same in every process (no hash())."""
    digest = hashlib.blake2b(f"{node}\x00{sid}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _SCALE


def rendezvous_owner(series_key: Any, nodes_with_weights: Mapping[str, float]) -> str | None:
    """The node that should own ``series_key``, or None when no node has a positive weight.

    ``nodes_with_weights`` maps node name to weight (e.g. its rate budget); nodes with weight
    <= 0 (or NaN) never own anything. Ties (astronomically rare) go to the smaller node name,
    so the answer never depends on the mapping's order.
    """
    sid = series_id(series_key)
    best: str | None = None
    best_score = -math.inf
    for node, weight in nodes_with_weights.items():
        if not weight > 0 or math.isinf(weight):
            continue
        score = -weight / math.log(_unit(node, sid))
        if score > best_score or (score == best_score and best is not None and node < best):
            best, best_score = node, score
    return best
