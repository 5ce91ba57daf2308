"""Helpers to feed topics and read them back in tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord


def post_bytes(i: int, text: str | None = None, **extra: Any) -> tuple[bytes, bytes]:
    post_id = f"post-{i}"
    doc = {"id": post_id, "text": text or SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], **extra}
    return post_id.encode(), orjson.dumps(doc)


SAMPLE_TEXTS = [
    "Thank you so much, this made my day!",
    "I can't believe they did that again. So annoying.",
    "Wow, I did not see that coming at all",
    "This is the saddest thing I have read all week.",
    "lol that is hilarious",
    "Why would anyone think that is a good idea?",
    "I'm really nervous about tomorrow's interview.",
    "Great job, proud of you!",
    "ok",
    "I miss my grandmother every single day.",
]


async def produce(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]], **kw: Any
) -> None:
    await produce_with_headers(bootstrap, topic, [(k, v, []) for k, v in messages], **kw)


async def produce_with_headers(
    bootstrap: str,
    topic: str,
    messages: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
    **kw: Any,
) -> None:
    """Like ``produce``, each message with its record headers, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kw)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def headers_of(record: ConsumerRecord[bytes, bytes]) -> list[tuple[str, bytes]]:
    return [(name, value) for name, value in record.headers]


async def read_all(
    bootstrap: str,
    topic: str,
    expect: int | None = None,
    timeout_s: float = 120.0,
    idle_s: float = 3.0,
    isolation_level: str = "read_uncommitted",
) -> list[ConsumerRecord[bytes, bytes]]:
    """Records of ``topic`` from the start: until ``expect`` arrived (then ``idle_s`` more, to
    catch extras), or, without ``expect``, until nothing new arrives for ``idle_s``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            got = [r for rs in batch.values() for r in rs]
            if got:
                records.extend(got)
                last_new = time.monotonic()
            reached = expect is not None and len(records) >= expect
            if (reached or expect is None) and time.monotonic() - last_new > idle_s:
                break
    finally:
        await consumer.stop()
    return records


def values(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records if r.value is not None]


async def committed_and_end(
    bootstrap: str, group_id: str, topic: str
) -> tuple[dict[int, int | None], dict[int, int]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = await partitions_of(bootstrap, topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = await consumer.end_offsets(tps)
        committed = {tp.partition: await consumer.committed(tp) for tp in tps}
        return committed, {tp.partition: ends[tp] for tp in tps}
    finally:
        await consumer.stop()


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in described[0]["partitions"])
    finally:
        await admin.close()
