"""Publishing outputs with bounded retries.

aiokafka already retries inside one request timeout; a broker restart or a leader move can take
longer. ``Publisher.confirm`` re-sends what failed with backoff until ``delivery_timeout_s`` has
passed, then raises ``DeliveryFailed``: the worker stops consuming rather than committing past a
result it could not publish.

The deadline is enforced here, not left to aiokafka: an idempotent producer (ours) retries a
retriable error such as NOT_ENOUGH_REPLICAS forever, so its delivery futures may never resolve,
and ``send`` waits up to ``request_timeout_ms`` for the metadata of a missing topic, per record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)

from worker.kafka.headers import Headers
from worker.kafka.partitioning import partitions_for
from worker.kafka.topic_limits import TopicLimits

log = structlog.get_logger(__name__)

# a record (batch) larger than the topic accepts: with an idempotent producer the partition's
# sequence is broken after it (every later batch gets OutOfOrderSequenceNumber), so the worker's
# defence is never to send one (``topic_limits.py``); a rejection means the limit was lowered
SIZE_ERRORS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
)
NOT_RETRIABLE: tuple[type[BaseException], ...] = (
    *SIZE_ERRORS,
    InvalidTopicError,
    TopicAuthorizationFailedError,
    AuthenticationFailedError,
    SaslAuthenticationFailed,
    ProducerFenced,
)
AUTH_ERRORS: tuple[type[BaseException], ...] = (
    AuthenticationFailedError,
    SaslAuthenticationFailed,
    IllegalSaslStateError,
    UnsupportedSaslMechanismError,
)


@dataclass
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes
    kind: str  # "enriched", "review" or a dead-letter kind (for metrics)
    headers: Headers = ()


@dataclass
class Sent:
    """Records handed to the producer, their delivery futures, and when sending began."""

    records: list[OutputRecord]
    futures: list[asyncio.Future[Any]]
    started: float  # time.monotonic()


class DeliveryFailed(Exception):
    """An output could not be published: ``retriable`` is False when retrying cannot help (e.g.
    the record is larger than the topic accepts), True when the delivery timeout ran out."""

    def __init__(
        self, topic: str, waited_s: float, cause: BaseException, retriable: bool = True
    ) -> None:
        super().__init__(f"{topic}: {type(cause).__name__}: {cause}")
        self.topic, self.waited_s, self.cause, self.retriable = topic, waited_s, cause, retriable

    def stop_reason(self) -> str:
        """Why the worker stops: the line it logs before exiting 3."""
        what = f"within {self.waited_s:.0f}s (kafka.delivery_timeout_s)"
        return (
            f"could not publish to {self.topic} {what if self.retriable else '(not retriable)'}: "
            f"{type(self.cause).__name__}: {self.cause}; stopped consuming without committing "
            "past the unpublished messages" + size_hint(self)
        )


def is_auth_error(exc: BaseException) -> bool:
    """True when ``exc`` or its chain is a failed login (wrong credentials or mechanism).

    aiokafka hides a SASL failure at start-up behind ``KafkaConnectionError("Unable to
    bootstrap ...")``; ``worker.kafka.clients.probe_credentials`` recovers the real error.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AUTH_ERRORS):
            return True
        text = str(current).lower()
        if "authentication" in text or "sasl" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        delivery_timeout_s: float,
        on_retry: Callable[[], Any] | None = None,
        limits: TopicLimits | None = None,
    ) -> None:
        """``limits``: the largest record batch each topic accepts; no producer batch is made
        larger (the broker would reject the whole batch)."""
        self.producer = producer
        self.delivery_timeout_s = delivery_timeout_s
        self.on_retry = on_retry
        self.limits = limits or TopicLimits()

    async def send_all(self, records: list[OutputRecord]) -> Sent:
        """Hand every record to the producer, in order; one delivery future per record."""
        started = time.monotonic()
        return Sent(records, await self._send_each(records, started), started)

    async def _send_each(
        self, records: list[OutputRecord], started: float
    ) -> list[asyncio.Future[Any]]:
        """Hand records to the producer as whole batches, per topic partition (``send_batch``):
        every record's future is its batch's. ``send`` per record costs the event loop a
        partition lookup, an accumulator append and a future per record: 2-13 µs per post more
        of its CPU than batches, measured in the transport bench. Partitions are the producer's
        default partitioner's choice (``partitioning.py``, for all of a topic's keys at once):
        murmur2 of the key, as the Java client hashes it; a random available partition for a
        record without a key."""
        futures: list[asyncio.Future[Any] | None] = [None] * len(records)
        remaining = started + self.delivery_timeout_s - time.monotonic()
        try:
            # one deadline for the whole call, not a timeout per record (≈ 4.5 µs each); and
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the send completes, and the stage never stops
            async with asyncio.timeout(max(0.1, remaining)):
                groups = await self._by_partition(records, futures)
                for (topic, partition), members in groups.items():
                    await self._send_partition(topic, partition, records, members, futures)
        except TimeoutError:
            late = TimeoutError(f"no metadata or buffer space within {max(0.1, remaining):.0f}s")
            futures = [_failed(late) if f is None else f for f in futures]
        handed = [f for f in futures if f is not None]
        assert len(handed) == len(records), "every record has a future"
        return handed

    async def _by_partition(
        self, records: list[OutputRecord], futures: list[asyncio.Future[Any] | None]
    ) -> dict[tuple[str, int], list[int]]:
        """Record indices per (topic, partition), in order; a topic whose metadata cannot be
        had fails its records (their futures) at once."""
        by_topic: dict[str, list[int]] = {}
        for n, record in enumerate(records):
            by_topic.setdefault(record.topic, []).append(n)
        partition_of: dict[int, int] = {}
        for topic, members in by_topic.items():
            try:
                partitions = sorted(await self.producer.partitions_for(topic))
                cluster = self.producer.client.cluster
                available = list(cluster.available_partitions_for_topic(topic) or ())
            except KafkaError as exc:  # e.g. the topic does not exist
                for n in members:
                    futures[n] = _failed(exc)
                continue
            keys = [records[n].key for n in members]
            chosen = partitions_for(keys, partitions, available)
            partition_of.update(zip(members, chosen, strict=True))
        groups: dict[tuple[str, int], list[int]] = {}
        for n, record in enumerate(records):
            if n in partition_of:
                groups.setdefault((record.topic, partition_of[n]), []).append(n)
        return groups

    async def _send_partition(
        self,
        topic: str,
        partition: int,
        records: list[OutputRecord],
        members: list[int],
        futures: list[asyncio.Future[Any] | None],
    ) -> None:
        """``records[members]``, in order, in as few producer batches as they fit (the
        producer's batch size and the topic's record limit)."""
        limit = self.limits.limit_of(topic)
        sizes: list[int] = []
        if limit is not None:  # measured once per record; most calls fit one batch anyway
            sizes = [
                self.limits.record_bytes(r.key, r.value, r.headers)
                for r in map(records.__getitem__, members)
            ]
            if sum(sizes) <= limit:
                limit = None
        batch = self.producer.create_batch()
        in_batch: list[int] = []
        for position, n in enumerate(members):
            record = records[n]
            fits = limit is None or not in_batch or batch.size() + sizes[position] <= limit
            if not fits or not _append(batch, record):  # full: send it, start the next
                await self._send_batch(batch, topic, partition, in_batch, futures)
                batch, in_batch = self.producer.create_batch(), []
                _append(batch, record)  # a batch takes its first record whatever its size
            in_batch.append(n)
        await self._send_batch(batch, topic, partition, in_batch, futures)

    async def _send_batch(
        self,
        batch: Any,
        topic: str,
        partition: int,
        members: list[int],
        futures: list[asyncio.Future[Any] | None],
    ) -> None:
        try:
            future: asyncio.Future[Any] = await self.producer.send_batch(
                batch, topic, partition=partition
            )
        except KafkaError as exc:
            future = _failed(exc)
        for n in members:
            futures[n] = future

    async def confirm(self, sent: Sent, retry: bool = True) -> None:
        """Wait for every acknowledgement, re-sending failures until the delivery timeout.

        Raises ``DeliveryFailed`` at once for an error that cannot heal (e.g. the record is
        larger than the topic accepts), or with ``retry=False`` (transactions) for any error;
        otherwise once ``delivery_timeout_s`` has passed since sending began.
        """
        deadline = sent.started + self.delivery_timeout_s
        delay = 0.2
        pending = list(zip(sent.records, sent.futures, strict=True))
        while pending:
            await asyncio.wait(
                [f for _, f in pending], timeout=max(0.0, deadline - time.monotonic())
            )
            waited = time.monotonic() - sent.started
            unanswered = [record for record, f in pending if not f.done()]
            if unanswered:  # the producer is still retrying internally (it never gives up)
                raise DeliveryFailed(
                    unanswered[0].topic,
                    waited,
                    TimeoutError(f"{len(unanswered)} record(s) unacknowledged"),
                )
            failed = [(record, _error(f)) for record, f in pending if _error(f) is not None]
            if not failed:
                return
            record, error = failed[0]
            assert error is not None
            if isinstance(error, NOT_RETRIABLE):
                raise DeliveryFailed(record.topic, waited, error, retriable=False)
            if not retry or waited >= self.delivery_timeout_s:
                raise DeliveryFailed(record.topic, waited, error)
            log.warning(
                "publish failed; retrying",
                topic=record.topic,
                failed=len(failed),
                error=f"{type(error).__name__}: {error}",
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 5.0)
            if self.on_retry is not None:
                for _ in failed:
                    self.on_retry()
            again = [record for record, _ in failed]
            pending = list(zip(again, await self._send_each(again, sent.started), strict=True))


def size_hint(exc: BaseException) -> str:
    """What a broker's size rejection means: the worker checks every record against the output
    topics' limits read at start-up, so a limit was lowered while it ran."""
    cause = exc.cause if isinstance(exc, DeliveryFailed) else exc
    if not isinstance(cause, SIZE_ERRORS):
        return ""
    return (
        " (the broker rejected a record as too large: an output topic's max.message.bytes was "
        "lowered since start-up; the next start reads it and dead-letters such outputs as "
        "output_too_large)"
    )


def _append(batch: Any, record: OutputRecord) -> bool:
    """Add ``record`` to a producer batch; False when the batch is full."""
    headers = record.headers if type(record.headers) is list else list(record.headers)
    added = batch.append(key=record.key, value=record.value, timestamp=None, headers=headers)
    return added is not None


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _error(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return asyncio.CancelledError("delivery cancelled")
    return future.exception()
