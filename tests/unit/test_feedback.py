"""Learning from verdicts without Kafka: threshold recalibration moves only with enough evidence
and never far, a dominant reviewer counts for a capped share, and the promotion gate refuses a
worse bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.model_fixtures import DATA

from schemas.labels import GOEMOTIONS_LABELS
from worker.feedback.thresholds import RecalibrationGuards, recalibrate, reviewer_weights
from worker.feedback.verdict_data import recalibration_inputs, training_rows
from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier, load_classifier
from worker.settings import ModelSettings
from worker.training.gate import gate
from worker.training.goemotions import read_tsv

NAMES = ["joy", "anger"]


def verdicts(n: int, seed: int = 0, best: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels whose F1-optimal threshold for label 0 is about ``best``."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, size=(n, 2))
    y = (p >= best).astype(int)  # separable at ``best``
    return p, y


def test_thresholds_move_toward_the_verdicts_shrunk_and_bounded() -> None:
    p, y = verdicts(400, best=0.3)
    current = np.array([0.5, 0.5])
    reviewers = [f"r{k % 4}" for k in range(400)]
    guards = RecalibrationGuards(prior_weight=200, max_shift=0.15)
    result = recalibrate(p, y, reviewers, current, NAMES, guards)
    # the optimum is ~0.30; shrunk by 400 / 600: 0.5 - 2/3 * 0.2 = 0.367
    assert result.thresholds[0] == pytest.approx(0.367, abs=0.02)
    assert set(result.changed) == {"joy", "anger"}
    far = recalibrate(p, y, reviewers, current, NAMES, RecalibrationGuards(prior_weight=0))
    assert far.thresholds[0] == pytest.approx(0.35)  # capped at max_shift 0.15


def test_thresholds_stay_with_too_few_verdicts_positives_or_reviewers() -> None:
    p, y = verdicts(40)
    current = np.array([0.5, 0.5])
    few = recalibrate(p, y, ["a", "b", "c"] * 13 + ["a"], current, NAMES)
    assert few.changed == {} and "fewer than 50" in few.kept["joy"]
    p, y = verdicts(300)
    one = recalibrate(p, y, ["a", "b"] * 150, current, NAMES)
    assert one.changed == {} and "2 reviewers" in one.kept["joy"]
    y[:, 1] = 0
    y[:5, 1] = 1
    rare = recalibrate(p, y, ["a", "b", "c"] * 100, current, NAMES)
    assert "anger" not in rare.changed and "5 positive" in rare.kept["anger"]
    np.testing.assert_array_equal(rare.thresholds[1], 0.5)


def test_a_dominant_reviewer_counts_for_a_capped_share() -> None:
    reviewers = ["bulk"] * 80 + ["a"] * 10 + ["b"] * 10
    w = reviewer_weights(reviewers, max_share=0.34)
    shares = {r: w[[x == r for x in reviewers]].sum() for r in ("bulk", "a", "b")}
    assert shares["bulk"] == pytest.approx(34.0) and shares["a"] == 10 == shares["b"]
    # a reviewer who labels against the others moves the threshold less when capped
    p, y = verdicts(300, best=0.3)
    rogue = np.r_[np.ones((600, 2))]  # 600 verdicts: "everything is joy and anger"
    p_all = np.r_[p, np.random.default_rng(1).uniform(0, 1, size=(600, 2))]
    y_all = np.r_[y, rogue].astype(int)
    names = [f"r{k % 3}" for k in range(300)] + ["rogue"] * 600
    current = np.array([0.5, 0.5])
    guards = RecalibrationGuards(prior_weight=0, max_shift=1.0)
    capped = recalibrate(p_all, y_all, names, current, NAMES, guards)
    uncapped = recalibrate(
        p_all, y_all, names, current, NAMES, RecalibrationGuards(0, 10, 3, 1.0, 0, 1.0)
    )
    assert abs(capped.thresholds[0] - 0.3) < abs(uncapped.thresholds[0] - 0.3)


def final_event(post_id: str, labels: list[str], revision: str, outcome: str = "labelled") -> dict:
    return {
        "id": post_id,
        "post": {"id": post_id, "text": f"text of {post_id}"},
        "labels": labels,
        "outcome": outcome,
        "decided_by": "alice",
        "model": {"revision": revision},
        "emotions": [{"label": "joy", "probability": 0.7}, {"label": "anger", "probability": 0.2}],
    }


def test_verdict_data_keeps_this_models_labelled_verdicts_and_the_last_per_post() -> None:
    events = [
        final_event("p1", ["joy"], "rev-a"),
        final_event("p2", [], "rev-a", outcome="skip"),
        final_event("p3", ["anger"], "rev-b"),  # another model's probabilities
        final_event("p1", ["anger"], "rev-a"),  # a later verdict on p1 (after a replay)
    ]
    m = recalibration_inputs(events, NAMES, "rev-a")
    assert m.probabilities.shape == (2, 2) and m.reviewers == ["alice", "alice"]
    np.testing.assert_array_equal(m.labels, [[1, 0], [0, 1]])
    np.testing.assert_allclose(m.probabilities[0], [0.7, 0.2])
    rows = training_rows(events)
    assert sorted(rows) == [("text of p1", ["anger"], "p1"), ("text of p3", ["anger"], "p3")]


@pytest.fixture
def worse_bundle(test_model_dir: Path, tmp_path: Path) -> Path:
    """The test model with thresholds that predict nothing: deliberately worse."""
    folder = tmp_path / "worse"
    shutil.copytree(test_model_dir, folder)
    (folder / "thresholds.json").write_text(json.dumps(dict.fromkeys(GOEMOTIONS_LABELS, 0.999)))
    return folder


def test_the_gate_refuses_a_worse_bundle_and_passes_an_equal_one(
    test_classifier: Classifier, worse_bundle: Path, one_torch_thread: None
) -> None:
    canary = read_tsv(DATA / "dev.tsv", len(GOEMOTIONS_LABELS)).subset(range(64))
    engine = EngineConfig(n_samples=2, mode="full", seed=0)
    worse = load_classifier(ModelSettings(path=str(worse_bundle), device="cpu"))
    refused = gate(worse, test_classifier, canary, engine)
    assert not refused.passed
    assert refused.candidate_f1 < refused.current_f1 and refused.current_f1 > 0
    assert "REFUSED" in refused.line()
    same = gate(test_classifier, test_classifier, canary, engine)
    assert same.passed and same.candidate_f1 == same.current_f1
