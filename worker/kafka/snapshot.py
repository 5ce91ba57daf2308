"""A topic's committed records from the start to its end offsets at the moment of the call: how
the resolver rebuilds its state from the changelog, how workers and ``emoworker learn`` read the
current release, and how the final topic is read as training data."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from worker.kafka.admin import partition_counts
from worker.kafka.clients import connection_kwargs
from worker.settings import KafkaSettings

Records = dict[int, list[ConsumerRecord[bytes, bytes]]]
log = structlog.get_logger("worker.kafka.snapshot")
SETTLE_POLL_S = 0.05  # how often undecided transactions are checked again
SETTLE_LOG_EVERY_S = 10.0  # a warning while the wait lasts (a dead writer's open transaction)


async def read_to_end(
    kafka: KafkaSettings,
    topic: str,
    partitions: list[int] | None = None,
    *,
    settled: bool = False,
) -> tuple[Records, dict[int, int]]:
    """Per partition (``None``: all of the topic's; none if it does not exist), its records in
    offset order (``read_committed``: an aborted transaction's records are not seen) and the end
    offset it was read up to.

    ``settled``: first wait until no transaction on these partitions is undecided (see
    ``wait_until_settled``), and read to the end that leaves: for a reader that must see every
    transaction already committed, such as a partition's new owner restoring its state."""
    if partitions is None:
        partitions = list(range((await partition_counts(kafka, [topic]))[topic]))
    if not partitions:
        return {}, {}
    reader = AIOKafkaConsumer(
        **connection_kwargs(kafka), enable_auto_commit=False, isolation_level="read_committed"
    )
    await reader.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        if settled:
            ends = await wait_until_settled(kafka, reader, tps)
        else:
            ends = await reader.end_offsets(tps)
        records: Records = {p: [] for p in partitions}
        while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
            for tp, got in (await reader.getmany(*tps, timeout_ms=500)).items():
                records[tp.partition].extend(got)
        return records, {tp.partition: end for tp, end in ends.items()}
    finally:
        await reader.stop()


async def wait_until_settled(
    kafka: KafkaSettings, committed_reader: AIOKafkaConsumer, tps: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """Waits until every transaction on ``tps`` is decided, and returns their end offsets then.

    A partition's last stable offset (the end a ``read_committed`` reader sees) stops at its
    oldest undecided transaction; the high watermark does not. They differ while a writer's
    transaction is open, and for a moment after its commit has returned, until the broker has
    written the commit markers. A consumer group's offsets may already count that transaction
    by then, so a reader that stopped at the stable offset would miss state changes whose input
    records the group will not deliver again. A dead writer's open transaction is decided when
    its transactional id is used again or ``transaction.timeout.ms`` after it began: the wait
    can last that long, with a warning every ``SETTLE_LOG_EVERY_S``."""
    probe = AIOKafkaConsumer(
        **connection_kwargs(kafka), enable_auto_commit=False, isolation_level="read_uncommitted"
    )
    await probe.start()
    try:
        started = time.monotonic()
        warned = started
        while True:
            stable: dict[TopicPartition, int] = await committed_reader.end_offsets(tps)
            high: dict[TopicPartition, int] = await probe.end_offsets(tps)
            undecided = {
                tp.partition: (stable[tp], high[tp]) for tp in tps if stable[tp] < high[tp]
            }
            if not undecided:
                return stable
            if time.monotonic() - warned >= SETTLE_LOG_EVERY_S:
                warned = time.monotonic()
                log.warning(
                    "waiting for undecided transactions",
                    topic=tps[0].topic,
                    partitions={p: {"stable": s, "high": h} for p, (s, h) in undecided.items()},
                    seconds=round(warned - started, 1),
                )
            await asyncio.sleep(SETTLE_POLL_S)
    finally:
        await probe.stop()
