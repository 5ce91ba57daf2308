"""Exactly-once mode: outputs and consumed offsets commit in one transaction."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest
from support.faults import report
from support.harness import Topics, WorkerProcess, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.streams import committed_and_end, post_bytes, produce, read_all, values

from worker.pipeline import Pipeline

pytestmark = pytest.mark.kafka


async def test_exactly_once_mode_publishes_each_post_once(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    await make_topics(kafka, topics, partitions=3)
    n = 300
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n)])
    settings = make_settings(exactly_once=True, model={"n_samples": 2})
    async with running(Pipeline(settings, classifier=test_classifier)):
        records = await read_all(
            kafka.bootstrap_servers, topics.enriched, expect=n, isolation_level="read_committed"
        )
    ids = collections.Counter(e["id"] for e in values(records))
    assert set(ids) == {f"post-{i}" for i in range(n)}
    assert max(ids.values()) == 1
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends


async def test_exactly_once_survives_sigkill_without_duplicates(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    await make_topics(kafka, topics, partitions=3)
    n = 1500  # the kill follows the first committed outputs: most of the stream is to come
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n)])
    settings = make_settings(
        exactly_once=True, transaction_timeout_ms=10_000, model={"n_samples": 2}
    )
    worker = WorkerProcess(settings, tmp_path / "w1.log", name="eos-1")
    try:
        await worker.wait_for_log('"partitions assigned"', timeout_s=180)
        while len(await read_all(kafka.bootstrap_servers, topics.enriched, idle_s=0,
                                 timeout_s=5, isolation_level="read_committed")) < 60:  # fmt: skip
            assert worker.proc.poll() is None, worker.log_text()
            await asyncio.sleep(0.2)
    finally:
        worker.kill()
    # what the killed worker committed (its open transaction is aborted): the kill landed
    # mid-stream, after some transactions and before the last
    at_kill = len(await read_all(kafka.bootstrap_servers, topics.enriched, idle_s=1,
                                 isolation_level="read_committed"))  # fmt: skip
    assert 60 <= at_kill < n, f"{at_kill} of {n} committed at the kill"
    restarted = WorkerProcess(settings, tmp_path / "w2.log", name="eos-2")
    try:
        records = await read_all(
            kafka.bootstrap_servers, topics.enriched, expect=n, idle_s=4, timeout_s=240,
            isolation_level="read_committed",
        )  # fmt: skip
    finally:
        restarted.terminate()
        assert restarted.wait(60) == 0
    ids = collections.Counter(e["id"] for e in values(records))
    assert set(ids) == {f"post-{i}" for i in range(n)}, "posts were lost"
    assert max(ids.values()) == 1, f"duplicates: {[k for k, v in ids.items() if v > 1][:5]}"
    report(capsys, f"exactly-once SIGKILL: {at_kill} of {n} committed at the kill; all once after")
