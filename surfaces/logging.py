"""structlog configuration for the daemon: JSON lines when not on a terminal, readable when on one.

Only `run.py` calls `configure`; an app embedding candlekeeper keeps its own structlog set-up.
pykka's own stdlib log records are routed through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection
from typing import Any

import structlog


class _Stderr:
    """Whatever `sys.stderr` is at the time of each write: a live progress display that redirects
    stderr (`backfill`'s bars) then shows log lines above itself instead of through itself."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _dropping(events: Collection[str]) -> structlog.typing.Processor:
    def drop(_: Any, __: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
        if event_dict.get("event") in events and "actor" in event_dict:
            raise structlog.DropEvent
        return event_dict

    return drop


def configure(*, json: bool | None = None, level: str = "info", drop: Collection[str] = ()) -> None:
    """`drop`: events left out when an actor logs them (the one-shot backfill logs its own
    progress, not the daemon's)."""
    if json is None:
        json = not sys.stderr.isatty()
    lvl = logging.getLevelName(level.upper())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if drop:
        shared.insert(0, _dropping(frozenset(drop)))
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info, renderer]
        if json
        else [*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))
