"""Reading the assigned partitions: fetches under backpressure, and the records aiokafka itself
cannot hand over (too large for a fetch, or unreadable) turned into dead letters instead of
stopping the partition.

``RecordReader.read_once`` fetches once and hands every record to ``deliver`` in partition
order; a record that cannot be read arrives there with a ``DecodeFailure`` and no payload, so its
offset advances like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import ConsumerRecord

from schemas import DeadLetterKind
from worker.decoding import DecodeFailure
from worker.kafka.headers import Headers
from worker.metrics import Metrics

log = structlog.get_logger(__name__)

# what aiokafka raises from getmany for a record it cannot parse (e.g. a non-UTF-8 header key)
UNREADABLE = (UnicodeDecodeError, CorruptRecordException)
REFETCHES = 3  # attempts to read a record larger than a fetch before dead-lettering it
SEARCH_S = 60  # locating an unreadable record: give up after this long without progress


class Received(NamedTuple):
    """One record read, or one that could not be (``failure`` set, no payload)."""

    tp: TopicPartition
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    failure: DecodeFailure | None = None


class RecordReader:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        assigned: Callable[[], set[TopicPartition]],
        pending: Callable[[], int],
        backlog_limit: int,
        fetch_size: int,
        deliver: Callable[[Received], None],
    ) -> None:
        """``pending``: messages received and not yet done; fetching pauses at
        ``backlog_limit`` of them and resumes below half."""
        self.consumer = consumer
        self.assigned = assigned
        self.pending = pending
        self.backlog_limit = backlog_limit
        self.fetch_size = fetch_size
        self.deliver = deliver
        self.paused = False
        self._next_offset: dict[TopicPartition, int] = {}  # after the last record received
        self._too_large: dict[tuple[TopicPartition, int], int] = {}  # refetch attempts

    async def read_once(self, stopping: Callable[[], bool]) -> None:
        """One fetch (up to 200 ms), its records delivered."""
        self._apply_backpressure()
        try:
            records = await self.consumer.getmany(timeout_ms=200, max_records=self.fetch_size)
        except UnknownTopicOrPartitionError:
            await asyncio.sleep(1)
            return
        except RecordTooLargeError as exc:
            self._record_too_large(exc)
            return
        except UNREADABLE as exc:
            await self._skip_unreadable(exc, stopping)
            return
        self._accept(records)

    def forget(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self._next_offset.pop(tp, None)

    def _accept(self, records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        assigned = self.assigned()
        for tp, batch in records.items():
            if tp not in assigned:
                continue  # revoked while the fetch was in flight
            for record in batch:
                self._next_offset[tp] = record.offset + 1
                self.deliver(
                    Received(
                        tp,
                        record.offset,
                        record.timestamp,
                        record.key,
                        record.value,
                        record.headers,
                    )
                )

    def _deliver_failure(self, tp: TopicPartition, offset: int, failure: DecodeFailure) -> None:
        self._next_offset[tp] = offset + 1
        self.deliver(Received(tp, offset, None, None, None, failure=failure))

    def _apply_backpressure(self) -> None:
        """Pause fetching while the in-flight backlog is full; resume below half."""
        pending = self.pending()
        if not self.paused and pending >= self.backlog_limit:
            self.consumer.pause(*self.assigned())
            self.paused = True
        elif self.paused and pending <= self.backlog_limit // 2:
            self.consumer.resume(*self.consumer.assignment())
            self.paused = False

    def _record_too_large(self, exc: RecordTooLargeError) -> None:
        """aiokafka got only part of a record (larger than ``max_partition_fetch_bytes`` and
        served after other partitions in one response, or from a broker older than 0.10.1) and
        skipped it. Go back: first in a fetch, a broker returns it whole. If it still does not
        come through, dead-letter it without its payload rather than lose it silently."""
        if len(exc.args) != 4:
            raise exc
        _, tp, offset, limit = exc.args
        if tp not in self.assigned():
            return
        tries = self._too_large.get((tp, offset), 0) + 1
        self._too_large[(tp, offset)] = tries
        if tries <= REFETCHES:
            log.warning(
                "record larger than a fetch; fetching it again",
                partition=tp.partition,
                offset=offset,
                fetch_bytes=limit,
                attempt=tries,
            )
            self.consumer.seek(tp, offset)
            return
        del self._too_large[(tp, offset)]
        self.consumer.seek(tp, offset + 1)
        message = (
            f"the record does not fit in one fetch of {limit:,} bytes "
            "(EMOWORKER_KAFKA__MAX_PARTITION_FETCH_BYTES); its payload could not be read"
        )
        self._deliver_failure(tp, offset, DecodeFailure("message_too_large", message))

    async def _skip_unreadable(self, exc: Exception, stopping: Callable[[], bool]) -> None:
        """aiokafka could not parse a record (a header key that is not UTF-8, a corrupt batch).
        ``getmany`` then raises, drops what it had already drained in that call (from any
        partition), and raises again on every later call: one hostile record would stop the
        worker. Go back to the first record not received in every partition, then read the
        partitions in turn, one record per call, until the unreadable one shows up: dead-letter
        it (its payload cannot be read) and carry on after it. aiokafka parses a record batch
        from its start, so the records after a bad one in the same producer batch cannot be
        read either: each becomes a dead letter the same way (none is lost)."""
        consumer = self.consumer
        log.warning("a record could not be read; locating it", error=f"{type(exc).__name__}")
        if self.paused:
            consumer.resume(*self.assigned())
            self.paused = False
        for tp in list(self.assigned()):
            consumer.seek(tp, await self._next_offset_of(tp))
        deadline = time.monotonic() + SEARCH_S  # without progress: read normally again
        while time.monotonic() < deadline and not stopping():
            if self.pending() >= self.backlog_limit:
                await asyncio.sleep(0.05)  # backpressure, as in normal reading
                continue
            received = False
            for tp in list(self.assigned()):
                try:
                    records = await consumer.getmany(tp, timeout_ms=0, max_records=1)
                except UNREADABLE as error:
                    await self._dead_letter_unreadable(tp, error)
                    return
                except KafkaError:
                    continue  # e.g. revoked meanwhile
                if records:
                    received = True
                    deadline = time.monotonic() + SEARCH_S
                    self._accept(records)
            if not received:
                await asyncio.sleep(0.05)

    async def _dead_letter_unreadable(self, tp: TopicPartition, error: Exception) -> None:
        offset = await self._next_offset_of(tp)
        self.consumer.seek(tp, offset + 1)
        kind: DeadLetterKind = (
            "invalid_utf8" if isinstance(error, UnicodeDecodeError) else "processing_error"
        )
        message = (
            "the Kafka record cannot be parsed, or one before it in its record batch "
            f"cannot ({type(error).__name__}: {error})"
        )
        self._deliver_failure(tp, offset, DecodeFailure(kind, message[:500]))
        log.warning("unreadable record dead-lettered", partition=tp.partition, offset=offset)

    async def _next_offset_of(self, tp: TopicPartition) -> int:
        """The first offset of ``tp`` not received since it was assigned."""
        if tp in self._next_offset:
            return self._next_offset[tp]
        committed = await self.consumer.committed(tp)
        if committed is None:
            committed = (await self.consumer.beginning_offsets([tp]))[tp]
        return int(committed)


async def report_lag(
    consumer: AIOKafkaConsumer, assigned: Callable[[], set[TopicPartition]], metrics: Metrics
) -> None:
    """Every 5 s: each assigned partition's lag (end offset - position) as a gauge."""
    while True:
        await asyncio.sleep(5)
        for tp in list(assigned()):
            with contextlib.suppress(Exception):
                end = consumer.highwater(tp)
                position = await consumer.position(tp)
                if end is not None:
                    metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                        max(0, end - position)
                    )
