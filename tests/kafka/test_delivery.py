"""Publisher.send_all: records go out as producer batches per topic partition, on the partitions
``producer.send`` would choose, under one deadline, never larger than their topic accepts; a
topic that fails fails only its records."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import UnknownTopicOrPartitionError
from support.kafka_cluster import KafkaCluster, create_topics, unique_topic

from worker.kafka.admin import ensure_topics
from worker.kafka.delivery import SIZE_ERRORS, DeliveryFailed, OutputRecord, Publisher
from worker.kafka.topic_limits import TopicLimits


class StandInBatch:
    def __init__(self, room: int) -> None:
        self.values: list[bytes] = []
        self.headers: list[list[Any]] = []
        self.room = room

    def append(
        self, *, key: bytes | None, value: bytes, timestamp: None, headers: list[Any]
    ) -> object | None:
        if len(self.values) >= self.room:
            return None
        self.values.append(value)
        self.headers.append(headers)
        return object()

    def size(self) -> int:
        return sum(len(v) + 96 for v in self.values)


class StandInProducer:
    """Topics have 3 partitions; ``stall`` topics never get metadata, ``broken`` ones do not
    exist; a batch holds ``room`` records."""

    def __init__(self, stall: set[str] = frozenset(), broken: set[str] = frozenset()) -> None:
        self.stall, self.broken, self.room = stall, broken, 2
        self.sent: list[tuple[str, int, list[bytes]]] = []
        self.client = self  # .client.cluster.available_partitions_for_topic
        self.cluster = self

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.stall:
            await asyncio.sleep(3600)
        if topic in self.broken:
            raise UnknownTopicOrPartitionError(topic)
        return {0, 1, 2}

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> StandInBatch:
        return StandInBatch(self.room)

    async def send_batch(self, batch: StandInBatch, topic: str, *, partition: int) -> Any:
        self.sent.append((topic, partition, batch.values))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def records(*topics: str) -> list[OutputRecord]:
    return [OutputRecord(t, b"k", f"{t}-{i}".encode(), "enriched") for i, t in enumerate(topics)]


async def test_a_stalled_topic_fails_what_is_left_at_the_deadline() -> None:
    producer = StandInProducer(stall={"slow"})
    publisher = Publisher(producer, delivery_timeout_s=0.3)  # type: ignore[arg-type]
    started = time.monotonic()
    sent = await publisher.send_all(records("fast", "slow", "fast", "slow"))
    assert 0.25 < time.monotonic() - started < 2.0
    assert producer.sent == []  # metadata first: nothing was handed over yet
    errors = [f.exception() for f in sent.futures]
    assert all(isinstance(e, TimeoutError) and "within" in str(e) for e in errors)


async def test_a_missing_topic_fails_its_records_and_the_others_go_out_in_batches() -> None:
    producer = StandInProducer(broken={"gone"})
    publisher = Publisher(producer, delivery_timeout_s=5)  # type: ignore[arg-type]
    sent = await publisher.send_all(records("gone", "ok", "gone", "ok", "ok"))
    # one key, one partition; two records per batch, in order
    assert [(t, values) for t, _, values in producer.sent] == [
        ("ok", [b"ok-1", b"ok-3"]),
        ("ok", [b"ok-4"]),
    ]
    errors = [type(f.exception()).__name__ for f in sent.futures]
    assert errors == ["UnknownTopicOrPartitionError", "NoneType"] * 2 + ["NoneType"]


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_records_land_on_the_partitions_send_would_choose(kafka: KafkaCluster) -> None:
    """Keyed records: same partition as ``producer.send`` (murmur2, like the Java client);
    order kept within a partition; records without a key are delivered too."""
    by_batch, by_send = unique_topic("batch"), unique_topic("send")
    await create_topics(kafka.bootstrap_servers, [by_batch, by_send], partitions=5)
    producer = AIOKafkaProducer(**kafka.client_config(), enable_idempotence=True)
    await producer.start()
    try:
        keys = [f"post-{i}".encode() for i in range(200)]
        out = [OutputRecord(by_batch, k, b"%d" % i, "enriched") for i, k in enumerate(keys)]
        out.append(OutputRecord(by_batch, None, b"no key", "dead"))
        publisher = Publisher(producer, delivery_timeout_s=30)
        await publisher.confirm(await publisher.send_all(out))
        for i, key in enumerate(keys):
            await producer.send(by_send, b"%d" % i, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    async def read(topic: str, expect: int) -> list[tuple[bytes | None, int, bytes]]:
        consumer = AIOKafkaConsumer(
            topic, **kafka.client_config(), auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        got: list[tuple[bytes | None, int, bytes]] = []
        try:
            while len(got) < expect:
                for tp, batch in (await consumer.getmany(timeout_ms=1000)).items():
                    got += [(r.key, tp.partition, r.value) for r in batch]
        finally:
            await consumer.stop()
        return got

    batched, sent_one_by_one = await read(by_batch, 201), await read(by_send, 200)
    assert sorted(x for x in batched if x[0] is not None) == sorted(sent_one_by_one)
    assert [v for k, _, v in batched if k is None] == [b"no key"]
    for partition in range(5):  # in order within a partition
        values = [int(v) for k, p, v in batched if p == partition and k is not None]
        assert values == sorted(values)


async def test_no_batch_is_made_larger_than_its_topic_accepts() -> None:
    producer = StandInProducer()
    producer.room = 10
    publisher = Publisher(
        producer,  # type: ignore[arg-type]
        delivery_timeout_s=5,
        limits=TopicLimits({"small": 450}),
    )
    out = [OutputRecord("small", b"k", bytes([65 + i]) * 100, "enriched") for i in range(5)]
    await publisher.confirm(await publisher.send_all(out))
    # each record counts 96 + 1 + 100 bytes: two fit in 450, a third does not
    assert [len(values) for _, _, values in producer.sent] == [2, 2, 1]
    assert [v for _, _, values in producer.sent for v in values] == [r.value for r in out]


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_batches_fit_a_topic_with_a_small_record_limit(kafka: KafkaCluster) -> None:
    """A topic accepting 20,000-byte record batches: 20 records of 3,000 bytes for one key go
    out in batches that fit when the publisher knows the limit; without it the broker rejects
    the single batch they would make (and the idempotent producer's partition is broken)."""
    topic = unique_topic("small")
    await ensure_topics(kafka.client_config(), [topic], 1, configs={"max.message.bytes": "20000"})
    out = [OutputRecord(topic, b"one-key", b"%04d" % i * 750, "enriched") for i in range(20)]
    for limits, expect_error in ((TopicLimits({topic: 20_000}), None), (TopicLimits(), True)):
        producer = AIOKafkaProducer(  # the worker's batch size (kafka/clients.py)
            **kafka.client_config(), enable_idempotence=True, max_batch_size=256 * 1024
        )
        await producer.start()
        try:
            publisher = Publisher(producer, delivery_timeout_s=30, limits=limits)
            sent = await publisher.send_all(out)
            if expect_error:
                with pytest.raises(DeliveryFailed) as failed:
                    await publisher.confirm(sent)
                assert isinstance(failed.value.cause, SIZE_ERRORS)
            else:
                await publisher.confirm(sent)
        finally:
            await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, **kafka.client_config(), auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < 20 and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                got += [r.value for r in batch]
    finally:
        await consumer.stop()
    assert got == [r.value for r in out]  # the first run's, in order; nothing of the second
