"""bench/RESULTS.md: each script owns one section, between its two markers, replaced whole by
each run (added at the end, or after `after`, the first time). Written to a temporary file and
renamed, so an interrupted run never leaves half a file."""

from __future__ import annotations

import os
import sys

HEADER = "# Benchmark results\n"


def replace_section(path: str, text: str, begin: str, end: str, *, after: str | None = None) -> None:
    """`text` (its markers included) in place of the section `begin`...`end` of `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = HEADER
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = head + text + tail
    elif after is not None and after in old:
        head, tail = old.split(after, 1)
        new = head + after + "\n\n" + text + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(path + ".tmp", path)


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command as run (`python bench/SCRIPT ARGS`), without where its results went
    (`--results PATH`, `--results=PATH`, `--no-results`): what a section says produced it."""
    shown, skip = [], False
    for a in sys.argv[1:] if argv is None else argv:
        if skip or a == "--no-results" or a.startswith("--results="):
            skip = False
        elif a == "--results":
            skip = True
        else:
            shown.append(a)
    return " ".join([f"python bench/{script}", *shown])
