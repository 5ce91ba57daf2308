"""Model releases on a real broker: a promoted bundle reaches every running worker within a
minute with no post lost or processed twice, a rollback brings the previous one back, and the
gate refuses to announce a worse bundle."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.faults import report
from support.harness import REPO, Topics, WorkerProcess, make_topics, settings_env
from support.kafka_cluster import KafkaCluster
from support.model_fixtures import DATA, build_test_model
from support.streams import post_bytes, produce, read_all, values

from schemas.labels import GOEMOTIONS_LABELS
from worker.feedback.rollout import promote, read_rollout, rollback
from worker.inference.loading import load_classifier
from worker.settings import ModelSettings

pytestmark = pytest.mark.kafka


def revision_of(folder: Path) -> str | None:
    return load_classifier(ModelSettings(path=str(folder), device="cpu")).revision


async def test_a_promoted_bundle_reaches_every_worker_and_a_rollback_brings_the_old_one_back(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, test_model_dir: Path,
    capsys,
) -> None:  # fmt: skip
    await make_topics(kafka, topics, partitions=4)
    settings = make_settings(exactly_once=True, model={"n_samples": 2})
    v1 = revision_of(test_model_dir)
    second = build_test_model(tmp_path / "v2", seed=99)
    v2 = revision_of(second)
    assert v1 != v2
    workers = [WorkerProcess(settings, tmp_path / f"w{k}.log", name=f"w{k}") for k in (1, 2)]
    feeding: asyncio.Task[None] | None = None
    rolled_back = asyncio.Event()
    produced = 0

    async def feed() -> None:
        """30 posts every 0.5 s: the stream goes on through both swaps, and for four chunks
        after the rollback reached both workers (a fixed length raced the swaps on a busy
        machine: the stream could end before the second one)."""
        nonlocal produced
        after = 0
        while after < 4:
            await produce(kafka.bootstrap_servers, topics.input,
                          [post_bytes(i) for i in range(produced, produced + 30)])  # fmt: skip
            produced += 30
            after += rolled_back.is_set()
            await asyncio.sleep(0.5)

    async def swapped(count: int) -> float:
        began = time.monotonic()
        while not all(w.log_text().count('"model swapped"') >= count for w in workers):
            assert all(w.proc.poll() is None for w in workers), workers[0].log_text()
            assert time.monotonic() - began < 60, "a worker did not swap within a minute"
            await asyncio.sleep(0.2)
        return time.monotonic() - began

    try:
        for w in workers:
            await w.wait_for_log('"partitions assigned"', timeout_s=180)
        feeding = asyncio.create_task(feed())
        await asyncio.sleep(4)
        await promote(settings, str(second), v2)
        to_v2 = await swapped(1)
        await asyncio.sleep(4)
        await rollback(settings)
        to_v1 = await swapped(2)
        rolled_back.set()
        await feeding
        n = produced
        records = await read_all(kafka.bootstrap_servers, topics.enriched, expect=n, idle_s=4,
                                 timeout_s=240, isolation_level="read_committed")  # fmt: skip
    finally:
        if feeding is not None:
            feeding.cancel()
        for w in workers:
            w.terminate()
        codes = [w.wait(60) for w in workers]
    assert codes == [0, 0], workers[0].log_text()
    events = values(records)
    ids = collections.Counter(e["id"] for e in events)
    assert set(ids) == {f"post-{i}" for i in range(n)}, "posts were lost"
    assert max(ids.values()) == 1, "posts were processed twice"
    # in offset order per partition: v1, then v2 (release 1), then v1 again (release 2)
    by_partition = collections.defaultdict(list)
    for record, event in zip(records, events, strict=True):
        by_partition[record.partition].append((record.offset, event["model"]))
    phases = collections.Counter()
    for rows in by_partition.values():
        seen = [
            (m["revision"], m.get("rollout_version")) for _, m in sorted(rows, key=lambda r: r[0])
        ]
        compact = [k for i, k in enumerate(seen) if i == 0 or seen[i - 1] != k]
        assert compact in ([(v1, None), (v2, 1), (v1, 2)], [(v1, None), (v1, 2)],
                           [(v1, None), (v2, 1)], [(v2, 1), (v1, 2)]), compact  # fmt: skip
        phases.update(seen)
    assert phases[(v2, 1)] > 0 and phases[(v1, 2)] > 0
    by_worker = {e["worker_id"] for e in events if e["model"].get("rollout_version") == 1}
    assert by_worker == {"w1", "w2"}, "the release did not reach every worker"
    report(capsys, f"rollout: every worker on v2 in {to_v2:.1f}s, back on v1 in {to_v1:.1f}s; "
                   f"{n} posts once each ({phases[(v2, 1)]} by v2)")  # fmt: skip


def test_promote_with_a_canary_refuses_a_worse_bundle(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, test_model_dir: Path
) -> None:
    worse = tmp_path / "worse"
    shutil.copytree(test_model_dir, worse)
    (worse / "thresholds.json").write_text(json.dumps(dict.fromkeys(GOEMOTIONS_LABELS, 0.999)))
    canary = tmp_path / "canary.tsv"
    canary.write_text("\n".join((DATA / "dev.tsv").read_text().splitlines()[:64]) + "\n")
    settings = make_settings(model={"n_samples": 2})
    env = {**settings_env(settings), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "worker.cli", "rollout", "promote", str(worse),
           "--canary", str(canary)]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "not promoted" in run.stderr and "REFUSED" in run.stderr
    assert asyncio.run(read_rollout(settings.kafka, settings.topics.control))[0] is None
    good = subprocess.run([*cmd[:5], str(test_model_dir), *cmd[6:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert good.returncode == 0, good.stderr
    rollout, _ = asyncio.run(read_rollout(settings.kafka, settings.topics.control))
    assert rollout is not None and rollout.current.model_path == str(test_model_dir)
