"""Topic administration: create the worker's topics, read their record limits, describe offsets
and lag."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from worker.kafka.clients import connection_kwargs
from worker.kafka.topic_limits import TopicLimits
from worker.settings import KafkaSettings, WorkerSettings

log = structlog.get_logger(__name__)


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


async def partition_counts(kafka: KafkaSettings, names: list[str]) -> dict[str, int]:
    """Each topic's number of partitions (0: the topic does not exist)."""
    admin = AIOKafkaAdminClient(**connection_kwargs(kafka))
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    counts = dict.fromkeys(names, 0)
    for t in described:
        if t["error_code"] == 0:
            counts[t["topic"]] = len(t["partitions"])
    return counts


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


async def read_topic_limits(settings: WorkerSettings, topics: Iterable[str]) -> TopicLimits:
    """``max.message.bytes`` of each topic that exists and may be described, capped by the
    producer's own request limit. A topic whose limit cannot be read (missing, not authorised)
    gets that request limit, with a warning: the broker's answer still protects it."""
    names = list(dict.fromkeys(topics))
    cap = settings.kafka.producer_max_request_bytes
    admin = AIOKafkaAdminClient(**connection_kwargs(settings.kafka))
    limits = TopicLimits()
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, n, {"max.message.bytes": None})
                for n in names
            ]
        )
    except (KafkaError, OSError) as exc:
        log.warning(
            "could not read the output topics' max.message.bytes; relying on the broker's answers",
            error=f"{type(exc).__name__}: {exc}",
        )
        return TopicLimits({n: cap for n in names})
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    for response in responses:
        for error_code, error_message, _type, name, entries, *_ in response.resources:
            value = next((e[1] for e in entries if e[0] == "max.message.bytes"), None)
            if error_code or value is None:
                log.warning(
                    "could not read a topic's max.message.bytes",
                    topic=name,
                    error_code=error_code,
                    error=error_message,
                )
                limits.max_bytes[name] = cap
                continue
            limits.max_bytes[name] = min(int(value), cap)
    return limits
