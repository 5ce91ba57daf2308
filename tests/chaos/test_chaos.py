"""Long fault-injection runs against a real Kafka (``make chaos``): nothing lost, nothing crashes.

* SIGKILL of a worker mid-batch, three times in one stream;
* the consumer group scaled 1 → 3 → 1 during a stream;
* the broker killed and restarted mid-stream (the worker reconnects by itself);
* slow inference (10 s batches with a 6 s session and an 8 s max.poll.interval);
* a stream at 10x the sustainable rate for minutes (lag grows, memory stays flat).

Each run is checked in both delivery modes where it applies: at-least-once (every input is in
the enriched or dead-letter output; duplicates are counted and bounded by the work in flight at
the fault: ``max_in_flight_batches * batch_size`` per worker involved) and exactly-once (zero
duplicates and zero losses in the committed output, read with isolation_level=read_committed).

Each test prints a ``RESULT`` line with its figures (straight to the terminal).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from support.faults import OutputWatcher, log_events, own_broker, report
from support.harness import Topics, WorkerProcess, make_topics, running, wait_until
from support.kafka_cluster import KafkaCluster
from support.streams import committed_and_end, post_bytes, produce

from worker.inference.uncertainty import McSummary
from worker.pipeline import Pipeline
from worker.processing import BatchProcessor
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.timeout(1200)]

MODES = ["at_least_once", "exactly_once"]


def stream(n: int, bad_every: int = 50) -> tuple[list[tuple[bytes | None, bytes | None]], set[str]]:
    """``n`` messages: posts ``post-i``, and every ``bad_every``-th one invalid JSON keyed
    ``bad-i`` (a dead letter). Returns the messages and the names every output must cover."""
    messages: list[tuple[bytes | None, bytes | None]] = []
    names: set[str] = set()
    for i in range(n):
        if i % bad_every == bad_every - 1:
            messages.append((f"bad-{i}".encode(), b"{not json " + str(i).encode()))
            names.add(f"bad-{i}")
        else:
            messages.append(post_bytes(i))
            names.add(f"post-{i}")
    return messages, names


def covered(out: OutputWatcher) -> tuple[set[str], int]:
    """Names seen in the outputs (post ids, dead-letter keys) and the duplicate count."""
    letters = [base64.b64decode(d["key_base64"]).decode() for d in out.letters if d["key_base64"]]
    names = set(out.ids) | set(letters)
    return names, out.duplicates() + len(letters) - len(set(letters))


def mode_settings(mode: str) -> dict[str, Any]:
    if mode == "exactly_once":
        return {"exactly_once": True, "transaction_timeout_ms": 10_000}
    return {}


def isolation(mode: str) -> str:
    return "read_committed" if mode == "exactly_once" else "read_uncommitted"


def check(mode: str, out: OutputWatcher, names: set[str], bound: int, label: str) -> str:
    seen, duplicates = covered(out)
    lost = names - seen
    assert not lost, f"{len(lost)} lost, e.g. {sorted(lost)[:5]}"
    assert seen == names, f"unexpected outputs: {sorted(seen - names)[:5]}"
    if mode == "exactly_once":
        assert duplicates == 0, f"{duplicates} duplicates in exactly-once mode"
    else:
        assert duplicates <= bound, f"{duplicates} duplicates > bound {bound}"
    return (
        f"{label} [{mode}]: in {len(names)}, enriched {sum(out.ids.values())}, "
        f"dead-lettered {len(out.letters)}, duplicates {duplicates} (bound "
        f"{0 if mode == 'exactly_once' else bound}), lost 0"
    )


async def recovered(
    out: OutputWatcher, fault_at: float, worker: Any, timeout_s: float = 300
) -> None:
    """Until an output arrives more than a second after the fault (earlier ones may still be
    in transit from before it)."""
    deadline = time.monotonic() + timeout_s
    while out.first_arrival_after(fault_at + 1) is None:
        assert time.monotonic() < deadline, f"no output {timeout_s}s after the fault"
        assert worker is None or worker.proc.poll() is None, worker.log_text()[-3000:]
        await asyncio.sleep(0.2)


# ── SIGKILL, three times ────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("mode", MODES)
async def test_sigkill_three_times_mid_batch(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, mode: str, capsys
) -> None:
    await make_topics(kafka, topics, partitions=3)
    n = 1500
    messages, names = stream(n)
    await produce(kafka.bootstrap_servers, topics.input, messages)
    settings = make_settings(model={"n_samples": 2}, **mode_settings(mode))
    bound_per_fault = settings.max_in_flight_batches * settings.batch_size
    recoveries: list[float] = []
    killed_at = 0.0
    async with OutputWatcher(kafka.client_config(), topics, isolation(mode)) as out:
        for k, progress in enumerate((150, 500, 850)):
            # the same worker id each time (a pod restarted in place): in exactly-once mode
            # its transactional id fences the killed incarnation's open transaction at once
            worker = WorkerProcess(settings, tmp_path / f"w{k}.log", name="chaos-w")
            try:
                if k:
                    await recovered(out, killed_at, worker)
                    recoveries.append(out.first_arrival_after(killed_at + 1) - killed_at)  # type: ignore[operator]
                await out.wait_for(progress, timeout_s=300, worker=worker)
            finally:
                worker.kill()  # SIGKILL, while batches are in flight
                killed_at = time.monotonic()
            assert out.total < n, "the kill came too late to test anything"
        last = WorkerProcess(settings, tmp_path / "w-last.log", name="chaos-w")
        try:
            await recovered(out, killed_at, last)
            recoveries.append(out.first_arrival_after(killed_at + 1) - killed_at)  # type: ignore[operator]
            await out.wait_for(n, timeout_s=600, worker=last)
            await out.settle(4)
        finally:
            last.terminate()
            code = await asyncio.to_thread(last.wait, 90)
    assert code == 0, last.log_text()[-3000:]
    result = check(mode, out, names, 3 * bound_per_fault, "SIGKILL x3")
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends
    report(capsys, f"{result}; recovery after each kill (s): {[round(r, 1) for r in recoveries]}")


# ── scale 1 → 3 → 1 ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("mode", MODES)
async def test_group_scaled_one_three_one(
    kafka: KafkaCluster,
    topics: Topics,
    make_settings,
    test_classifier,
    one_torch_thread,
    mode: str,
    capsys,
) -> None:
    await make_topics(kafka, topics, partitions=6)
    n, head = 1500, 500
    messages, names = stream(n)
    await produce(kafka.bootstrap_servers, topics.input, messages[:head])

    def worker(name: str) -> Pipeline:
        settings = make_settings(worker_id=name, model={"n_samples": 2}, **mode_settings(mode))
        return Pipeline(settings, classifier=test_classifier)

    first = worker("scale-a")
    group = [first]
    bound = 3 * first.settings.max_in_flight_batches * first.settings.batch_size

    def spread() -> list[int]:
        return [len(p.assigned) for p in group]

    def enriched() -> list[int]:
        return [
            int(p.metrics.registry.get_sample_value("emoworker_posts_enriched_total") or 0)
            for p in group
        ]

    async with OutputWatcher(kafka.client_config(), topics, isolation(mode)) as out:
        async with running(first) as task_a:
            await out.wait_for(200, timeout_s=300)
            group += [worker("scale-b"), worker("scale-c")]
            async with running(group[1]), running(group[2]):
                # the state under test: a generation in which each of the three owns partitions
                # (an eager rebalance revokes before it assigns, so 6 owned between the three,
                # none empty, is one settled generation, not a mix of an old one and a new)
                scale_up_s = await wait_until(
                    lambda: all(spread()) and sum(spread()) == 6, 120, "all three got partitions"
                )
                three, at_three, before = spread(), out.total, enriched()
                # the rest of the stream goes in now, over all six partitions: all three work
                await produce(kafka.bootstrap_servers, topics.input, messages[head:])
                await wait_until(
                    lambda: all(e > b for e, b in zip(enriched(), before, strict=True)),
                    300,
                    "each of the three enriched posts of the second part",
                )
            at_one, by_worker = out.total, enriched()
            assert at_one < n, "b and c stopped after the stream was done"
            # b and c stopped gracefully: a takes every partition back
            scale_down_s = await wait_until(
                lambda: len(first.assigned) == 6, 120, "the first worker got all 6 back"
            )
            await out.wait_for(n, timeout_s=600)
            await out.settle(4)
            assert not task_a.done()
            assert len(first.assigned) == 6
        assert await task_a == 0
    result = check(mode, out, names, bound, "scale 1->3->1")
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends
    report(
        capsys,
        f"{result}; partitions {three} {scale_up_s:.1f}s after b and c started (output "
        f"{at_three}); b and c stopped at output {at_one} of {n}, enriched by a, b, c then "
        f"{by_worker}; all 6 back on a {scale_down_s:.1f}s later",
    )


# ── the broker restarted mid-stream ─────────────────────────────────────────────────────────


@pytest.mark.parametrize("mode", MODES)
async def test_broker_killed_and_restarted_mid_stream(
    topics: Topics, make_settings, tmp_path: Path, mode: str, capsys
) -> None:
    with own_broker() as broker:
        cluster = KafkaCluster(broker.bootstrap_servers, "local", broker)
        await make_topics(cluster, topics, partitions=3)
        n = 1500
        messages, names = stream(n)
        await produce(broker.bootstrap_servers, topics.input, messages)
        settings = make_settings(
            model={"n_samples": 2},
            kafka={"bootstrap_servers": broker.bootstrap_servers},
            **mode_settings(mode),
        )
        bound = settings.max_in_flight_batches * settings.batch_size
        worker = WorkerProcess(settings, tmp_path / "worker.log", name="survivor")
        try:
            async with OutputWatcher(broker.client_config(), topics, isolation(mode)) as out:
                await out.wait_for(250, timeout_s=300, worker=worker)
                killed = time.monotonic()
                broker.restart(graceful=False)  # SIGKILL the JVM, start again: same port, data
                back = time.monotonic()
                assert worker.proc.poll() is None, worker.log_text()[-3000:]
                await recovered(out, back, worker)
                resumed = out.first_arrival_after(back + 1) - back  # type: ignore[operator]
                await out.wait_for(n, timeout_s=600, worker=worker)
                await out.settle(4)
            worker.terminate()
            code = await asyncio.to_thread(worker.wait, 90)
        finally:
            if worker.proc.poll() is None:
                worker.kill()
        log = worker.log_text()
        assert code == 0, log[-3000:]
        result = check(mode, out, names, bound, "broker killed + restarted")
        committed, ends = await committed_and_end(
            broker.bootstrap_servers, topics.group_id, topics.input
        )
        assert committed == ends
        errors = [e for e in log_events(log) if e.get("logger", "").startswith("worker")]
        errors = [e for e in errors if e.get("level") == "error"]
        assert errors == [], errors
        report(
            capsys,
            f"{result}; broker down {back - killed:.1f}s, worker publishing again "
            f"{resumed:.1f}s after the broker was back",
        )


# ── slow inference ──────────────────────────────────────────────────────────────────────────


class SlowProcessor(BatchProcessor):
    """Inference that takes 10 s per batch: longer than the session timeout (6 s) and the
    max.poll.interval (8 s) of the test."""

    def infer(self, token_ids: list[list[int]]) -> McSummary:
        time.sleep(10)
        return super().infer(token_ids)


async def test_slow_inference_keeps_heartbeats_and_partitions(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier, capsys
) -> None:
    await make_topics(kafka, topics, partitions=2)
    n = 48
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n)])
    settings = make_settings(
        model={"n_samples": 2},
        batch_size=16,
        max_in_flight_batches=2,
        kafka={
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 1_000,
            "max_poll_interval_ms": 8_000,
        },
    )
    pipeline = Pipeline(settings, classifier=test_classifier, processor_factory=SlowProcessor)
    assigned: list[set[TopicPartition]] = []
    revoked: list[set[TopicPartition]] = []
    on_assigned, on_revoked = pipeline.on_assigned, pipeline.on_revoked

    def record_assigned(tps: set[TopicPartition]) -> None:
        assigned.append(set(tps))
        on_assigned(tps)

    async def record_revoked(tps: set[TopicPartition]) -> None:
        if tps:  # aiokafka reports an empty revocation before the first assignment
            revoked.append(set(tps))
        await on_revoked(tps)

    pipeline.on_assigned = record_assigned  # type: ignore[method-assign]
    pipeline.on_revoked = record_revoked  # type: ignore[method-assign]
    started = time.monotonic()
    async with OutputWatcher(kafka.client_config(), topics) as out:
        async with running(pipeline) as task:
            await out.wait_for(n, timeout_s=300)
            await out.settle(3)
            assert not task.done()
        assert await task == 0
    took = time.monotonic() - started
    assert revoked == [], f"partitions revoked during slow inference: {revoked}"
    assert len(assigned) == 1
    assert set(out.ids) == {f"post-{i}" for i in range(n)}
    assert out.duplicates() == 0
    assert took > 3 * 10, "three batches of 10 s each"
    report(
        capsys,
        f"slow inference (10 s/batch, session 6 s, max.poll.interval 8 s): in {n}, "
        f"enriched {sum(out.ids.values())}, duplicates 0, revocations 0, took {took:.0f}s",
    )


# ── overload: 10x the sustainable rate ──────────────────────────────────────────────────────


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).memory_info().rss / 2**20
    return 0.0


async def _feed(bootstrap: str, topic: str, start: int, rate: float, seconds: float) -> int:
    """Posts ``post-start``... at ``rate`` per second for ``seconds``; returns the count."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)
    await producer.start()
    sent, began = 0, time.monotonic()
    try:
        while (elapsed := time.monotonic() - began) < seconds:
            due = int(elapsed * rate) - sent
            for _ in range(due):
                key, value = post_bytes(start + sent)
                await producer.send(topic, value, key=key)
                sent += 1
            await asyncio.sleep(0.05)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def test_ten_times_the_sustainable_rate_for_minutes(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    """Lag grows, throughput stays at the sustainable rate, memory stays flat (fetching pauses
    while max_in_flight_batches are in flight), and nothing below the committed offsets is
    missing from the outputs."""
    await make_topics(kafka, topics, partitions=3)
    bootstrap = kafka.bootstrap_servers
    settings: WorkerSettings = make_settings(model={"n_samples": 2})
    worker = WorkerProcess(settings, tmp_path / "worker.log", name="overloaded")
    samples: list[tuple[float, int, float]] = []  # (time, outputs, rss MB)
    try:
        async with OutputWatcher(kafka.client_config(), topics) as out:

            async def sample(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    samples.append((time.monotonic(), out.total, _rss_mb(worker.proc.pid)))
                    await asyncio.sleep(1)

            # 1. the sustainable rate: a backlog, measured after the warm-up
            warm = 1200
            await produce(bootstrap, topics.input, [post_bytes(i) for i in range(warm)])
            await out.wait_for(200, timeout_s=300, worker=worker)
            t0, c0 = time.monotonic(), out.total
            await out.wait_for(900, timeout_s=600, worker=worker)
            sustainable = (out.total - c0) / (time.monotonic() - t0)
            await out.wait_for(warm, timeout_s=600, worker=worker)
            baseline_rss = _rss_mb(worker.proc.pid)
            # 2. ten times that rate for three minutes
            overload_s = 180.0
            rate = 10 * sustainable
            started = time.monotonic()
            fed, _ = await asyncio.gather(
                _feed(bootstrap, topics.input, warm, rate, overload_s), sample(overload_s)
            )
            during = [s for s in samples if s[0] >= started]
            throughput = (during[-1][1] - during[0][1]) / (during[-1][0] - during[0][0])
            peak_rss = max(s[2] for s in during)
            committed, ends = await committed_and_end(bootstrap, topics.group_id, topics.input)
            lag = sum(ends.values()) - sum(c or 0 for c in committed.values())
            assert worker.proc.poll() is None, "the worker survived the overload"
            worker.terminate()
            assert await asyncio.to_thread(worker.wait, 90) == 0
            await out.settle(3)
        # nothing lost: every offset below the committed one has its output
        committed, _ = await committed_and_end(bootstrap, topics.group_id, topics.input)
        done: dict[int, set[int]] = {}
        for partition, offset in out.sources:
            done.setdefault(partition, set()).add(offset)
        for partition, offset in committed.items():
            missing = set(range(offset or 0)) - done.get(partition, set())
            assert not missing, f"partition {partition}: {len(missing)} offsets lost"
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    processed = sum(c or 0 for c in committed.values())
    assert lag > fed / 2, f"lag {lag} should grow with an input 10x faster than the worker"
    assert 0.5 * sustainable <= throughput <= 1.5 * sustainable, (throughput, sustainable)
    assert peak_rss < baseline_rss + 200, (baseline_rss, peak_rss)
    report(
        capsys,
        f"overload: sustainable {sustainable:.0f} posts/s, fed {fed} posts at "
        f"{rate:.0f}/s for {overload_s:.0f}s, throughput under overload {throughput:.0f} "
        f"posts/s, lag at the end {lag}, worker RSS {baseline_rss:.0f} MB before -> peak "
        f"{peak_rss:.0f} MB, committed {processed} of {warm + fed}, lost 0",
    )
