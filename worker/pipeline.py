"""The streaming worker, top to bottom.

    posts topic ─► consume ─► decode ─► micro-batch ─► tokenise ─► MC Dropout ─► route ─► publish
                                                                                     │
                           commit offsets only after every output is acknowledged ◄──┘

Stages run as asyncio tasks joined by small bounded queues, so fetching and tokenising the next
batch overlap inference of the current one and publishing of the previous one. Model work runs in
a dedicated thread (torch releases the GIL), so the event loop keeps heartbeats flowing. Each
stage calls one module that does its job:

* consume: ``kafka/reader.py`` (backpressure, records aiokafka cannot read), ``decoding.py``;
* prepare: ``batching.py`` (size / max wait), the processor's tokeniser;
* infer: ``isolation.py`` (MC Dropout and routing, a failing post retried alone),
  ``outputs.py`` (the records of each message, checked against the topics' limits);
* publish: ``kafka/delivery.py``, then ``checkpoint.py`` (offsets, transactions, revocations)
  and ``metrics.record_outcome``.

Delivery: at-least-once by default (an offset is committed only once every output of its
message, and of every earlier message of its partition, is acknowledged), exactly-once with
``exactly_once=true`` (a batch's outputs and offsets in one transaction). Bad input, and an
output too large for its topic, become dead letters and their offsets advance; only a failure of
a topic or the cluster stops the worker (exit 3). docs/reliability.md has the promises and the
faults they were tested under; ``exit_codes.py`` the exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from schemas import SocialPost
from worker.batching import MicroBatcher
from worker.checkpoint import Checkpoint
from worker.decoding import DecodeFailure, DecodeLimits, decode_post
from worker.exit_codes import EXIT_DELIVERY, EXIT_KAFKA, EXIT_OK, FatalError
from worker.feedback.hot_swap import ModelSwitch
from worker.gc_freeze import freeze_long_lived_objects
from worker.http import HealthServer
from worker.inbound import Batch, Inbound
from worker.inference.blas_threads import OneBlasThread
from worker.inference.loading import Classifier
from worker.inference.model_thread import model_thread
from worker.isolation import Model
from worker.kafka.connection import Connection, Rebalance, connect
from worker.kafka.delivery import DeliveryFailed, OutputRecord, Publisher, Sent
from worker.kafka.headers import HeaderPolicy
from worker.kafka.reader import Received, RecordReader, report_lag
from worker.metrics import Metrics, record_outcome
from worker.outputs import OutputBuilder
from worker.processing import BatchProcessor
from worker.settings import WorkerSettings
from worker.tracing import Tracing, start_batch_trace

log = structlog.get_logger(__name__)

STAGES = ("consume", "prepare", "infer", "publish")


class Pipeline:
    def __init__(
        self,
        settings: WorkerSettings,
        classifier: Classifier | None = None,
        processor_factory: Any = BatchProcessor,
        model_executor: ThreadPoolExecutor | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """``model_executor``: the one thread that runs all of the process's model work (see
        ``model_thread.py``), when the caller runs the model too; by default the pipeline has its
        own and loads the model on it. ``tracing``: default from ``settings.otel``."""
        self.settings = settings
        self.metrics = Metrics()
        self.limits = DecodeLimits.of(settings)
        self.tracing = tracing or Tracing.from_settings(settings.otel, settings.worker_id)
        self.header_policy = HeaderPolicy(
            settings.headers, settings.max_passthrough_bytes, replace_trace=self.tracing.enabled
        )
        self.checkpoint = Checkpoint(settings, self.metrics)
        self.tracker = self.checkpoint.tracker
        self.batcher: MicroBatcher[Inbound] = MicroBatcher(
            settings.batch_size,
            settings.batch_max_wait_ms / 1000,
            weight=lambda item: 1 if item.post is not None else 0,
        )
        self.assigned: set[TopicPartition] = set()
        self.exactly_once = settings.exactly_once
        self._owns_model_thread = model_executor is None
        self._model_thread = model_executor or model_thread()
        self._cpu_thread = ThreadPoolExecutor(1, thread_name_prefix="emoworker-tokenize")
        self._infer_q: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        self._publish_q: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        self._stop = asyncio.Event()
        self._fatal: FatalError | None = None
        self._froze_objects = False  # whether this pipeline's freeze was the process's first
        self._one_blas_thread = OneBlasThread()  # from the model's load to close
        self._batches = 0
        self.models = ModelSwitch(settings, classifier, processor_factory, self._model_thread)
        self._conn: Connection | None = None  # set once connected
        self._reader: RecordReader | None = None  # set once streaming
        self.http: HealthServer | None = None

    # ── lifecycle ────────────────────────────────────────────────────────────────────────────

    def request_stop(self) -> None:
        """Graceful stop: no more fetching; in-flight batches finish and are committed."""
        if not self._stop.is_set():
            log.info("stop requested: draining in-flight batches")
        self._stop.set()

    def ready(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, "stopped after a fatal error"
        if self._model is None:
            return False, "loading model"
        if self._conn is None:
            return False, "connecting to Kafka"
        if not self.assigned:
            return False, "no partitions assigned"
        return True, "ok"

    def _alive(self) -> bool:
        return self._fatal is None

    @property
    def _model(self) -> Model | None:
        """The model in use (None until loaded); a new release replaces it between batches."""
        return self.models.current

    @property
    def publisher(self) -> Publisher | None:
        return None if self._conn is None else self._conn.publisher

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._start_http()
        try:
            model = await self._load_model()
            n_labels = len(model.processor.classifier.label_names)
            conn = await connect(self.settings, self.metrics, self._stop, n_labels)
            if conn is None:
                return EXIT_OK
            self._conn = conn
            await self.models.catch_up()  # the current release, if one was announced
            conn.subscribe(self.settings, Rebalance(self.on_revoked, self.on_assigned))
            await self._run_stages(conn)
        except FatalError as exc:
            self._fatal = exc
        finally:
            await self._close()
        if self._fatal is not None:
            log.error("worker stopped", reason=str(self._fatal), exit_code=self._fatal.exit_code)
            return self._fatal.exit_code
        log.info("worker stopped cleanly")
        return EXIT_OK

    async def _start_http(self) -> None:
        if self.settings.http_port:
            self.http = HealthServer.of(
                self.settings, self.metrics.exposition, self._alive, self.ready
            )
            await self.http.start()

    async def _load_model(self) -> Model:
        model = await self.models.load_initial()
        self._froze_objects = freeze_long_lived_objects()
        self._one_blas_thread.start()
        self.metrics.review_target.set(model.processor.policy.config.target_rate or 0)
        return model

    async def _run_stages(self, conn: Connection) -> None:
        backlog = self.settings.max_in_flight_batches * self.settings.batch_size
        reader = RecordReader(
            conn.consumer,
            assigned=lambda: self.assigned,
            pending=self.tracker.pending,
            backlog_limit=backlog,
            fetch_size=max(1, min(self.settings.batch_size * 4, backlog)),
            deliver=self._receive,
        )
        self._reader = reader
        outputs = OutputBuilder(self.settings, conn.limits, self.header_policy)
        tasks = {
            asyncio.create_task(self._consume(reader), name="consume"),
            asyncio.create_task(self._prepare(), name="prepare"),
            asyncio.create_task(self._infer(outputs), name="infer"),
            asyncio.create_task(self._publish(conn), name="publish"),
            asyncio.create_task(report_lag(conn.consumer, lambda: self.assigned, self.metrics)),
        }
        if self.settings.follow_rollouts:
            tasks.add(asyncio.create_task(self.models.follow(), name="follow rollouts"))
        if not self.exactly_once:
            commits = self.checkpoint.commit_every_interval(conn.consumer, lambda: self.assigned)
            tasks.add(asyncio.create_task(commits, name="commit"))
        try:
            await self._until_stopped({t for t in tasks if t.get_name() in STAGES})
        finally:
            await cancel_all(tasks)

    async def _until_stopped(self, stages: set[asyncio.Task[None]]) -> None:
        """Until a stop request or a stage's end; then drain (a graceful stop, for up to the
        grace period; after a fatal error nothing may be published or committed: no drain)."""
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait(stages | {stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
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
                    f"{task.get_name()} stage stopped: {type(error).__name__}: {error}", EXIT_KAFKA
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

    async def _close(self) -> None:
        """Last commit (at-least-once), then close the clients and the HTTP server."""
        if self._conn is not None:
            # what is done is safe to commit, after a fault too: the tracker never moves past
            # an unacknowledged output
            await self.checkpoint.commit(self._conn.consumer, self.assigned, final=True)
            await self._conn.close()
        if self._owns_model_thread:
            self._model_thread.shutdown(wait=False, cancel_futures=True)
        if self._froze_objects:  # a process that goes on without the pipeline collects them again
            gc.unfreeze()  # (not when the host froze objects of its own: it unfreezes those)
            self._froze_objects = False
        self._cpu_thread.shutdown(wait=False, cancel_futures=True)
        self._one_blas_thread.stop()
        await asyncio.to_thread(self.tracing.shutdown)  # exports what is queued
        if self.http is not None:
            await self.http.stop()

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    # ── stage 1: consume and decode ─────────────────────────────────────────────────────────

    async def _consume(self, reader: RecordReader) -> None:
        while not self._stop.is_set() and self._fatal is None:
            await reader.read_once(stopping=self._stop.is_set)
            self.metrics.in_flight.set(self.tracker.pending())
        self.batcher.close()

    def _receive(self, r: Received) -> None:
        """One record read (or one that could not be): tracked, decoded, batched."""
        epoch = self.checkpoint.track(r.tp, r.offset)
        self.metrics.consumed.inc()
        decoded = r.failure or decode_post(r.value, self.limits)
        post = decoded if isinstance(decoded, SocialPost) else None
        failure = decoded if isinstance(decoded, DecodeFailure) else None
        item = Inbound(r.tp, r.offset, epoch, r.timestamp_ms, r.key, r.value, post, failure)
        item.headers, item.consumed_ns = r.headers, time.time_ns()
        self.batcher.add(item)

    # ── stage 2: batch and tokenise ─────────────────────────────────────────────────────────

    async def _prepare(self) -> None:
        loop = asyncio.get_running_loop()
        while (items := await self.batcher.next_batch()) is not None:
            model = self.models.model
            items = self.checkpoint.admit(items, self.assigned)
            if not items:
                continue
            self._batches += 1
            batch = Batch(self._batches, items, model=model)  # tokenised, inferred by it
            batch.trace = start_batch_trace(
                self.tracing, batch.number, items, self.settings.group_id
            )
            posts = [i.post for i in items if i.post is not None]
            if posts:
                with _stage(batch, "tokenize"):
                    try:
                        batch.token_ids = await loop.run_in_executor(
                            self._cpu_thread, model.processor.tokenize, posts
                        )
                    except Exception as exc:  # the model thread retries post by post
                        error = f"{type(exc).__name__}: {exc}"
                        log.warning("tokenising a batch failed", error=error)
            await self._infer_q.put(batch)
        await self._infer_q.put(None)

    # ── stage 3: MC Dropout inference and routing ───────────────────────────────────────────

    async def _infer(self, outputs: OutputBuilder) -> None:
        loop = asyncio.get_running_loop()

        def run(batch: Batch) -> list[list[OutputRecord]]:  # in the model thread
            routed = batch.model.isolation.route(batch.number, batch.items, batch.token_ids)
            return [
                outputs.records(
                    i, routed.get((i.tp, i.offset)), i.trace.headers() if i.trace else ()
                )
                for i in batch.items
            ]

        while (batch := await self._infer_q.get()) is not None:
            started = time.perf_counter()
            with _stage(batch, "infer"):
                batch.outputs = await loop.run_in_executor(self._model_thread, run, batch)
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
                self.metrics.mc_samples.inc(valid * batch.model.processor.engine.n_samples)
            await self._publish_q.put(batch)
        await self._publish_q.put(None)

    # ── stage 4: publish, then mark offsets done ────────────────────────────────────────────

    async def _publish(self, conn: Connection) -> None:
        acks: set[asyncio.Task[None]] = set()
        while (batch := await self._publish_q.get()) is not None:
            if self._fatal is not None:
                break
            if batch.trace is not None:
                batch.publish_span = batch.trace.stage("publish")  # ends with the acks
            if self.exactly_once:
                await self._publish_transaction(conn, batch)
                continue
            # acknowledgements are awaited in the background: the next batch publishes
            # meanwhile; offsets advance only through the tracker
            sent = await conn.publisher.send_all(_flatten(batch.outputs))
            task = asyncio.create_task(self._await_acks(conn, batch, sent))
            acks.add(task)
            task.add_done_callback(acks.discard)
            # at most a few batches awaiting acks: bounds memory if the cluster is slow
            while len(acks) >= self.settings.max_in_flight_batches:
                await asyncio.wait(acks, return_when=asyncio.FIRST_COMPLETED)
                self._raise_if_fatal()
        if acks:
            await asyncio.gather(*acks)
        self._raise_if_fatal()

    async def _await_acks(self, conn: Connection, batch: Batch, sent: Sent) -> None:
        try:
            await conn.publisher.confirm(sent)
        except DeliveryFailed as exc:
            self._fatal = FatalError(exc.stop_reason(), EXIT_DELIVERY)
            self._stop.set()
            return
        self._finish(batch)

    async def _publish_transaction(self, conn: Connection, batch: Batch) -> None:
        """Exactly-once: the batch's outputs and its offsets in one transaction."""
        kept = await self.checkpoint.commit_transaction(
            conn.producer,
            conn.publisher,
            batch.number,
            list(zip(batch.items, batch.outputs, strict=True)),
        )
        batch.items, batch.outputs = [i for i, _ in kept], [o for _, o in kept]
        self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        """All outputs of the batch are acknowledged: release the offsets, count the outcomes,
        end the spans."""
        for item, records in zip(batch.items, batch.outputs, strict=True):
            self.checkpoint.done(item)
            kinds = [r.kind for r in records]
            record_outcome(self.metrics, item, kinds, batch.number)
            if item.trace is not None:
                item.trace.end(",".join(kinds))
        if batch.publish_span is not None:
            batch.publish_span.end()
        if batch.trace is not None:
            batch.trace.end()
        if self._model is not None:
            self.metrics.review_rate.set(self._model.processor.policy.budget.routed_share)
        self.metrics.in_flight.set(self.tracker.pending())

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
        consumer = None if self._conn is None else self._conn.consumer
        await self.checkpoint.on_revoked(revoked, consumer, failed=lambda: self._fatal is not None)
        if self._reader is not None:
            self._reader.forget(revoked)
        self.metrics.ready.set(0)
        log.info(
            "partitions revoked", partitions=sorted(f"{t.topic}:{t.partition}" for t in revoked)
        )


async def cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel until every task is done (a library may swallow one cancellation); their errors
    are retrieved (no "exception was never retrieved" warning)."""
    while unfinished := {t for t in tasks if not t.done()}:
        for task in unfinished:
            task.cancel()
        await asyncio.wait(unfinished, timeout=1)
    for task in tasks:
        if not task.cancelled():
            task.exception()


def _stage(batch: Batch, name: str) -> contextlib.AbstractContextManager[Any]:
    """The span of one stage of ``batch`` (a no-op without tracing)."""
    return batch.trace.stage(name) if batch.trace is not None else contextlib.nullcontext()


def _flatten(outputs: list[list[OutputRecord]]) -> list[OutputRecord]:
    return [record for records in outputs for record in records]
