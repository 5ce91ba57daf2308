"""``emoworker resolve``: verdicts joined with their review requests, published exactly once.

One consumer group (``resolver.group_id``) reads the review and the verdicts topics; the range
assignor gives each resolver the same partition numbers of both, so that a post's request and
its verdicts (both keyed by the post id) meet in one process. Each fetched batch is one Kafka
transaction:

1. every record of the batch goes through the join rules (``join.ResolveState``), in order;
2. waiting verdicts past ``verdict_wait_s`` are dead-lettered;
3. in one transaction: the final events, the dead letters, the changelog records of every state
   change, and the consumed offsets;
4. committed: the state in memory, the changelog and the offsets agree.

On assignment, the new partitions are paused, and the main loop reads each one's state back from
the changelog (read_committed: an aborted transaction's changes are not seen) as soon as no
transaction on that partition is undecided, and resumes it: one partition waiting for a dead
owner's open transaction holds back no other. This happens outside the rebalance callback, so
that heartbeats go on however long the wait and the restore take (aiokafka sends none while a
callback runs, and a member silent past the session timeout is evicted); on revocation the
batch in flight commits first (a lock), then the partition's state is dropped. A resolver killed
mid-transaction leaves an open transaction that is aborted when it restarts with the same
transactional id, or after ``transaction_timeout_ms``: its batch is consumed again by the next
owner, whose state does not include the aborted changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from worker.exit_codes import EXIT_CONFIG, EXIT_DELIVERY, EXIT_KAFKA, EXIT_OK, FatalError
from worker.http import HealthServer
from worker.kafka.admin import ensure_topics, partition_counts, read_topic_limits
from worker.kafka.clients import build_consumer, build_producer
from worker.kafka.snapshot import SETTLE_POLL_S, SettledReader
from worker.resolve.join import Outcome, ResolveState
from worker.settings import WorkerSettings

log = structlog.get_logger("worker.resolve")
EXPIRY_SCAN_S = 5.0  # how often the state is scanned for entries past their time
RESTORE_RECHECK_S = 0.25  # how often partitions waiting for undecided transactions are checked


class ResolverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.records = Counter(
            "emoresolver_records",
            "Records read, by kind (request, verdict; state: old entries) and outcome (pending, "
            "resolved, waiting, duplicate, dead_letter; expired, unanswered, forgotten).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.transactions = Counter(
            "emoresolver_transactions", "Transactions committed.", registry=self.registry
        )
        self.pending = Gauge(
            "emoresolver_pending_requests",
            "Review requests waiting for a verdict (owned partitions).",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "emoresolver_waiting_verdicts",
            "Verdicts waiting for their request (owned partitions).",
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Resolver:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.resolver = settings.resolver
        self.topics = settings.topics
        r = settings.resolver
        self.state = ResolveState(
            settings.worker_id, r.verdict_wait_s, r.request_ttl_s, r.keep_resolved_s
        )
        self._expired_at = 0.0  # the last scan for old entries
        self.metrics = ResolverMetrics()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._ready = False
        self.to_restore: set[TopicPartition] = set()  # assigned, paused until restored
        self._changelog: SettledReader | None = None  # open while partitions wait for a restore
        self._restore_due = 0.0  # when the main loop checks the waiting partitions again

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        http = HealthServer.of(
            self.settings,
            self.metrics.exposition,
            lambda: True,
            lambda: (self._ready, "ready" if self._ready else "starting"),
        )
        if self.settings.http_port:
            await http.start()
        try:
            await self._run()
            return EXIT_OK
        except FatalError as exc:
            log.error("resolver stopped", reason=str(exc), exit_code=exc.exit_code)
            return exc.exit_code
        finally:
            await http.stop()

    async def _run(self) -> None:
        partitions = await self._prepare_topics()
        # checked before sending, as the worker does: a record the broker rejects as too large
        # would abort every transaction that carries it
        self.state.limits = await read_topic_limits(self.settings, [self.topics.final])
        self.state.final_topic = self.topics.final
        producer = build_producer(
            self.settings.kafka,
            transactional_id=self.resolver.transactional_id
            or f"{self.resolver.group_id}-{self.settings.worker_id}",
            transaction_timeout_ms=self.settings.transaction_timeout_ms,
        )
        consumer = build_consumer(
            self.settings.kafka,
            self.resolver.group_id,
            max_poll_records=500,
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        try:
            await producer.start()
            await consumer.start()
        except KafkaError as exc:
            raise FatalError(f"cannot reach Kafka: {exc}", EXIT_KAFKA) from exc
        try:
            consumer.subscribe(
                [self.topics.review, self.topics.verdicts], listener=_Rebalance(self, consumer)
            )
            log.info("resolver started", changelog=self.resolver.changelog(), partitions=partitions)
            while not self._stop.is_set():
                if self.to_restore and time.monotonic() >= self._restore_due:
                    await self._restore_settled(consumer)
                batch = await consumer.getmany(timeout_ms=self.resolver.commit_interval_ms)
                async with self._lock:
                    await self._commit(producer, self._process(batch))
        finally:
            self._ready = False
            await self._close_changelog()
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            log.info("resolver stopped cleanly" if self._stop.is_set() else "resolver stopping")

    async def _prepare_topics(self) -> int:
        """The verdicts topic has as many partitions as the review topic (co-partitioned: a
        post's verdict lands in the partition of its request); the changelog (compacted), the
        final and the dead-letter topics are created if missing. Returns the partition count."""
        kafka, review, verdicts = self.settings.kafka, self.topics.review, self.topics.verdicts
        try:
            counts = await partition_counts(kafka, [review, verdicts])
            if counts[review] == 0:
                raise FatalError(f"review topic {review!r} does not exist", EXIT_CONFIG)
            n = counts[review]
            await ensure_topics(
                kafka, [verdicts, self.topics.final, self.topics.verdicts_dead_letter], n
            )
            await ensure_topics(
                kafka, [self.resolver.changelog()], n, configs={"cleanup.policy": "compact"}
            )
            counts = await partition_counts(kafka, [verdicts, self.resolver.changelog()])
        except (KafkaError, OSError, TimeoutError) as exc:
            raise FatalError(f"cannot reach Kafka: {exc}", EXIT_KAFKA) from exc
        for topic, count in counts.items():
            if count != n:
                raise FatalError(
                    f"topic {topic!r} has {count} partitions and the review topic {review!r} "
                    f"{n}: they must have as many (a post's records must meet in one partition)",
                    EXIT_CONFIG,
                )
        return n

    # ── one batch ───────────────────────────────────────────────────────────────────────────

    def _process(
        self, batch: dict[TopicPartition, list[Any]]
    ) -> tuple[list[tuple[int, Outcome]], dict[TopicPartition, int]]:
        now = time.time()
        outcomes: list[tuple[int, Outcome]] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            is_request = tp.topic == self.topics.review
            for record in records:
                source = {"topic": tp.topic, "partition": tp.partition, "offset": record.offset}
                if is_request:
                    outcome = self.state.on_request(tp.partition, record.value, source, now)
                else:
                    outcome = self.state.on_verdict(tp.partition, record.value, source, now)
                self.metrics.records.labels(
                    "request" if is_request else "verdict", outcome.kind
                ).inc()
                outcomes.append((tp.partition, outcome))
                offsets[tp] = record.offset + 1
        due = now - self._expired_at >= EXPIRY_SCAN_S
        for partition, outcome in self.state.expire(now) if due else []:
            self.metrics.records.labels("state", outcome.kind).inc()
            outcomes.append((partition, outcome))
        if due:
            self._expired_at = now
            self._update_gauges()  # changes of this batch not yet counted: a scan later they are
        return outcomes, offsets

    async def _commit(
        self,
        producer: AIOKafkaProducer,
        work: tuple[list[tuple[int, Outcome]], dict[TopicPartition, int]],
    ) -> None:
        outcomes, offsets = work
        if not outcomes and not offsets:
            return
        topic = {
            "final": self.topics.final,
            "dead_letter": self.topics.verdicts_dead_letter,
            "state": self.resolver.changelog(),
        }
        try:
            async with producer.transaction():
                sent = []
                for partition, outcome in outcomes:
                    for out in outcome.outputs:
                        sent.append(
                            await producer.send(
                                topic[out.sink],
                                out.value,
                                key=out.key,
                                partition=partition if out.sink == "state" else None,
                            )
                        )
                await asyncio.gather(*sent)
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self.resolver.group_id)
        except KafkaError as exc:
            raise FatalError(
                f"resolver transaction failed ({type(exc).__name__}: {exc}); it was aborted and "
                "its records will be read again",
                EXIT_DELIVERY,
            ) from exc
        self.metrics.transactions.inc()
        for _, outcome in outcomes:
            for out in outcome.outputs:
                if out.sink == "final":
                    log.debug("post resolved", post_id=out.key.decode(errors="replace"))
                elif out.sink == "dead_letter":
                    error = orjson.loads(out.value or b"{}").get("error", {})
                    log.info(
                        "verdict dead-lettered",
                        post_id=out.key.decode(errors="replace"),
                        kind=error.get("kind"),
                        reason=error.get("message"),
                    )

    # ── ownership ───────────────────────────────────────────────────────────────────────────

    async def _restore_settled(self, consumer: AIOKafkaConsumer) -> None:
        """Restores the paused partitions whose changelog has no undecided transaction and
        resumes them; the others stay paused until a later turn of the main loop. A rebalance
        meanwhile waits for the lock, so they are still assigned when resumed (only those still
        assigned are, should the client have dropped some without a revocation)."""
        async with self._lock:
            review = self.topics.review
            waiting = sorted({tp.partition for tp in self.to_restore if tp.topic == review})
            undecided = await self.restore_settled(waiting)
            done = {tp for tp in self.to_restore if tp.partition not in undecided}
            consumer.resume(*(done & consumer.assignment()))
            self.to_restore -= done
            self._restore_due = time.monotonic() + RESTORE_RECHECK_S
            if not self.to_restore:
                await self._close_changelog()
                self._ready = True

    async def restore(self, partitions: list[int]) -> None:
        """Every one of ``partitions`` restored, waiting as long as undecided transactions last."""
        try:
            while True:
                partitions = sorted(await self.restore_settled(partitions))
                if not partitions:
                    return
                await asyncio.sleep(SETTLE_POLL_S)
        finally:
            await self._close_changelog()

    async def restore_settled(self, partitions: list[int]) -> set[int]:
        """Reads the changelog into the state for each of ``partitions`` with no undecided
        transaction now, to its end; returns the others. (The previous owner's last commit may
        not have its markers yet, or a dead owner's transaction be open: the group's offsets may
        already count it, so a state without it would skip its records for good.)"""
        if not partitions:
            return set()
        changelog = self.resolver.changelog()
        if self._changelog is None:
            self._changelog = SettledReader(self.settings.kafka, changelog)
            await self._changelog.start()
        started = time.monotonic()
        ends, undecided = await self._changelog.settled(
            [TopicPartition(changelog, p) for p in partitions]
        )
        if ends:
            records = await self._changelog.read(ends)
            for p, got in records.items():
                self.state.restore(p, [(r.key, r.value) for r in got if r.key])
            pending = self._update_gauges()
            log.info(
                "resolver state restored",
                partitions=sorted(records),
                records=sum(len(r) for r in records.values()),
                pending=pending,
                seconds=round(time.monotonic() - started, 3),
                still_waiting=sorted(tp.partition for tp in undecided),
            )
        return {tp.partition for tp in undecided}

    async def _close_changelog(self) -> None:
        reader, self._changelog = self._changelog, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.stop()

    def _update_gauges(self) -> int:
        """Pending requests and waiting verdicts (a scan of the state: only on restore and with
        the scans for old entries, not after every transaction); returns the pending count."""
        pending = self.state.pending_requests()
        self.metrics.pending.set(pending)
        self.metrics.waiting.set(self.state.waiting_verdicts())
        return pending


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, resolver: Resolver, consumer: AIOKafkaConsumer) -> None:
        self.resolver = resolver
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.resolver._lock:  # the batch in flight (or a restore) finishes first
            for p in {tp.partition for tp in revoked}:
                self.resolver.state.drop(p)
            self.resolver.to_restore -= set(revoked)
        self.resolver._ready = False

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Nothing is read here: the partitions wait, paused, for the main loop's restore."""
        self.consumer.pause(*assigned)
        self.resolver.to_restore |= set(assigned)
        self.resolver._restore_due = 0.0
        self.resolver._ready = not self.resolver.to_restore  # nothing assigned: nothing to wait for
        review = self.resolver.topics.review
        partitions = sorted({tp.partition for tp in assigned if tp.topic == review})
        log.info("partitions assigned", partitions=partitions)
