"""Re-publish dead letters to the input topic once the cause is fixed (``emoworker replay``).

The dead-letter topic is read from its earliest offset up to the end offsets taken at start, with
partitions assigned explicitly and no consumer group: nothing is committed and no running worker
is disturbed, and the dead letters that replayed messages may produce meanwhile are not read again.

Each selected letter gives back the original message: its payload decoded (UTF-8 text or base64)
with the original key and headers. A letter is skipped, with a reason, whenever that message
cannot be restored exactly: the copy was truncated, there is no copy (a tombstone), the copy does
not match its size or SHA-256, or the letter itself cannot be read. Partial data is never published.

Replay is at-least-once: nothing records which letters were replayed, so running it twice
publishes the messages twice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError

from schemas import DeadLetter
from worker.kafka.clients import build_producer, connection_kwargs, probe_credentials
from worker.kafka.delivery import DeliveryFailed, OutputRecord, Publisher, is_auth_error
from worker.kafka.headers import Headers, decode_headers
from worker.settings import WorkerSettings

UNKNOWN_KIND = "unknown"  # the kind of a record on the dead-letter topic that is no dead letter

# why a selected letter is not replayed
SKIP_NO_PAYLOAD = "no_payload"  # no copy of the message (a tombstone)
SKIP_TRUNCATED = "truncated"  # only the first bytes were kept
SKIP_BAD_PAYLOAD = "bad_payload"  # the copy is not valid base64 / UTF-8 text
SKIP_SIZE_MISMATCH = "size_mismatch"  # decoded size differs from size_bytes
SKIP_SHA256_MISMATCH = "sha256_mismatch"  # decoded bytes differ from the original's SHA-256
SKIP_BAD_KEY = "bad_key"  # key_base64 is not valid base64
SKIP_BAD_HEADERS = "bad_headers"  # a header value is not valid base64
SKIP_UNREADABLE = "unreadable_letter"  # the record is not a DeadLetter (null, not JSON, ...)

PENDING_MAX = 1000  # sends in flight before waiting for their acknowledgements
STOP_TIMEOUT_S = 10.0


class ReplayError(Exception):
    """The replay could not run or stopped part way; ``report`` holds what was done so far."""

    def __init__(self, message: str, report: ReplayReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class KindCounts:
    read: int = 0
    replayed: int = 0
    skipped: int = 0
    not_selected: int = 0


@dataclass
class ReplayReport:
    source_topic: str
    target_topic: str
    dry_run: bool
    partitions: int = 0
    read: int = 0  # dead-letter records read
    replayed: int = 0  # acknowledged by the brokers (dry run: would be published)
    not_selected: int = 0  # letters of a kind that was not asked for
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> letters
    by_kind: dict[str, KindCounts] = field(default_factory=dict)
    limit_reached: bool = False

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def kind(self, name: str) -> KindCounts:
        return self.by_kind.setdefault(name, KindCounts())

    def skip(self, kind: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.kind(kind).skipped += 1


@dataclass(frozen=True)
class Restored:
    """The original message of a dead letter, or why it cannot be restored."""

    kind: str
    key: bytes | None = None
    value: bytes | None = None
    skip_reason: str | None = None
    headers: Headers = ()


def restore_message(raw: bytes | None) -> Restored:
    """The original (key, value, headers) of one dead-letter record, exactly, or a skip
    reason."""
    if raw is None:
        return Restored(UNKNOWN_KIND, skip_reason=SKIP_UNREADABLE)
    try:
        letter = DeadLetter.model_validate_json(raw)
    except ValidationError:
        return Restored(UNKNOWN_KIND, skip_reason=SKIP_UNREADABLE)
    kind = letter.error.kind
    payload = letter.payload
    if payload.data is None:
        return Restored(kind, skip_reason=SKIP_NO_PAYLOAD)
    if payload.truncated:
        return Restored(kind, skip_reason=SKIP_TRUNCATED)
    try:
        if payload.encoding == "base64":
            value = base64.b64decode(payload.data, validate=True)
        else:
            value = payload.data.encode("utf-8")
    except (binascii.Error, UnicodeEncodeError):
        return Restored(kind, skip_reason=SKIP_BAD_PAYLOAD)
    if len(value) != payload.size_bytes:
        return Restored(kind, skip_reason=SKIP_SIZE_MISMATCH)
    if payload.sha256 is not None and hashlib.sha256(value).hexdigest() != payload.sha256.lower():
        return Restored(kind, skip_reason=SKIP_SHA256_MISMATCH)
    key: bytes | None = None
    if letter.key_base64 is not None:
        try:
            key = base64.b64decode(letter.key_base64, validate=True)
        except binascii.Error:
            return Restored(kind, skip_reason=SKIP_BAD_KEY)
    try:
        headers = decode_headers(letter.headers or [])
    except binascii.Error:
        return Restored(kind, skip_reason=SKIP_BAD_HEADERS)
    return Restored(kind, key=key, value=value, headers=headers)


async def replay_dead_letters(
    settings: WorkerSettings,
    kinds: set[str] | None = None,
    to_topic: str | None = None,
    dry_run: bool = False,
    limit: int = 0,
    stall_timeout_s: float = 60.0,
) -> ReplayReport:
    """Re-publish the dead letters of ``kinds`` (None: all) to ``to_topic`` (default: the input
    topic); at most ``limit`` of them (0: all). ``dry_run`` counts without publishing.

    Raises ``ReplayError`` when a topic is missing, Kafka cannot be reached, reading stalls for
    ``stall_timeout_s`` or a message cannot be delivered within ``kafka.delivery_timeout_s``.
    """
    if limit < 0:
        raise ValueError("limit must be 0 (all) or more")
    source = settings.topics.dead_letter
    target = to_topic or settings.topics.input
    report = ReplayReport(source_topic=source, target_topic=target, dry_run=dry_run)
    consumer = AIOKafkaConsumer(
        **connection_kwargs(settings.kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # letters of aborted transactions were never sent
        fetch_max_bytes=settings.kafka.fetch_max_bytes,
        max_partition_fetch_bytes=settings.kafka.max_partition_fetch_bytes,
    )
    producer: AIOKafkaProducer | None = None
    try:
        await _start(consumer, settings)
        cluster = await consumer._client.fetch_all_metadata()
        partitions = sorted(cluster.partitions_for_topic(source) or ())
        if not partitions:
            raise ReplayError(f"dead-letter topic {source!r} does not exist")
        if target not in cluster.topics():
            raise ReplayError(f"target topic {target!r} does not exist")
        report.partitions = len(partitions)
        tps = [TopicPartition(source, p) for p in partitions]
        consumer.assign(tps)
        starts: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if starts[tp] < ends[tp]}
        for tp in tps:
            consumer.seek(tp, starts[tp])
            if tp not in remaining:
                consumer.pause(tp)
        if not dry_run and remaining:
            producer = build_producer(settings.kafka)
            await _start(producer, settings)
        sender = _Sender(producer, target, report, settings.kafka.delivery_timeout_s)
        positions = dict(starts)
        last_progress = time.monotonic()
        while remaining and not report.limit_reached:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp] or report.limit_reached:
                        break
                    report.read += 1
                    restored = restore_message(record.value)
                    counts = report.kind(restored.kind)
                    counts.read += 1
                    if kinds is not None and restored.kind not in kinds | {UNKNOWN_KIND}:
                        report.not_selected += 1
                        counts.not_selected += 1
                    elif restored.skip_reason is not None:
                        report.skip(restored.kind, restored.skip_reason)
                    else:
                        assert restored.value is not None
                        await sender.send(
                            restored.kind, restored.key, restored.value, restored.headers
                        )
                        if limit and sender.sent >= limit:
                            report.limit_reached = True
            for tp in list(remaining):
                position = await consumer.position(tp)
                if position != positions[tp]:
                    positions[tp] = position
                    last_progress = time.monotonic()
                if position >= ends[tp]:
                    remaining.discard(tp)
                    consumer.pause(tp)
            if remaining and time.monotonic() - last_progress > stall_timeout_s:
                raise ReplayError(
                    f"reading {source!r} stalled for {stall_timeout_s:.0f}s with "
                    f"{len(remaining)} partition(s) short of their end offsets",
                    report,
                )
        await sender.flush()
        return report
    finally:
        if producer is not None:
            # bounded: after a failed delivery an idempotent producer may retry forever
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(producer.stop(), STOP_TIMEOUT_S)
        await consumer.stop()


class _Sender:
    """Publishes through the worker's ``Publisher`` (retries transient failures until the
    delivery timeout) in groups of ``PENDING_MAX``, and counts what was acknowledged; a dry run
    counts without sending."""

    def __init__(
        self,
        producer: AIOKafkaProducer | None,
        topic: str,
        report: ReplayReport,
        delivery_timeout_s: float,
    ) -> None:
        self.publisher = None if producer is None else Publisher(producer, delivery_timeout_s)
        self.topic = topic
        self.report = report
        self.sent = 0
        self.pending: list[OutputRecord] = []

    async def send(self, kind: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        self.sent += 1
        if self.publisher is None:
            self._acknowledged(kind)
            return
        self.pending.append(OutputRecord(self.topic, key, value, kind, headers))
        if len(self.pending) >= PENDING_MAX:
            await self.flush()

    async def flush(self) -> None:
        """Send what is pending and wait for every acknowledgement (acks=all)."""
        records, self.pending = self.pending, []
        if not records or self.publisher is None:
            return
        sent = await self.publisher.send_all(records)
        try:
            await self.publisher.confirm(sent)
        except DeliveryFailed as exc:
            # count the first attempts that were acknowledged: a lower bound when retries ran
            for record, future in zip(records, sent.futures, strict=True):
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._acknowledged(record.kind)
            raise ReplayError(
                f"publishing to {self.topic!r} failed ({exc}) after at least "
                f"{self.report.replayed} message(s) were acknowledged; a new replay publishes "
                "those again",
                self.report,
            ) from exc
        for record in records:
            self._acknowledged(record.kind)

    def _acknowledged(self, kind: str) -> None:
        self.report.replayed += 1
        self.report.kind(kind).replayed += 1


async def _start(client: AIOKafkaConsumer | AIOKafkaProducer, settings: WorkerSettings) -> None:
    """Start a client; an unreachable cluster or a rejected login becomes a ``ReplayError``."""
    kafka = settings.kafka
    try:
        await client.start()
    except KafkaConnectionError as exc:
        login = exc if is_auth_error(exc) else None
        if login is None and kafka.security_protocol.startswith("SASL"):
            login = await probe_credentials(kafka)
        if login is not None:
            raise ReplayError(
                f"Kafka authentication failed ({type(login).__name__}: {login}): check "
                "EMOWORKER_KAFKA__SASL_MECHANISM, _SASL_USERNAME and _SASL_PASSWORD"
            ) from exc
        raise ReplayError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
