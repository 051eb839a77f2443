"""Half-open [from, to) ranges of open times: the arithmetic both stores use for holes and gaps."""

from __future__ import annotations


def append_range(out: list[tuple[int, int]], lo: int, hi: int) -> None:
    """Append [lo, hi), merging with the previous range where a bisection split a hole."""
    if out and out[-1][1] == lo:
        out[-1] = (out[-1][0], hi)
    else:
        out.append((lo, hi))


def subtract_ranges(
    ranges: list[tuple[int, int]], holes: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``ranges`` minus ``holes`` (both lists of half-open ranges, holes sorted)."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        for h_lo, h_hi in holes:
            if h_hi <= lo or h_lo >= hi:
                continue
            if h_lo > lo:
                out.append((lo, h_lo))
            lo = max(lo, h_hi)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out
