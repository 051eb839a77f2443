"""An asyncio event loop on a thread of its own: where an exchange actor's requests run.

The actor's mailbox never waits on the network: it submits a coroutine and is told the result as
a message. Every request runs under a deadline, and `stop` cancels whatever is in flight, closes
the source and ends the thread within a bounded time, whatever the network does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

log = structlog.get_logger("candlekeeper.loop")


class LoopThread:
    """One event loop on one daemon thread (a stuck one can never keep the process alive)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the loop; the future resolves on the loop's thread (keep callbacks short:
        tell an actor)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, cleanup: Callable[[], Awaitable[None]] | None = None, timeout: float = 5.0) -> None:
        """Cancel every task, run `cleanup` (close connections), end the loop, join the thread;
        all within about `timeout` seconds."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout / 2)
            if cleanup is not None:
                try:
                    await asyncio.wait_for(cleanup(), timeout=timeout / 2)
                except Exception as exc:  # noqa: BLE001 - closing is best effort; the thread ends anyway
                    log.warning("loop_cleanup_failed", error=repr(exc))

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("loop_shutdown_slow", error=repr(exc))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
