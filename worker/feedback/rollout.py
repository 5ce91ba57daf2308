"""Model releases through the control topic: promote, roll back, follow.

The control topic (``topics.control``: one partition, compacted) holds one record, key
``rollout``: a ``ModelRollout`` naming the current release (a bundle folder every worker sees,
its weights' hash, optional thresholds) and the ten before it. ``emoworker rollout promote`` and
``rollback`` write it; each worker reads it at start (the release replaces the configured model)
and follows it while running: a new release is loaded beside the model in use and swapped in
between batches (``Pipeline.swap_model``), so no post waits for a restart and none is processed
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from schemas import BundleRelease, ModelRollout
from worker.kafka.admin import ensure_topics, partition_counts
from worker.kafka.clients import build_producer, connection_kwargs
from worker.kafka.snapshot import read_to_end
from worker.settings import KafkaSettings, WorkerSettings

log = structlog.get_logger(__name__)
KEY = b"rollout"
HISTORY = 10


def decode_rollout(value: bytes | None) -> ModelRollout | None:
    if value is None:
        return None
    try:
        return ModelRollout.model_validate_json(value)
    except ValidationError as exc:
        log.warning("unreadable rollout record ignored", error=str(exc).splitlines()[0])
        return None


async def read_rollout(kafka: KafkaSettings, topic: str) -> tuple[ModelRollout | None, int]:
    """The latest release on the control topic (None without one) and the offset after it."""
    records, ends = await read_to_end(kafka, topic, None)
    latest: ModelRollout | None = None
    for record in records.get(0, []):
        latest = decode_rollout(record.value) or latest
    return latest, ends.get(0, 0)


async def publish_rollout(kafka: KafkaSettings, topic: str, rollout: ModelRollout) -> None:
    await ensure_topics(kafka, [topic], 1, configs={"cleanup.policy": "compact"})
    producer = build_producer(kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topic, rollout.model_dump_json().encode(), key=KEY)
    finally:
        await producer.stop()


def _who() -> str:
    return f"{os.environ.get('USER', 'emoworker')}@{socket.gethostname()}"


async def promote(
    settings: WorkerSettings,
    model_path: str,
    revision: str | None,
    thresholds: dict[str, float] | None = None,
    reason: str = "promote",
    note: str | None = None,
) -> ModelRollout:
    """Announce ``model_path`` as the current release (the previous one kept for rollback)."""
    topic = settings.topics.control
    current, _ = await read_rollout(settings.kafka, topic)
    release = BundleRelease.model_validate(
        {
            "version": 1 if current is None else current.current.version + 1,
            "model_path": model_path,
            "revision": revision,
            "thresholds": thresholds,
            "reason": reason,
            "note": note,
            "announced_at": datetime.now(UTC),
            "announced_by": _who(),
        }
    )
    if current is None:  # the first release: a rollback returns to the configured model
        configured = BundleRelease(
            version=0,
            model_path=settings.model.path,
            reason="configured",
            announced_at=release.announced_at,
            announced_by=release.announced_by,
        )
        history = [configured]
    else:
        history = [current.current, *current.previous][:HISTORY]
    rollout = ModelRollout(current=release, previous=history)
    await publish_rollout(settings.kafka, topic, rollout)
    return rollout


async def rollback(settings: WorkerSettings, note: str | None = None) -> ModelRollout:
    """The release before the current one becomes current again (as a new version)."""
    current, _ = await read_rollout(settings.kafka, settings.topics.control)
    if current is None or not current.previous:
        raise LookupError("nothing to roll back to: the control topic has no earlier release")
    back = current.previous[0]
    release = back.model_copy(
        update={
            "version": current.current.version + 1,
            "reason": "rollback",
            "note": note or f"rollback from version {current.current.version}",
            "announced_at": datetime.now(UTC),
            "announced_by": _who(),
        }
    )
    rollout = ModelRollout(current=release, previous=[current.current, *current.previous[1:]])
    await publish_rollout(settings.kafka, settings.topics.control, rollout)
    return rollout


async def follow_rollouts(
    kafka: KafkaSettings,
    topic: str,
    start_offset: int,
    apply: Callable[[BundleRelease], Awaitable[None]],
    poll_s: float = 1.0,
    retry_s: float = 10.0,
    max_retry_s: float = 30.0,
) -> None:
    """Call ``apply`` with each release announced from ``start_offset`` on, until cancelled. A
    control topic that does not exist yet (no release was ever announced: most deployments), or
    a cluster that cannot be reached, is tried again after ``retry_s``, then after twice as long
    each time up to ``max_retry_s``: each try is a new connection (a TLS and SASL handshake on a
    secured cluster), so a worker that never gets a release makes two a minute, not six; the first
    release still reaches it within 30 s."""
    position = [start_offset]
    tries = 0  # tries in a row that never reached the topic
    while True:
        reached = [False]
        try:
            await _follow(kafka, topic, position, apply, poll_s, reached)
        except Exception as exc:
            log.warning("following the control topic failed", error=f"{type(exc).__name__}: {exc}")
        tries = 0 if reached[0] else tries + 1
        await asyncio.sleep(retry_delay(tries, retry_s, max_retry_s))


def retry_delay(tries: int, first_s: float, most_s: float) -> float:
    """The wait after ``tries`` tries in a row that did not reach the topic (0: it was reached,
    then lost): ``first_s``, doubling from the second try on, at most ``most_s``."""
    return min(first_s * 2 ** max(tries - 1, 0), most_s)


async def _follow(
    kafka: KafkaSettings,
    topic: str,
    position: list[int],
    apply: Callable[[BundleRelease], Awaitable[None]],
    poll_s: float,
    reached: list[bool],
) -> None:
    """Follow ``topic`` until an error (``reached[0]`` set once its reader started); returns at
    once when it does not exist."""
    if not (await partition_counts(kafka, [topic]))[topic]:
        return
    reader = AIOKafkaConsumer(
        **connection_kwargs(kafka), enable_auto_commit=False, isolation_level="read_committed"
    )
    await reader.start()
    reached[0] = True
    try:
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        reader.seek(tp, position[0])
        while True:
            records = (await reader.getmany(tp, timeout_ms=int(poll_s * 1000))).get(tp, [])
            rollouts = [decode_rollout(r.value) for r in records]
            latest = next((r for r in reversed(rollouts) if r is not None), None)
            if latest is not None:
                await apply(latest.current)
            if records:
                position[0] = records[-1].offset + 1
    finally:
        with contextlib.suppress(Exception):
            await reader.stop()
