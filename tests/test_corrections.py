"""A stored candle that a later answer gives with other values is corrected and counted (issue 16,
point 4): the store rewrites only rows whose values changed, `candlekeeper_candles_stored_total`
counts every row it inserted or changed, `candlekeeper_candles_corrected_total` only the rows it
held before with other values, and a `candles_corrected` log line says how many. Subscribers get a
candle once, when it is first stored, never again for a correction."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from candlekeeper.actors.messages import StoredCandle, Write, Written
from candlekeeper.actors.metrics import Metrics
from candlekeeper.actors.storage import StorageActor
from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.events import EventBus
from candlekeeper.supervisors.supervisor import ChildSpec, start_root
from tests.test_alerts import LogWatch

KEY = ("binance", "BTC/USDT", "1m")
T0 = 1_700_000_040_000 // 60_000 * 60_000


def row(i: int, close: float = 1.5, key: tuple[str, str, str] = KEY) -> tuple[Any, ...]:
    return (*key, T0 + i * 60_000, 1.0, 2.0, 0.5, close, 3.0)


class AckBox:
    """The `Written` acks an `Acks` actor received; a test waits for the n-th."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.acks: list[Written] = []

    def wait(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.acks) >= n, 10), f"only {len(self.acks)} acks"


class Acks(pykka.ThreadingActor):
    def __init__(self, box: AckBox) -> None:
        super().__init__()
        self.box = box

    def on_receive(self, message: Any) -> None:
        if isinstance(message, Written):
            with self.box.cond:
                self.box.acks.append(message)
                self.box.cond.notify_all()


class Storage:
    """A storage actor with metrics and a subscriber, under a root supervisor."""

    def __init__(self, path: str, runtime: Runtime) -> None:
        self.metrics = Metrics()
        self.delivered: list[StoredCandle] = []
        self.bus = EventBus()
        self.bus.subscribe(self.delivered.append)
        spec = ChildSpec("storage", StorageActor, args=(path,), kwargs={"candles": self.bus, "metrics": self.metrics})
        self.root, _ = start_root(runtime, [spec])
        self.ref = self.root.proxy().child_ref("storage").get()
        self.acks = AckBox()
        self.acks_ref = Acks.start(self.acks)
        self.sent = 0

    def write(self, *batches: list[tuple[Any, ...]]) -> None:
        """Each list is one `Write`; all told at once, so the actor may store them in one batch."""
        for rows in batches:
            self.sent += 1
            self.ref.tell(Write(rows=tuple(rows), gaps=(), token=self.sent, reply_to=self.acks_ref))
        self.acks.wait(self.sent)
        assert all(a.error is None for a in self.acks.acks)

    def value(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0

    def stop(self) -> None:
        self.acks_ref.stop()
        self.root.stop()


@pytest.fixture
def storage(tmp_path: Any, runtime: Runtime) -> Iterator[Storage]:
    s = Storage(str(tmp_path / "c.db"), runtime)
    yield s
    s.stop()


def test_new_rows_are_stored_not_corrected(storage: Storage, logs: LogWatch) -> None:
    storage.write([row(i) for i in range(5)])
    assert storage.value("candlekeeper_candles_stored_total") == 5
    assert storage.value("candlekeeper_candles_corrected_total") == 0
    storage.write([row(i) for i in range(5)])  # the same answer again: nothing changes
    assert storage.value("candlekeeper_candles_stored_total") == 5
    assert storage.value("candlekeeper_candles_corrected_total") == 0
    assert not logs.of("candles_corrected")
    assert len(storage.delivered) == 5


def test_a_candle_with_other_values_is_corrected_and_counted(storage: Storage, tmp_path: Any, logs: LogWatch) -> None:
    storage.write([row(i) for i in range(5)])
    # a later answer: candles 1 and 3 with another close (the first answer had them in progress),
    # candle 5 new
    storage.write([row(0), row(1, close=1.6), row(2), row(3, close=1.7), row(4), row(5)])
    assert storage.value("candlekeeper_candles_stored_total") == 5 + 3
    assert storage.value("candlekeeper_candles_corrected_total") == 2
    assert [e["count"] for e in logs.of("candles_corrected")] == [2]
    with Store(str(tmp_path / "c.db"), readonly=True) as store:
        assert [c[4] for c in store.candles(*KEY)] == [1.5, 1.6, 1.5, 1.7, 1.5, 1.5]
    assert [c.ts for c in storage.delivered] == [T0 + i * 60_000 for i in range(6)]  # once each


def test_overlapping_writes_in_one_batch_count_each_candle_once(storage: Storage) -> None:
    other = ("binance", "ETH/USDT", "1m")
    storage.write([row(i) for i in range(3)])
    # one series' write resent with an overlap, another series, and a correction, all in one go
    storage.write([row(i) for i in range(2, 6)], [row(i) for i in range(4, 8)], [row(i, key=other) for i in range(4)],
                  [row(0, close=1.9)])
    assert storage.value("candlekeeper_candles_stored_total") == 3 + 5 + 4 + 1
    assert storage.value("candlekeeper_candles_corrected_total") == 1
