"""Streaming benchmarks through a real Kafka broker.

* pipeline overhead: posts/s through the whole worker against raw inference on the same posts;
* transport ceiling: the worker with inference replaced by a trivial function (BENCH ONLY, never
  a product path: it returns constant probabilities) — what Kafka I/O, decoding, routing and
  serialisation alone sustain;
* latency: produce timestamp → enriched event timestamp, at a fixed input rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from schemas import SocialPost
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.kafka.admin import ensure_topics
from worker.kafka.feed import feed_topic
from worker.pipeline import Pipeline
from worker.processing import BatchProcessor
from worker.settings import WorkerSettings


class TrivialInferenceProcessor(BatchProcessor):
    """BENCH ONLY: constant probabilities instead of a model, to measure the transport ceiling."""

    def tokenize(self, posts: list[SocialPost]) -> list[list[int]]:
        return [[0] for _ in posts]

    def infer(self, token_ids: list[list[int]]) -> McSummary:
        n, labels = len(token_ids), len(self.classifier.label_names)
        mean = np.tile(np.linspace(0.05, 0.6, labels), (n, 1))
        std = np.full((n, labels), 0.02)
        zeros = np.zeros(n)
        return McSummary(
            mean=mean,
            std=std,
            n_samples=np.full(n, 2),
            predictive_entropy=zeros + 1.0,
            expected_entropy=zeros + 0.9,
            mutual_information=zeros + 0.1 + np.random.default_rng(n).random(n) * 0.01,
            flip_rate=np.zeros((n, labels)),
        )


def bench_settings(bootstrap: str, tag: str, **overrides: Any) -> WorkerSettings:
    base: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "session_timeout_ms": 10_000},
        "topics": {
            "input": f"bench-{tag}-in",
            "enriched": f"bench-{tag}-enriched",
            "review": f"bench-{tag}-review",
            "dead_letter": f"bench-{tag}-dlq",
        },
        "group_id": f"bench-{tag}",
        "http_port": 0,
        "log_level": "WARNING",
    }
    return WorkerSettings.from_layers(base, overrides)


def post_messages(texts: list[str], repeat: int = 1) -> list[tuple[bytes | None, bytes]]:
    out: list[tuple[bytes | None, bytes]] = []
    for r in range(repeat):
        for i, text in enumerate(texts):
            post_id = f"b{r}-{i}"
            out.append((post_id.encode(), orjson.dumps({"id": post_id, "text": text})))
    return out


async def _prepare(settings: WorkerSettings, partitions: int) -> None:
    t = settings.topics
    await ensure_topics(settings.kafka, [t.input], partitions)
    await ensure_topics(settings.kafka, [t.enriched, t.review, t.dead_letter], partitions)


async def _count_enriched(
    settings: WorkerSettings, expect: int, timeout_s: float, on_record: Callable[[Any], None]
) -> float:
    """Read the enriched topic until ``expect`` records; returns the time of the last one."""
    consumer = AIOKafkaConsumer(
        settings.topics.enriched,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen, last = 0, time.perf_counter()
    deadline = time.monotonic() + timeout_s
    try:
        while seen < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in batch.values():
                for record in records:
                    on_record(record)
                seen += len(records)
                last = time.perf_counter()
    finally:
        await consumer.stop()
    if seen < expect:
        raise TimeoutError(f"only {seen} of {expect} enriched events after {timeout_s}s")
    return last


async def saturated_throughput(
    settings: WorkerSettings,
    classifier: Classifier,
    messages: list[tuple[bytes | None, bytes]],
    processor_factory: Any = BatchProcessor,
    partitions: int = 4,
    timeout_s: float = 900,
) -> dict[str, float]:
    """Pre-load the input topic, start the worker, time until every post is enriched."""
    await _prepare(settings, partitions)
    await feed_topic(settings.kafka, settings.topics.input, messages)
    pipeline = Pipeline(settings, classifier=classifier, processor_factory=processor_factory)
    reader = asyncio.create_task(
        _count_enriched(settings, len(messages), timeout_s, lambda _: None)
    )
    started = time.perf_counter()
    worker = asyncio.create_task(pipeline.run())
    while not pipeline.ready()[0] and not worker.done():  # noqa: ASYNC110 (no event to await)
        await asyncio.sleep(0.01)
    ready = time.perf_counter()
    try:
        last = await reader
    finally:
        pipeline.request_stop()
        await worker
    # from partitions assigned to the last enriched event: excludes model load and group join
    return {
        "posts": len(messages),
        "posts_per_s": len(messages) / max(last - ready, 1e-9),
        "seconds": last - ready,
        "startup_seconds": ready - started,
    }


async def latency_at_rate(
    settings: WorkerSettings,
    classifier: Classifier,
    messages: list[tuple[bytes | None, bytes]],
    rate: float,
    partitions: int = 4,
) -> dict[str, float]:
    """Feed at ``rate`` posts/s; latency = enriched record time − input record time."""
    await _prepare(settings, partitions)
    pipeline = Pipeline(settings, classifier=classifier)
    latencies: list[float] = []

    def on_record(record: Any) -> None:
        event = orjson.loads(record.value)
        latencies.append((record.timestamp - event["source"]["timestamp_ms"]) / 1000)

    worker = asyncio.create_task(pipeline.run())
    while not pipeline.ready()[0]:  # noqa: ASYNC110 (the pipeline exposes no event for this)
        await asyncio.sleep(0.1)
    reader = asyncio.create_task(_count_enriched(settings, len(messages), 600, on_record))
    try:
        await feed_topic(settings.kafka, settings.topics.input, messages, rate=rate)
        await reader
    finally:
        pipeline.request_stop()
        await worker
    warm = np.asarray(latencies[len(latencies) // 10 :])  # skip the first tenth (warm-up)
    return {
        "rate": rate,
        "posts": len(messages),
        "p50_ms": float(np.percentile(warm, 50) * 1000),
        "p99_ms": float(np.percentile(warm, 99) * 1000),
        "max_ms": float(warm.max() * 1000),
    }
