"""Test helpers: a settable clock, a stream simulator per test, and a real ccxt.pro client
(closed-flag tap mixed in) run in the test's own asyncio loop (pytest-asyncio is not used)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from .ccxt_pro import KlineEvent, pro_client, tapped
from .faults import StallMode
from .server import WsSimulator

EXCHANGES = ("binance", "okx", "bybit")
SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
#: A minute boundary; the simulated "now" starts 50 s into that minute.
T0 = 1_700_000_040_000 - 1_700_000_040_000 % 60_000
PERIOD_S = 0.05  # in-progress update period used by the tests
ANY: Callable[[list], bool] = lambda rows: True  # noqa: E731


class Clock:
    """The exchange's clock: only the test moves it (then calls `sim.wake()`)."""

    def __init__(self, t_ms: int) -> None:
        self.t = t_ms

    def __call__(self) -> int:
        return self.t


@contextmanager
def stream_sim(exchange: str, *, symbols: tuple[str, ...] = SYMBOLS, at: int = T0 + 50_000,
               **kwargs: Any) -> Iterator[tuple[WsSimulator, Clock]]:
    """A started `WsSimulator` with a test clock and fast updates; stopped on exit. Limits are
    the exchange's own except connection-rate ones, which reconnect tests would trip."""
    clock = Clock(at)
    sim = WsSimulator(exchange, symbols, now_ms=clock, history_start_ms=T0 - 86_400_000,
                      update_period_s=PERIOD_S, **kwargs)
    sim.update_rules(max_connections_per_window=None)
    with sim:
        yield sim, clock


def advance(sim: WsSimulator, clock: Clock, to_ms: int) -> None:
    clock.t = to_ms
    sim.wake()


class _Recorder:
    """Mixin over a tapped class: logs every kline event and lets a test await one."""

    def on_kline(self, event: KlineEvent) -> None:
        super().on_kline(event)  # type: ignore[misc]
        self.kline_log.append(event)
        changed = self.__dict__.pop("_kline_changed", None)
        if changed is not None:
            changed.set()

    @property
    def kline_log(self) -> list[KlineEvent]:
        return self.__dict__.setdefault("_kline_log", [])

    async def wait_kline(self, predicate: Callable[[KlineEvent], bool],
                         timeout: float = 5.0) -> KlineEvent:
        """The first logged event satisfying `predicate`, waiting for it if need be."""
        async def loop() -> KlineEvent:
            while True:
                for e in self.kline_log:
                    if predicate(e):
                        return e
                changed = self.__dict__.setdefault("_kline_changed", asyncio.Event())
                await changed.wait()
        return await asyncio.wait_for(loop(), timeout)


def recording(exchange: str) -> type:
    """`tapped(exchange)` that also logs every `KlineEvent` (see `_Recorder`)."""
    return type(f"{exchange}_recording", (_Recorder, tapped(exchange)), {})


@asynccontextmanager
async def pro(exchange: str, sim: WsSimulator, **config: Any) -> AsyncIterator[Any]:
    """A real ccxt.pro client of `exchange` (closed-flag tap and event log mixed in) pointed
    at `sim`."""
    ex = pro_client(exchange, sim, cls=recording(exchange), **config)
    ex.timeout_on_exit = 0  # loopback, no TLS transports to drain
    try:
        yield ex
    finally:
        await ex.close()


async def watch_until(ex: Any, symbol: str, timeframe: str,
                      predicate: Callable[[list[list]], bool], timeout: float = 5.0) -> list:
    """Await `watch_ohlcv` until the rows it returns satisfy `predicate`; copies returned."""
    async def loop() -> list:
        while True:
            rows = [list(r) for r in await ex.watch_ohlcv(symbol, timeframe)]
            if predicate(rows):
                return rows
    return await asyncio.wait_for(loop(), timeout)


def run(coro: Any) -> Any:
    """Run one scenario in a fresh event loop (pytest-asyncio is not used)."""
    return asyncio.run(coro)


async def first_error(call: Callable[[], Awaitable[Any]], attempts: int = 100) -> BaseException:
    """Call until it raises (frames already in flight may still resolve a watch or two)."""
    for _ in range(attempts):
        try:
            await asyncio.wait_for(call(), 5)
        except Exception as e:  # noqa: BLE001 - the point is to see which one
            return e
    raise AssertionError("no error raised")


async def quiet(ex: Any, symbol: str = "BTC/USDT", attempts: int = 20) -> None:
    """Wait until watching `symbol` yields nothing for three update periods (frames sent before a stall
    began are consumed first)."""
    for _ in range(attempts):
        try:
            await asyncio.wait_for(ex.watch_ohlcv(symbol, "1m"), 3 * PERIOD_S)
        except TimeoutError:
            return
    raise AssertionError("the stream never went quiet")


async def stats_wait(sim: Any, predicate: Callable[[Any], bool]) -> Any:
    return await asyncio.to_thread(sim.wait_for, predicate)


async def pending_watch(ex: Any, sim: Any, symbol: str = "BTC/USDT") -> asyncio.Future:
    """A watch that is certainly waiting when the next thing happens: the feed is stalled
    (pushes only) and the watch has registered its future with ccxt's client.

    ccxt reports a connection failure only to watches pending at that moment: a drop between
    two watches is never raised, the next watch just reconnects (see the drop test)."""
    sim.update_faults(stall=StallMode.DATA)
    await quiet(ex, symbol)
    task = asyncio.ensure_future(ex.watch_ohlcv(symbol, "1m"))
    for _ in range(100):  # markets are loaded: the watch reaches its future without I/O
        if any(c.futures for c in ex.clients.values()):
            return task
        await asyncio.sleep(0)
    raise AssertionError("the watch never registered")


async def outcome(task: asyncio.Future) -> Any:
    try:
        return await asyncio.wait_for(task, 5)
    except Exception as e:  # noqa: BLE001
        return e


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll client-side state ccxt offers no event for."""
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(loop(), timeout)
