"""Publisher.send_all alone (a stand-in producer; the real broker paths are in test_faults.py):
one deadline for the whole hand-over, and a topic that fails fails only its own records."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.errors import UnknownTopicOrPartitionError

from worker.kafka.delivery import OutputRecord, Publisher


class StandInProducer:
    """Accepts records at once, except: ``stall`` topics never get metadata, ``broken`` raise."""

    def __init__(self, stall: set[str] = frozenset(), broken: set[str] = frozenset()) -> None:
        self.stall, self.broken = stall, broken
        self.accepted: list[bytes] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        if topic in self.stall:
            await asyncio.sleep(3600)
        if topic in self.broken:
            raise UnknownTopicOrPartitionError(topic)
        self.accepted.append(value)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def records(*topics: str) -> list[OutputRecord]:
    return [OutputRecord(t, b"k", f"{t}-{i}".encode(), "enriched") for i, t in enumerate(topics)]


async def test_a_stalled_send_fails_it_and_the_rest_at_the_deadline() -> None:
    producer = StandInProducer(stall={"slow"})
    publisher = Publisher(producer, delivery_timeout_s=0.3)  # type: ignore[arg-type]
    started = time.monotonic()
    sent = await publisher.send_all(records("fast", "slow", "fast", "slow"))
    took = time.monotonic() - started
    assert 0.25 < took < 2.0, took
    assert producer.accepted == [b"fast-0"]
    errors = [f.exception() for f in sent.futures]
    assert errors[0] is None
    assert all(isinstance(e, TimeoutError) and "within" in str(e) for e in errors[1:])


async def test_a_failing_topic_fails_its_records_and_the_others_go_out() -> None:
    producer = StandInProducer(broken={"gone"})
    publisher = Publisher(producer, delivery_timeout_s=5)  # type: ignore[arg-type]
    sent = await publisher.send_all(records("gone", "ok", "gone", "ok"))
    assert producer.accepted == [b"ok-1", b"ok-3"]
    errors = [f.exception() for f in sent.futures]
    assert [type(e).__name__ for e in errors] == [
        "UnknownTopicOrPartitionError",
        "NoneType",
        "UnknownTopicOrPartitionError",
        "NoneType",
    ]
