"""Offsets: which messages are done, when their offsets are committed, and what a rebalance waits
for.

A message is done once every output it produced is acknowledged. Then:

* at-least-once: ``Checkpoint.done`` releases its offset in the tracker (which never moves past
  an earlier message of the partition still in flight), and ``commit`` (every
  ``commit_interval_ms``, on revocation and at shutdown) commits what the tracker allows;
* exactly-once: ``commit_transaction`` publishes a batch's outputs and commits its offsets in one
  Kafka transaction.

A revoked partition's messages past the batcher are finished and committed before the partition
goes (``on_revoked``); those still in the batcher are dropped (``current``): the next owner
consumes them from the committed offset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from worker.exit_codes import EXIT_DELIVERY, FatalError
from worker.inbound import Inbound
from worker.kafka.delivery import DeliveryFailed, OutputRecord, Publisher, size_hint
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.settings import WorkerSettings

log = structlog.get_logger("worker.pipeline")


class Checkpoint:
    def __init__(self, settings: WorkerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._active: dict[TopicPartition, int] = {}  # items past the batcher, per partition

    # ── tracking ────────────────────────────────────────────────────────────────────────────

    def track(self, tp: TopicPartition, offset: int) -> int:
        """A message was received; returns its partition's epoch."""
        return self.tracker.track(tp, offset)

    def admit(self, items: list[Inbound], assigned: set[TopicPartition]) -> list[Inbound]:
        """Items leaving the batcher for inference: counted until done (a revocation waits for
        them), less those whose partition was revoked since or is being revoked now."""
        for item in items:
            self._active[item.tp] = self._active.get(item.tp, 0) + 1
        return self.current(items, assigned)

    def current(
        self, items: list[Inbound], assigned: set[TopicPartition] | None = None
    ) -> list[Inbound]:
        """Items whose partition was not revoked since they were received (and, given
        ``assigned``, is still assigned); the others are released."""
        keep: list[Inbound] = []
        for item in items:
            if self.tracker.is_current(item.tp, item.epoch) and (
                assigned is None or item.tp in assigned
            ):
                keep.append(item)
            else:
                self._release(item)
        return keep

    def done(self, item: Inbound) -> None:
        """Every output of ``item`` is acknowledged: its offset may be committed."""
        self.tracker.done(item.tp, item.offset, item.epoch)
        self._release(item)

    def _release(self, item: Inbound) -> None:
        if item.tp in self._active:
            self._active[item.tp] -= 1

    # ── at-least-once ───────────────────────────────────────────────────────────────────────

    async def commit_every_interval(
        self, consumer: AIOKafkaConsumer, assigned: Callable[[], set[TopicPartition]]
    ) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_ms / 1000)
            await self.commit(consumer, assigned())

    async def commit(
        self, consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition], final: bool = False
    ) -> None:
        """Commit what the tracker allows for ``partitions`` (at-least-once; exactly-once commits
        with each transaction); a failure is retried at the next interval (a rebalance may have
        moved them)."""
        if self.settings.exactly_once:
            return
        offsets = self.tracker.committable(set(partitions))
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except Exception as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed", error=f"{type(exc).__name__}: {exc}", final=final)
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.inc()
        if final:
            log.info(
                "offsets committed",
                offsets={f"{tp.topic}:{tp.partition}": o for tp, o in sorted(offsets.items())},
            )

    # ── exactly-once ────────────────────────────────────────────────────────────────────────

    async def commit_transaction(
        self,
        producer: AIOKafkaProducer,
        publisher: Publisher,
        number: int,
        batch: list[tuple[Inbound, list[OutputRecord]]],
    ) -> list[tuple[Inbound, list[OutputRecord]]]:
        """One batch (its messages and their outputs), exactly once; returns the messages
        committed. A failure aborts the transaction and stops the worker (exit 3): the batch's
        messages are consumed again by whoever owns their partitions next."""
        # 1. only messages whose partition was not revoked meanwhile: the others are re-consumed
        current = {id(item) for item in self.current([item for item, _ in batch])}
        batch = [(item, records) for item, records in batch if id(item) in current]
        if not batch:
            return batch
        # 2. the offsets to commit: past the last message of each partition
        offsets: dict[TopicPartition, int] = {}
        for item, _ in batch:
            offsets[item.tp] = max(offsets.get(item.tp, 0), item.offset + 1)
        try:
            # 3. one transaction: every output, acknowledged (no retries inside it) ...
            async with producer.transaction():
                sent = await publisher.send_all([r for _, records in batch for r in records])
                await publisher.confirm(sent, retry=False)
                # 4. ... and the consumed offsets, committed with them
                await producer.send_offsets_to_transaction(offsets, self.settings.group_id)
        except (KafkaError, DeliveryFailed) as exc:
            raise FatalError(
                f"transaction of batch {number} failed ({type(exc).__name__}: {exc}); it was "
                "aborted and its messages will be processed again" + size_hint(exc),
                EXIT_DELIVERY,
            ) from exc
        # 5. committed: the messages are done (the caller releases them)
        self.metrics.commits.inc()
        return batch

    # ── rebalancing ─────────────────────────────────────────────────────────────────────────

    async def on_revoked(
        self,
        revoked: set[TopicPartition],
        consumer: AIOKafkaConsumer | None,
        failed: Callable[[], bool],
    ) -> None:
        """Wait (up to the grace period) until the revoked partitions' messages past the
        batcher are done, commit them, and forget the partitions. Once ``failed()`` nothing more
        can finish: no waiting."""
        deadline = time.monotonic() + max(5.0, self.settings.shutdown_grace_s)
        while time.monotonic() < deadline and not failed():
            if sum(self._active.get(tp, 0) for tp in revoked) == 0:
                break
            await asyncio.sleep(0.05)
        if consumer is not None:
            await self.commit(consumer, revoked)
        self.tracker.forget(revoked)
        for tp in revoked:
            self._active.pop(tp, None)
