"""Topic administration: create the worker's topics, describe offsets and lag."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from worker.kafka.clients import connection_kwargs
from worker.settings import KafkaSettings


async def ensure_topics(
    kafka: KafkaSettings | dict[str, Any],
    names: list[str],
    partitions: int,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> set[str]:
    """Create the topics that do not exist yet and wait until every partition has a leader.

    ``kafka`` is the settings or ready aiokafka keyword arguments. Returns the names created.
    """
    kwargs = connection_kwargs(kafka) if isinstance(kafka, KafkaSettings) else dict(kafka)
    admin = AIOKafkaAdminClient(**kwargs)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(n, partitions, replication_factor, topic_configs=configs or {})
                    for n in missing
                ],
                timeout_ms=int(timeout_s * 1000),
            )
            # aiokafka reports per-topic failures in the response instead of raising
            for topic, code, *_ in response.topic_errors:
                if code and for_code(code) is not TopicAlreadyExistsError:
                    raise for_code(code)(f"creating topic {topic!r}")
        await _wait_for_leaders(admin, list(dict.fromkeys(names)), timeout_s)
        return set(missing)
    finally:
        await admin.close()


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(topics)
        ready = {
            t["topic"]
            for t in described
            if t["error_code"] == 0
            and t["partitions"]
            and all(p["leader"] >= 0 for p in t["partitions"])
        }
        if ready >= set(topics):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without leaders after {timeout_s} s: {set(topics) - ready}")
        await asyncio.sleep(0.1)


async def describe_topics(
    kafka: KafkaSettings, names: list[str], group_id: str
) -> list[tuple[str, int, int, int | None, int | None]]:
    """(topic, partition, end offset, committed offset of the group, lag) rows."""
    consumer = AIOKafkaConsumer(
        **connection_kwargs(kafka), group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        rows: list[tuple[str, int, int, int | None, int | None]] = []
        for name in names:
            parts = consumer.partitions_for_topic(name) or set()
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(name) or set()
            tps = [TopicPartition(name, p) for p in sorted(parts)]
            if not tps:
                continue
            ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
            for tp in tps:
                committed: Any = await consumer.committed(tp)
                lag = None if committed is None else max(0, ends[tp] - committed)
                rows.append((name, tp.partition, ends[tp], committed, lag))
        return rows
    finally:
        await consumer.stop()
