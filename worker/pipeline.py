"""The streaming worker, top to bottom.

    posts topic ─► consume ─► decode ─► micro-batch ─► tokenise ─► MC Dropout ─► route ─► publish
                                                                                     │
                           commit offsets only after every output is acknowledged ◄──┘

Stages run as asyncio tasks joined by small bounded queues, so fetching and tokenising the next
batch overlap inference of the current one and publishing of the previous one. Model work runs in
a dedicated thread (torch releases the GIL), so the event loop keeps heartbeats flowing.

Delivery guarantees:

* at-least-once (default): a message's offset is committed only after all its outputs (enriched
  event, review request or dead letter) are acknowledged, and after every earlier message of its
  partition; a crash re-delivers what was not committed;
* exactly-once (``exactly_once=true``): each batch's outputs and its consumed offsets are committed
  in one Kafka transaction.

After a crash, at-least-once re-publishes at most what was published but not yet committed: the
batches awaiting acknowledgements (at most ``max_in_flight_batches``, so at most
``max_in_flight_batches * batch_size`` posts) plus what finished within the last commit interval.

Bad input never stops the worker: it becomes a dead letter and its offset advances like any other,
including records aiokafka itself cannot read (a header key that is not UTF-8, a record larger than
a fetch). Faults (tests/test_faults.py, tests/test_chaos.py):

* Kafka unreachable at start-up: retried with exponential backoff (not ready meanwhile); a rejected
  SASL login is not retried: exit code 2;
* broker restarts, leader moves, rebalances: the clients reconnect; the worker keeps running;
* an output that cannot be published within ``kafka.delivery_timeout_s`` (or at all): the worker
  stops consuming, commits nothing past it and exits with code 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import ConsumerRecord

from schemas import DeadLetterKind, SocialPost
from worker.batching import MicroBatcher
from worker.decoding import DecodeFailure, DecodeLimits, decode_post
from worker.http import HealthServer
from worker.inference.loading import Classifier, load_classifier
from worker.inference.model_thread import model_thread
from worker.kafka.clients import build_consumer, build_producer, probe_credentials
from worker.kafka.delivery import DeliveryFailed, OutputRecord, Publisher, Sent, is_auth_error
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.processing import BatchProcessor, dead_letter_event
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_KAFKA, EXIT_DELIVERY, EXIT_MODEL = 0, 1, 2, 3, 4
# posts in a row that fail inference one by one: the model itself is broken, not the posts
SYSTEMIC_FAILURES = 64
# what aiokafka raises from getmany for a record it cannot parse (e.g. a non-UTF-8 header key)
UNREADABLE = (UnicodeDecodeError, CorruptRecordException)


@dataclass
class Inbound:
    """One consumed message, decoded."""

    tp: TopicPartition
    offset: int
    epoch: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    post: SocialPost | None
    failure: DecodeFailure | None

    def source(self) -> dict[str, Any]:
        return {
            "topic": self.tp.topic,
            "partition": self.tp.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
        }


@dataclass
class Batch:
    """A micro-batch on its way through the stages."""

    number: int
    items: list[Inbound]
    token_ids: list[list[int]] | None = None  # None: not tokenised yet (or it failed)
    outputs: list[list[OutputRecord]] = field(default_factory=list)  # per item


class FatalError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.pipeline.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.pipeline.on_assigned(set(assigned))


class Pipeline:
    def __init__(
        self,
        settings: WorkerSettings,
        classifier: Classifier | None = None,
        processor_factory: Any = BatchProcessor,
        model_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        """``model_executor``: the one thread that runs all of the process's model work (see
        ``model_thread.py``), when the caller runs the model too; by default the pipeline has its
        own and loads the model on it."""
        self.settings = settings
        self.metrics = Metrics()
        self.limits = DecodeLimits(
            max_message_bytes=settings.max_message_bytes, max_text_chars=settings.max_text_chars
        )
        self._classifier = classifier
        self._processor_factory = processor_factory
        self.processor: BatchProcessor | None = None
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.batcher: MicroBatcher[Inbound] = MicroBatcher(
            settings.batch_size,
            settings.batch_max_wait_ms / 1000,
            weight=lambda item: 1 if item.post is not None else 0,
        )
        self.assigned: set[TopicPartition] = set()
        self.paused = False
        self._owns_model_thread = model_executor is None
        self._model_thread = model_executor or model_thread()
        self._cpu_thread = ThreadPoolExecutor(1, thread_name_prefix="emoworker-tokenize")
        self._infer_q: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        self._publish_q: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        self._active: dict[TopicPartition, int] = {}  # items past the batcher, per partition
        self._next_offset: dict[TopicPartition, int] = {}  # after the last record received
        self._too_large: dict[tuple[TopicPartition, int], int] = {}  # refetch attempts
        self._stop = asyncio.Event()
        self._fatal: FatalError | None = None
        self._failures_in_a_row = 0  # posts that failed inference alone, in a row
        self._model_ready = False
        self._froze_objects = False  # whether this pipeline's freeze was the process's first
        self._batches = 0
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.publisher: Publisher | None = None
        self.http: HealthServer | None = None
        self.exactly_once = settings.exactly_once

    # ── lifecycle ────────────────────────────────────────────────────────────────────────────

    def request_stop(self) -> None:
        """Graceful stop: no more fetching; in-flight batches finish and are committed."""
        if not self._stop.is_set():
            log.info("stop requested: draining in-flight batches")
        self._stop.set()

    def ready(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, "stopped after a fatal error"
        if not self._model_ready:
            return False, "loading model"
        if self.consumer is None:
            return False, "connecting to Kafka"
        if not self.assigned:
            return False, "no partitions assigned"
        return True, "ok"

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        s = self.settings
        if s.http_port:
            self.http = HealthServer(
                s.http_host,
                s.http_port,
                self.metrics.exposition,
                live=lambda: self._fatal is None,
                ready=self.ready,
            )
            await self.http.start()
        try:
            await self._load_model()
            await self._connect()
            if self._stop.is_set():
                return EXIT_OK
            await self._run_stages()
        except FatalError as exc:
            self._fatal = exc
        finally:
            await self._close()
        if self._fatal is not None:
            log.error("worker stopped", reason=str(self._fatal), exit_code=self._fatal.exit_code)
            return self._fatal.exit_code
        log.info("worker stopped cleanly")
        return EXIT_OK

    async def _load_model(self) -> None:
        loop = asyncio.get_running_loop()
        classifier = self._classifier
        if classifier is None:
            log.info("loading model", model=self.settings.model.path)
            classifier = await loop.run_in_executor(
                self._model_thread, load_classifier, self.settings.model
            )
        # on the model thread too: the engine copies weights (parallel torch work), and a
        # second thread running torch slows every pass down (model_thread.py)
        processor: BatchProcessor = await loop.run_in_executor(
            self._model_thread, self._processor_factory, classifier, self.settings
        )
        self.processor = processor
        self._froze_objects = freeze_long_lived_objects()
        self._model_ready = True
        self.metrics.review_target.set(processor.router.policy.config.target_rate or 0)
        log.info(
            "model ready",
            model=classifier.name,
            revision=classifier.revision,
            labels=len(classifier.label_names),
            adapter=classifier.adapter.describe(),
            mc_mode=processor.engine.mode,
            n_samples=processor.engine.n_samples,
        )

    async def _connect(self) -> None:
        """Start producer and consumer, retrying an unreachable cluster with backoff."""
        s = self.settings
        delay, started = 0.5, time.monotonic()
        while not self._stop.is_set():
            producer = build_producer(
                s.kafka,
                transactional_id=s.effective_transactional_id() if self.exactly_once else None,
                transaction_timeout_ms=s.transaction_timeout_ms,
            )
            consumer = build_consumer(
                s.kafka, s.group_id, max_poll_records=max(s.batch_size * 4, 256)
            )
            try:
                await producer.start()
                await consumer.start()
            except (KafkaError, OSError, TimeoutError) as exc:
                await _stop_quietly(consumer, producer)
                # a rejected login looks like an unreachable cluster to aiokafka: ask once
                login = exc if is_auth_error(exc) else None
                if login is None and s.kafka.security_protocol.startswith("SASL"):
                    login = await probe_credentials(s.kafka)
                if login is not None:
                    raise FatalError(
                        f"Kafka authentication failed ({type(login).__name__}: {login}); not "
                        "retrying: check EMOWORKER_KAFKA__SASL_MECHANISM, _SASL_USERNAME and "
                        "_SASL_PASSWORD",
                        EXIT_KAFKA,
                    ) from exc
                waited = time.monotonic() - started
                if s.kafka.startup_timeout_s and waited > s.kafka.startup_timeout_s:
                    raise FatalError(
                        f"Kafka at {s.kafka.bootstrap_servers} unreachable for {waited:.0f}s",
                        EXIT_KAFKA,
                    ) from exc
                log.warning(
                    "Kafka not reachable yet; retrying",
                    bootstrap_servers=s.kafka.bootstrap_servers,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 1),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 30.0)
                continue
            self.producer, self.consumer = producer, consumer
            self.publisher = Publisher(
                producer, s.kafka.delivery_timeout_s, on_retry=self.metrics.produce_retries.inc
            )
            consumer.subscribe([s.topics.input], listener=_Rebalance(self))
            log.info(
                "connected",
                bootstrap_servers=s.kafka.bootstrap_servers,
                group_id=s.group_id,
                input_topic=s.topics.input,
                exactly_once=self.exactly_once,
            )
            return

    async def _run_stages(self) -> None:
        tasks = {
            asyncio.create_task(self._consume(), name="consume"),
            asyncio.create_task(self._prepare(), name="prepare"),
            asyncio.create_task(self._infer(), name="infer"),
            asyncio.create_task(self._publish(), name="publish"),
        }
        if not self.exactly_once:
            tasks.add(asyncio.create_task(self._commit_loop(), name="commit"))
        tasks.add(asyncio.create_task(self._lag_loop(), name="lag"))
        stages = {t for t in tasks if t.get_name() in ("consume", "prepare", "infer", "publish")}
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait(stages | {stop}, return_when=asyncio.FIRST_COMPLETED)
            # a graceful stop drains for up to the grace period; after a fatal error there is
            # nothing left that may be published or committed, so the stages stop at once
            grace = self.settings.shutdown_grace_s if self._stop.is_set() else None
            if self._fatal is not None:
                grace = 0
            done, pending = await asyncio.wait(
                stages, timeout=grace, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in done:
                error = None if task.cancelled() else task.exception()
                if isinstance(error, KafkaError):  # e.g. not authorised to read the topic
                    raise FatalError(
                        f"{task.get_name()} stage stopped: {type(error).__name__}: {error}",
                        EXIT_KAFKA,
                    ) from error
                if error is not None:
                    raise error
            if pending and self._fatal is None:
                log.warning(
                    "grace period over: in-flight messages will be consumed again",
                    grace_s=grace,
                    uncommitted=self.tracker.pending(),
                )
            self._raise_if_fatal()
        finally:
            stop.cancel()
            # cancel until every task is done: a library may swallow one cancellation
            while unfinished := {t for t in tasks if not t.done()}:
                for task in unfinished:
                    task.cancel()
                await asyncio.wait(unfinished, timeout=1)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # retrieved: no "exception was never retrieved" warning

    async def _close(self) -> None:
        """Last commit (at-least-once), then close the clients and the HTTP server."""
        # what is done is safe to commit, after a fault too: the tracker never moves past an
        # unacknowledged output
        await self._commit(final=True)
        await _stop_quietly(self.consumer, self.producer)
        if self._owns_model_thread:
            self._model_thread.shutdown(wait=False, cancel_futures=True)
        if self._froze_objects:  # a process that goes on without the pipeline collects them again
            gc.unfreeze()  # (not when the host froze objects of its own: it unfreezes those)
            self._froze_objects = False
        self._cpu_thread.shutdown(wait=False, cancel_futures=True)
        if self.http is not None:
            await self.http.stop()

    # ── stage 1: consume and decode ─────────────────────────────────────────────────────────

    def _backlog_limit(self) -> int:
        return self.settings.max_in_flight_batches * self.settings.batch_size

    async def _consume(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        while not self._stop.is_set() and self._fatal is None:
            self._apply_backpressure()
            try:
                records = await consumer.getmany(timeout_ms=200, max_records=self._fetch_size())
            except UnknownTopicOrPartitionError:
                await asyncio.sleep(1)
                continue
            except RecordTooLargeError as exc:
                self._record_too_large(exc)
                continue
            except UNREADABLE as exc:
                await self._skip_unreadable(exc)
                continue
            self._accept(records)
        self.batcher.close()

    def _accept(self, records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        """Track, decode and hand consumed records to the batcher."""
        for tp, batch in records.items():
            for record in batch:
                if tp not in self.assigned:
                    continue  # revoked while the fetch was in flight
                self._add(tp, record.offset, record.timestamp, record.key, record.value)
        self.metrics.in_flight.set(self.tracker.pending())

    def _add(
        self,
        tp: TopicPartition,
        offset: int,
        timestamp_ms: int | None,
        key: bytes | None,
        value: bytes | None,
        failure: DecodeFailure | None = None,
    ) -> None:
        epoch = self.tracker.track(tp, offset)
        self._next_offset[tp] = offset + 1
        self.metrics.consumed.inc()
        decoded = failure or decode_post(value, self.limits)
        post = decoded if isinstance(decoded, SocialPost) else None
        failure = decoded if isinstance(decoded, DecodeFailure) else None
        self.batcher.add(Inbound(tp, offset, epoch, timestamp_ms, key, value, post, failure))

    def _record_too_large(self, exc: RecordTooLargeError) -> None:
        """aiokafka got only part of a record (larger than ``max_partition_fetch_bytes`` and
        served after other partitions in one response, or from a broker older than 0.10.1) and
        skipped it. Go back: first in a fetch, a broker returns it whole. If it still does not
        come through, dead-letter it without its payload rather than lose it silently."""
        assert self.consumer is not None
        if len(exc.args) != 4:
            raise exc
        _, tp, offset, limit = exc.args
        if tp not in self.assigned:
            return
        tries = self._too_large.get((tp, offset), 0) + 1
        self._too_large[(tp, offset)] = tries
        if tries <= 3:
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
        self._add(tp, offset, None, None, None, DecodeFailure("message_too_large", message))

    async def _skip_unreadable(self, exc: Exception) -> None:
        """aiokafka could not parse a record (a header key that is not UTF-8, a corrupt batch).
        ``getmany`` then raises, drops what it had already drained in that call (from any
        partition), and raises again on every later call: one hostile record would stop the
        worker. Go back to the first record not received in every partition, then read the
        partitions in turn, one record per call, until the unreadable one shows up: dead-letter
        it (its payload cannot be read) and carry on after it. aiokafka parses a record batch
        from its start, so the records after a bad one in the same producer batch cannot be
        read either: each becomes a dead letter the same way (none is lost)."""
        assert self.consumer is not None
        consumer = self.consumer
        log.warning("a record could not be read; locating it", error=f"{type(exc).__name__}")
        if self.paused:
            consumer.resume(*self.assigned)
            self.paused = False
        for tp in list(self.assigned):
            consumer.seek(tp, await self._next_offset_of(tp))
        deadline = time.monotonic() + 60  # without progress: give up, read normally again
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.tracker.pending() >= self._backlog_limit():
                await asyncio.sleep(0.05)  # backpressure, as in normal reading
                continue
            received = False
            for tp in list(self.assigned):
                try:
                    records = await consumer.getmany(tp, timeout_ms=0, max_records=1)
                except UNREADABLE as error:
                    offset = await self._next_offset_of(tp)
                    consumer.seek(tp, offset + 1)
                    kind: DeadLetterKind = (
                        "invalid_utf8"
                        if isinstance(error, UnicodeDecodeError)
                        else "processing_error"
                    )
                    message = (
                        "the Kafka record cannot be parsed, or one before it in its record batch "
                        f"cannot ({type(error).__name__}: {error})"
                    )
                    self._add(tp, offset, None, None, None, DecodeFailure(kind, message[:500]))
                    log.warning(
                        "unreadable record dead-lettered", partition=tp.partition, offset=offset
                    )
                    return
                except KafkaError:
                    continue  # e.g. revoked meanwhile
                if records:
                    received = True
                    deadline = time.monotonic() + 60
                    self._accept(records)
            if not received:
                await asyncio.sleep(0.05)

    async def _next_offset_of(self, tp: TopicPartition) -> int:
        """The first offset of ``tp`` not received since it was assigned."""
        assert self.consumer is not None
        if tp in self._next_offset:
            return self._next_offset[tp]
        committed = await self.consumer.committed(tp)
        if committed is None:
            committed = (await self.consumer.beginning_offsets([tp]))[tp]
        return int(committed)

    def _fetch_size(self) -> int:
        return max(1, min(self.settings.batch_size * 4, self._backlog_limit()))

    def _apply_backpressure(self) -> None:
        """Pause fetching while the in-flight backlog is full; resume below half."""
        assert self.consumer is not None
        pending = self.tracker.pending()
        if not self.paused and pending >= self._backlog_limit():
            self.consumer.pause(*self.assigned)
            self.paused = True
        elif self.paused and pending <= self._backlog_limit() // 2:
            self.consumer.resume(*self.consumer.assignment())
            self.paused = False

    # ── stage 2: batch and tokenise ─────────────────────────────────────────────────────────

    def _current(self, items: list[Inbound], assigned_only: bool = False) -> list[Inbound]:
        """Items whose partition was not revoked since they were consumed (and, with
        ``assigned_only``, is not being revoked right now); the others are released."""
        keep, drop = [], []
        for item in items:
            current = self.tracker.is_current(item.tp, item.epoch)
            if current and (not assigned_only or item.tp in self.assigned):
                keep.append(item)
            else:
                drop.append(item)
        for item in drop:
            self._release(item)
        return keep

    def _release(self, item: Inbound) -> None:
        if item.tp in self._active:
            self._active[item.tp] -= 1

    async def _prepare(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.processor is not None
        while True:
            items = await self.batcher.next_batch()
            if items is None:
                break
            for item in items:
                self._active[item.tp] = self._active.get(item.tp, 0) + 1
            items = self._current(items, assigned_only=True)
            if not items:
                continue
            self._batches += 1
            batch = Batch(self._batches, items)
            posts = [i.post for i in items if i.post is not None]
            if posts:
                try:
                    batch.token_ids = await loop.run_in_executor(
                        self._cpu_thread, self.processor.tokenize, posts
                    )
                except Exception as exc:  # the model thread retries post by post
                    log.warning("tokenising a batch failed", error=f"{type(exc).__name__}: {exc}")
            await self._infer_q.put(batch)
        await self._infer_q.put(None)

    # ── stage 3: MC Dropout inference and routing ───────────────────────────────────────────

    async def _infer(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._infer_q.get()) is not None:
            started = time.perf_counter()
            batch.outputs = await loop.run_in_executor(self._model_thread, self._outputs, batch)
            valid = sum(1 for i in batch.items if i.post is not None)
            seconds = time.perf_counter() - started
            log.debug(
                "batch inferred",
                batch=batch.number,
                posts=valid,
                messages=len(batch.items),
                seconds=round(seconds, 3),
            )
            if valid:
                self.metrics.batch_size.observe(valid)
                self.metrics.inference_seconds.observe(seconds)
                self.metrics.mc_samples.inc(valid * self.processor.engine.n_samples)  # type: ignore[union-attr]
            await self._publish_q.put(batch)
        await self._publish_q.put(None)

    def _routed(self, batch: Batch) -> dict[tuple[TopicPartition, int], Any]:
        """Inference and routing of a batch's valid posts, by (partition, offset). When the
        batch fails (a post the tokeniser or model cannot handle), each post is retried alone;
        a post that still fails becomes a ``processing_error`` dead letter. When every post
        fails for ``SYSTEMIC_FAILURES`` posts in a row, the model is broken: stop (exit 4)
        rather than dead-letter the whole stream."""
        assert self.processor is not None
        valid = [i for i in batch.items if i.post is not None]
        if not valid:
            return {}
        try:
            routed = self.processor.process(
                [i.post for i in valid if i.post is not None],
                [i.source() for i in valid],
                token_ids=batch.token_ids,
            )
            self._failures_in_a_row = 0
            return {(i.tp, i.offset): r for i, r in zip(valid, routed, strict=True)}
        except Exception as exc:
            log.warning(
                "batch failed; retrying its posts one by one",
                batch=batch.number,
                posts=len(valid),
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
        by_offset: dict[tuple[TopicPartition, int], Any] = {}
        for item in valid:
            assert item.post is not None
            try:
                by_offset[(item.tp, item.offset)] = self.processor.process(
                    [item.post], [item.source()]
                )[0]
                self._failures_in_a_row = 0
            except Exception as exc:
                self._failures_in_a_row += 1
                error = f"{type(exc).__name__}: {exc}"
                if self._failures_in_a_row >= SYSTEMIC_FAILURES:
                    raise FatalError(
                        f"inference failed for {self._failures_in_a_row} posts in a row, each "
                        f"alone: the model cannot run ({error[:300]}); nothing past them is "
                        "committed",
                        EXIT_MODEL,
                    ) from exc
                item.post = None
                item.failure = DecodeFailure(
                    "processing_error", f"inference failed for this post: {error}"[:500]
                )
                log.warning(
                    "post dead-lettered: inference failed",
                    partition=item.tp.partition,
                    offset=item.offset,
                    error=error[:300],
                )
        return by_offset

    def _outputs(self, batch: Batch) -> list[list[OutputRecord]]:
        """Runs in the model thread: inference, routing and serialisation of one batch."""
        topics = self.settings.topics
        routed_by_offset = self._routed(batch)
        outputs: list[list[OutputRecord]] = []
        for item in batch.items:
            if item.failure is not None:
                letter = dead_letter_event(
                    item.failure,
                    item.value,
                    item.source(),
                    item.key,
                    self.settings.worker_id,
                    self.settings.dead_letter_payload_bytes,
                )
                outputs.append(
                    [
                        OutputRecord(
                            topics.dead_letter, item.key, orjson.dumps(letter), item.failure.kind
                        )
                    ]
                )
                continue
            r = routed_by_offset[(item.tp, item.offset)]
            key = r.post_id.encode("utf-8")
            records = [OutputRecord(topics.enriched, key, r.enriched_bytes(), "enriched")]
            review = r.review_bytes()
            if review is not None:
                records.append(OutputRecord(topics.review, key, review, "review"))
            outputs.append(records)
        return outputs

    # ── stage 4: publish, then mark offsets done ────────────────────────────────────────────

    async def _publish(self) -> None:
        assert self.publisher is not None
        acks: set[asyncio.Task[None]] = set()
        while (batch := await self._publish_q.get()) is not None:
            if self._fatal is not None:
                break
            if self.exactly_once:
                await self._publish_transaction(batch)
            else:
                # acknowledgements are awaited in the background: the next batch publishes
                # meanwhile; offsets advance only through the tracker
                sent = await self.publisher.send_all(_flatten(batch.outputs))
                task = asyncio.create_task(self._await_acks(batch, sent))
                acks.add(task)
                task.add_done_callback(acks.discard)
                # at most a few batches awaiting acks: bounds memory if the cluster is slow
                while len(acks) >= self.settings.max_in_flight_batches:
                    await asyncio.wait(acks, return_when=asyncio.FIRST_COMPLETED)
                    self._raise_if_fatal()
        if acks:
            await asyncio.gather(*acks)
        self._raise_if_fatal()

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _await_acks(self, batch: Batch, sent: Sent) -> None:
        assert self.publisher is not None
        try:
            await self.publisher.confirm(sent)
        except DeliveryFailed as exc:
            self._fail_delivery(exc)
            return
        self._finish(batch)

    def _fail_delivery(self, exc: DeliveryFailed) -> None:
        if exc.retriable:
            what = f"within {exc.waited_s:.0f}s (kafka.delivery_timeout_s)"
        else:
            what = "(not retriable)"
        self._fatal = FatalError(
            f"could not publish to {exc.topic} {what}: {type(exc.cause).__name__}: {exc.cause}; "
            "stopped consuming without committing past the unpublished messages",
            EXIT_DELIVERY,
        )
        self._stop.set()

    def _finish(self, batch: Batch) -> None:
        """All outputs of the batch are acknowledged: count them and release the offsets."""
        for item, records in zip(batch.items, batch.outputs, strict=True):
            self.tracker.done(item.tp, item.offset, item.epoch)
            self._release(item)
            for record in records:
                if record.kind == "enriched":
                    self.metrics.enriched.inc()
                    if item.timestamp_ms:
                        self.metrics.end_to_end_seconds.observe(
                            max(0.0, time.time() - item.timestamp_ms / 1000)
                        )
                elif record.kind == "review":
                    self.metrics.reviewed.inc()
                    log.info(
                        "routed to review",
                        post_id=item.post.id if item.post else None,
                        batch=batch.number,
                        partition=item.tp.partition,
                        offset=item.offset,
                    )
                else:
                    self.metrics.dead_lettered.labels(kind=record.kind).inc()
                    log.warning(
                        "dead-lettered",
                        kind=record.kind,
                        batch=batch.number,
                        topic=item.tp.topic,
                        partition=item.tp.partition,
                        offset=item.offset,
                        reason=item.failure.message if item.failure else None,
                    )
        if self.processor is not None:
            self.metrics.review_rate.set(self.processor.policy.budget.routed_share)
        self.metrics.in_flight.set(self.tracker.pending())

    async def _publish_transaction(self, batch: Batch) -> None:
        """Exactly-once: the batch's outputs and its offsets in one transaction."""
        assert self.producer is not None and self.publisher is not None
        keep = {id(i) for i in self._current(batch.items)}
        if len(keep) != len(batch.items):  # partitions revoked: their items are re-consumed
            pairs = [
                (i, o) for i, o in zip(batch.items, batch.outputs, strict=True) if id(i) in keep
            ]
            batch.items, batch.outputs = [p[0] for p in pairs], [p[1] for p in pairs]
        if not batch.items:
            return
        offsets: dict[TopicPartition, int] = {}
        for item in batch.items:
            offsets[item.tp] = max(offsets.get(item.tp, 0), item.offset + 1)
        try:
            async with self.producer.transaction():
                sent = await self.publisher.send_all(_flatten(batch.outputs))
                await self.publisher.confirm(sent, retry=False)
                await self.producer.send_offsets_to_transaction(offsets, self.settings.group_id)
        except (KafkaError, DeliveryFailed) as exc:
            raise FatalError(
                f"transaction of batch {batch.number} failed ({type(exc).__name__}: {exc}); "
                "it was aborted and its messages will be processed again",
                EXIT_DELIVERY,
            ) from exc
        self._finish(batch)
        self.metrics.commits.inc()

    # ── offsets ─────────────────────────────────────────────────────────────────────────────

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_ms / 1000)
            await self._commit()

    async def _commit(
        self, final: bool = False, partitions: set[TopicPartition] | None = None
    ) -> None:
        if self.consumer is None or self.exactly_once:
            return
        offsets = self.tracker.committable(partitions if partitions is not None else self.assigned)
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # retried at the next interval; a rebalance may have moved them
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

    # ── rebalancing ─────────────────────────────────────────────────────────────────────────

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned = set(assigned)
        self.metrics.ready.set(1 if self.ready()[0] else 0)
        log.info(
            "partitions assigned", partitions=sorted(f"{t.topic}:{t.partition}" for t in assigned)
        )

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish what is already in inference or publishing, commit it, forget the rest.

        Items of revoked partitions still waiting in the batcher are dropped (the next owner
        consumes them from the committed offset), so a rebalance waits for at most the batches
        already past the batcher.
        """
        self.metrics.rebalances.inc()
        self.assigned -= revoked
        deadline = time.monotonic() + max(5.0, self.settings.shutdown_grace_s)
        while time.monotonic() < deadline and self._fatal is None:
            busy = sum(self._active.get(tp, 0) for tp in revoked)
            if busy == 0:
                break
            await asyncio.sleep(0.05)
        await self._commit(partitions=revoked)
        self.tracker.forget(revoked)
        for tp in revoked:
            self._active.pop(tp, None)
            self._next_offset.pop(tp, None)
        self.metrics.ready.set(0)
        log.info(
            "partitions revoked", partitions=sorted(f"{t.topic}:{t.partition}" for t in revoked)
        )

    # ── lag ─────────────────────────────────────────────────────────────────────────────────

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(5)
            consumer = self.consumer
            if consumer is None:
                continue
            for tp in list(self.assigned):
                with contextlib.suppress(Exception):
                    end = consumer.highwater(tp)
                    position = await consumer.position(tp)
                    if end is not None:
                        self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                            max(0, end - position)
                        )


def _flatten(outputs: list[list[OutputRecord]]) -> list[OutputRecord]:
    return [record for records in outputs for record in records]


async def _stop_quietly(*clients: Any) -> None:
    for client in clients:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 10)


def freeze_long_lived_objects() -> bool:
    """Collect, then move every object alive now (the model, tokenizer and libraries: some
    500,000 objects that live as long as the process) out of the cyclic collector's sight.

    Without it a full collection walks them all (≈ 0.2 s holding the interpreter lock here) and,
    measured against them, runs so rarely that cyclic garbage piles up for minutes. aiokafka
    frees a fetched response (up to ``max_partition_fetch_bytes``) only through that collector
    when its records are not read to the end (a paused or revoked partition): its record
    iterator refers back to it. Under a 10x overload the worker's memory grew ≈ 1 MB/s.

    Returns whether nothing was frozen before (only then may the caller unfreeze everything
    later: a host program's own frozen objects stay frozen)."""
    first = gc.get_freeze_count() == 0
    gc.collect()
    gc.freeze()
    gc.collect()  # measures the collector's next full pass against what is left, not all of it
    return first
