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

    ``settled``: each partition is read once no transaction on it is undecided (see
    ``SettledReader``), to the end that leaves: for a reader that must see every transaction
    already committed. This waits for the slowest partition; ``SettledReader`` reads each one as
    soon as it is settled."""
    if partitions is None:
        partitions = list(range((await partition_counts(kafka, [topic]))[topic]))
    if not partitions:
        return {}, {}
    async with SettledReader(kafka, topic) as reader:
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = await reader.wait_until_settled(tps) if settled else await reader.ends(tps)
        return await reader.read(ends), {tp.partition: end for tp, end in ends.items()}


class SettledReader:
    """Reads a topic's partitions from the start with ``read_committed``, and tells which of them
    have an undecided transaction.

    A partition's last stable offset (the end a ``read_committed`` reader sees) stops at its
    oldest undecided transaction; the high watermark does not. They differ while a writer's
    transaction is open, and for a moment after its commit has returned, until the broker has
    written the commit markers. A consumer group's offsets may already count that transaction
    by then, so a reader that stopped at the stable offset would miss state changes whose input
    records the group will not deliver again. A dead writer's open transaction is decided when
    its transactional id is used again or ``transaction.timeout.ms`` after it began; a hanging
    one (a broker fault) only when an operator aborts it. ``settled`` splits partitions into
    those that can be read now and those that must wait, so that one undecided transaction holds
    back only its own partition; while partitions wait, it warns every ``SETTLE_LOG_EVERY_S``."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self._committed = AIOKafkaConsumer(
            **connection_kwargs(kafka), enable_auto_commit=False, isolation_level="read_committed"
        )
        self._kafka = kafka
        self._uncommitted: AIOKafkaConsumer | None = None  # the first ``settled`` starts it
        self._waiting = UndecidedLog(topic)

    async def start(self) -> None:
        await self._committed.start()

    async def stop(self) -> None:
        try:
            if self._uncommitted is not None:
                await self._uncommitted.stop()
        finally:
            await self._committed.stop()

    async def __aenter__(self) -> SettledReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def ends(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The ends a ``read_committed`` reader sees now (the last stable offsets)."""
        ends: dict[TopicPartition, int] = await self._committed.end_offsets(tps)
        return ends

    async def settled(
        self, tps: list[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, tuple[int, int]]]:
        """(the partitions with no undecided transaction now, with their ends; the others, with
        their last stable offset and high watermark)."""
        if not tps:
            return {}, {}
        if self._uncommitted is None:
            self._uncommitted = AIOKafkaConsumer(
                **connection_kwargs(self._kafka),
                enable_auto_commit=False,
                isolation_level="read_uncommitted",
            )
            await self._uncommitted.start()
        stable = await self.ends(tps)
        high: dict[TopicPartition, int] = await self._uncommitted.end_offsets(tps)
        undecided = {tp: (stable[tp], high[tp]) for tp in tps if stable[tp] < high[tp]}
        self._waiting.note(undecided)
        return {tp: stable[tp] for tp in tps if tp not in undecided}, undecided

    async def wait_until_settled(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The ends of ``tps``, each taken once no transaction on it is undecided."""
        ends: dict[TopicPartition, int] = {}
        while tps:
            settled, undecided = await self.settled(tps)
            ends |= settled
            tps = list(undecided)
            if undecided:
                await asyncio.sleep(SETTLE_POLL_S)
        return ends

    async def read(self, ends: dict[TopicPartition, int]) -> Records:
        """Each partition's records from its start up to ``ends``, in offset order."""
        records: Records = {tp.partition: [] for tp in ends}
        tps = [tp for tp, end in ends.items() if end > 0]
        if not tps:
            return records
        reader = self._committed
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
            for tp, got in (await reader.getmany(*tps, timeout_ms=500)).items():
                records[tp.partition].extend(r for r in got if r.offset < ends[tp])
        return records


class UndecidedLog:
    """A warning, at most every ``SETTLE_LOG_EVERY_S``, while partitions wait for undecided
    transactions; the wait starts at the first check that finds one and ends at a check that
    finds none."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.started: float | None = None
        self.warned = 0.0

    def note(self, undecided: dict[TopicPartition, tuple[int, int]]) -> None:
        now = time.monotonic()
        if not undecided:
            self.started = None
            return
        if self.started is None:
            self.started = self.warned = now
        if now - self.warned < SETTLE_LOG_EVERY_S:
            return
        self.warned = now
        log.warning(
            "waiting for undecided transactions",
            topic=self.topic,
            partitions={tp.partition: {"stable": s, "high": h} for tp, (s, h) in undecided.items()},
            seconds=round(now - self.started, 1),
        )
