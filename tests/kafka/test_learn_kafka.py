"""emoworker learn against a real broker: the thresholds recalibrated from the final topic's
verdicts are announced as a release of the same bundle; a fine-tuned bundle trained on the
reviewed posts is gated and announced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from support.harness import REPO, Topics, settings_env
from support.kafka_cluster import KafkaCluster, create_topics, unique_topic
from support.model_fixtures import DATA, tiny_dataset
from support.streams import produce

from schemas.labels import GOEMOTIONS_LABELS
from worker.feedback.rollout import read_rollout
from worker.inference.loading import load_classifier
from worker.settings import ModelSettings

pytestmark = pytest.mark.kafka


def final_events(n: int, revision: str | None, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """Labelled verdicts by three reviewers: joy is present exactly when its probability is at
    least 0.3, so its F1-optimal threshold is 0.3; the other labels are never chosen."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p_joy = float(rng.uniform(0, 1))
        emotions = [
            {"label": name, "probability": p_joy if name == "joy" else 0.01}
            for name in GOEMOTIONS_LABELS
        ]
        labels = ["joy"] if p_joy >= 0.3 else ["neutral"]
        event = {
            "id": f"post-{i}", "post": {"id": f"post-{i}", "text": f"reviewed post number {i}"},
            "labels": labels, "outcome": "labelled", "decided_by": f"reviewer-{i % 3}",
            "model": {"revision": revision}, "emotions": emotions,
        }  # fmt: skip
        out.append((f"post-{i}".encode(), orjson.dumps(event)))
    return out


def thresholds_of(folder: Path) -> list[float]:
    return load_classifier(ModelSettings(path=str(folder), device="cpu")).thresholds.tolist()


def emoworker(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


async def test_learn_announces_thresholds_from_verdicts_and_a_gated_bundle(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, test_model_dir: Path
) -> None:
    final = unique_topic("final")
    await create_topics(kafka.bootstrap_servers, [final], 2)
    revision = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu")).revision
    await produce(kafka.bootstrap_servers, final, final_events(300, revision))
    settings = make_settings(topics=topics.settings_dict() | {"final": final})
    env = settings_env(settings)

    cheap = emoworker(["learn", "--thresholds-only", "--promote"], env)
    assert cheap.returncode == 0, cheap.stderr[-3000:]
    assert "300 verdicts on this model" in cheap.stderr, cheap.stderr
    rollout, _ = await read_rollout(settings.kafka, settings.topics.control)
    assert rollout is not None and rollout.current.reason == "thresholds"
    assert rollout.current.model_path == str(test_model_dir)
    thresholds = rollout.current.thresholds or {}
    old = dict(zip(GOEMOTIONS_LABELS, thresholds_of(test_model_dir), strict=True))
    # toward 0.3 by 300 / 500 of the way, at most 0.15
    expected = old["joy"] + max(-0.15, min(0.15, 0.6 * (0.3 - old["joy"])))
    assert thresholds["joy"] == pytest.approx(expected, abs=0.03)
    assert thresholds["anger"] == pytest.approx(old["anger"])  # no positive verdicts: unchanged
    again = emoworker(["learn", "--thresholds-only", "--promote"], env)  # the same verdicts
    assert again.returncode == 0 and "announced" not in again.stderr, again.stderr[-2000:]
    rollout, _ = await read_rollout(settings.kafka, settings.topics.control)
    assert rollout is not None and rollout.current.version == 1  # no compounding, no new release

    data = tiny_dataset(tmp_path / "data")
    canary = tmp_path / "canary.tsv"
    canary.write_text("\n".join((DATA / "dev.tsv").read_text().splitlines()[:32]) + "\n")
    out = tmp_path / "learn"
    args = ["--canary", str(canary), "--data", str(data), "--output", str(out)]
    learned = emoworker(["learn", *args, "--max-steps", "2", "--tolerance", "1", "--promote"], env)
    assert learned.returncode == 0, learned.stderr[-3000:]
    train_rows = (out / "data" / "train.tsv").read_text().splitlines()
    assert len(train_rows) == 48 + 300
    assert {row.split("\t")[2] for row in train_rows[48:]} == {f"post-{i}" for i in range(300)}
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] and gate["canary_posts"] == 32
    rollout, _ = await read_rollout(settings.kafka, settings.topics.control)
    assert rollout is not None and rollout.current.version == 2
    assert rollout.current.model_path == str((out / "bundle").resolve())
    assert [r.version for r in rollout.previous] == [1, 0]
