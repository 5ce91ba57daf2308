"""Streaming benchmarks through a real Kafka broker.

* pipeline overhead: posts/s through the whole worker against raw inference on the same posts;
* transport ceiling: the worker with inference replaced by a trivial function (BENCH ONLY, never
  a product path: it returns constant probabilities) — what Kafka I/O, decoding, routing and
  serialisation alone sustain;
* latency: produce timestamp → enriched event timestamp, at a fixed input rate.

The enriched topic is read by a separate process (``reader.py``), as a downstream consumer would.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import psutil

from schemas import SocialPost
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.kafka.admin import ensure_topics
from worker.kafka.connection import output_topics
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
    await ensure_topics(settings.kafka, output_topics(settings), partitions)


async def start_reader(
    settings: WorkerSettings, expect: int, timeout_s: float, latencies: bool = False
) -> asyncio.subprocess.Process:
    """The enriched-topic reader in its own process (``reader.py``: in this one it would compete
    with the worker for the interpreter)."""
    args = [settings.kafka.bootstrap_servers, settings.topics.enriched, str(expect), str(timeout_s)]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.bench.reader",
        *args,
        *(["--latencies"] if latencies else []),
        stdout=asyncio.subprocess.PIPE,
    )


async def reader_result(reader: asyncio.subprocess.Process, expect: int) -> dict[str, Any]:
    """Waits for the reader; its count, the monotonic time of the last event, the latencies."""
    out, _ = await reader.communicate()
    if reader.returncode != 0:
        raise RuntimeError(f"the bench reader failed (exit {reader.returncode})")
    result: dict[str, Any] = orjson.loads(out)
    if result["seen"] < expect:
        raise TimeoutError(f"only {result['seen']} of {expect} enriched events arrived in time")
    return result


def _cpu_seconds(process: psutil.Process | None) -> float:
    """User + system CPU seconds of ``process`` (all its threads) so far; 0 when unknown."""
    if process is None:
        return 0.0
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def cpu_split(
    posts: int, seconds: float, worker_s: float, broker_s: float | None, reader_s: float
) -> dict[str, Any]:
    """Where a timed run's CPU went, per post, and what it implies on this machine: the three
    processes share its cores, so no worker can outrun ``cores / (total CPU a post)``."""
    worker_us, reader_us = worker_s / posts * 1e6, reader_s / posts * 1e6
    broker_us = None if broker_s is None else broker_s / posts * 1e6
    total = worker_us + reader_us + (broker_us or 0.0)
    cores = psutil.cpu_count() or 1
    return {
        "cpu_us_per_post": {"worker": worker_us, "broker": broker_us, "reader": reader_us},
        "cores": cores,
        "cores_busy": total * posts / 1e6 / max(seconds, 1e-9),
        # every core busy on this run's work, divided as it was: the machine's own ceiling
        "cpu_bound_posts_per_s": cores * 1e6 / total if total else None,
        # the worker alone with a core to itself (one interpreter): its own ceiling
        "worker_alone_posts_per_s": 1e6 / worker_us if worker_s else None,
    }


async def saturated_throughput(
    settings: WorkerSettings,
    classifier: Classifier,
    messages: list[tuple[bytes | None, bytes]],
    model_executor: ThreadPoolExecutor | None = None,
    processor_factory: Any = BatchProcessor,
    partitions: int = 4,
    timeout_s: float = 900,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """Pre-load the input topic, start the worker, time until every post is enriched.
    ``model_executor``: the thread the caller runs the model on (see ``model_thread.py``).
    The CPU of the worker (this process), the reader and the broker (``broker_pid``, when it
    runs on this machine) over the timed run, per post: ``cpu_split``."""
    await _prepare(settings, partitions)
    await feed_topic(settings.kafka, settings.topics.input, messages)
    pipeline = Pipeline(
        settings,
        classifier=classifier,
        processor_factory=processor_factory,
        model_executor=model_executor,
    )
    reader = await start_reader(settings, len(messages), timeout_s)
    started = time.monotonic()
    worker = asyncio.create_task(pipeline.run())
    while not pipeline.ready()[0] and not worker.done():  # noqa: ASYNC110 (no event to await)
        await asyncio.sleep(0.01)
    ready = time.monotonic()
    me = psutil.Process()
    broker = psutil.Process(broker_pid) if broker_pid is not None else None
    worker_cpu, broker_cpu = _cpu_seconds(me), _cpu_seconds(broker)
    try:
        seen = await reader_result(reader, len(messages))
        worker_cpu, broker_cpu = _cpu_seconds(me) - worker_cpu, _cpu_seconds(broker) - broker_cpu
        last = seen["last_monotonic"]
    finally:
        if reader.returncode is None:
            reader.kill()
        pipeline.request_stop()
        await worker
    # from partitions assigned to the last enriched event: excludes model load and group join
    return {
        "posts": len(messages),
        "posts_per_s": len(messages) / max(last - ready, 1e-9),
        "seconds": last - ready,
        "startup_seconds": ready - started,
        # the model thread's time on the batches (inference, OOD signals, routing, events):
        # near the seconds above, the pipeline kept the model busy and any overhead is in the
        # batches themselves (CPU shared with the event loop and the broker), not in waits
        "model_busy_seconds": pipeline.metrics.registry.get_sample_value(
            "emoworker_inference_seconds_sum"
        ),
        # the reader's whole life (its start and group join too: a slight overcount)
        **cpu_split(
            len(messages),
            last - ready,
            worker_cpu,
            broker_cpu if broker is not None else None,
            seen["cpu_seconds"],
        ),
    }


async def latency_at_rate(
    settings: WorkerSettings,
    classifier: Classifier,
    messages: list[tuple[bytes | None, bytes]],
    model_executor: ThreadPoolExecutor | None,
    rate: float,
    partitions: int = 4,
) -> dict[str, float]:
    """Feed at ``rate`` posts/s; latency = enriched record time − input record time."""
    await _prepare(settings, partitions)
    pipeline = Pipeline(settings, classifier=classifier, model_executor=model_executor)
    worker = asyncio.create_task(pipeline.run())
    while not pipeline.ready()[0]:  # noqa: ASYNC110 (the pipeline exposes no event for this)
        await asyncio.sleep(0.1)
    reader = await start_reader(settings, len(messages), 600, latencies=True)
    try:
        await feed_topic(settings.kafka, settings.topics.input, messages, rate=rate)
        latencies = (await reader_result(reader, len(messages)))["latencies"]
    finally:
        if reader.returncode is None:
            reader.kill()
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
