"""Training, bundles, thresholds and evaluation metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support
from support.model_fixtures import tiny_dataset

from schemas.labels import GOEMOTIONS_LABELS
from worker.bundle import BundleManifest, default_bundle_path, read_thresholds, write_thresholds
from worker.inference.loading import load_classifier
from worker.routing.policy import expected_risk
from worker.settings import ModelSettings
from worker.training.evaluation import predict_texts
from worker.training.goemotions import read_tsv
from worker.training.metrics import (
    THRESHOLD_GRID,
    binarize,
    classification_report,
    macro_f1,
    shared_threshold,
    split_half_macro_f1,
    tune_thresholds,
)
from worker.training.report import (
    draw_label_sets,
    model_implied_routing,
    per_post_f1,
    predicted_sets,
    risk_coverage,
    top_label_wrong,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "goemotions"  # slices of the official splits: see its README
# Dev macro-F1 of the shipped bundle (the four-member ensemble) on the first 500 dev posts (MC mean,
# N = 10 split over the members, the bundle's thresholds, which were tuned on dev: optimistic).
# Measured, seeds 0-5: 0.520-0.537 (mean 0.530, sd 0.0056). The floor sits four standard
# deviations below the mean: a broken bundle or engine lands far lower. (The single-model bundle
# before it: mean 0.513, floor 0.49.)
DEFAULT_BUNDLE_FLOOR = 0.50
DEFAULT_BUNDLE_MAX_BYTES = 40_000_000  # issue 20: loadable offline and small

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("weights", ["lora", "delta"])
def test_smoke_training_writes_a_bundle_that_loads_offline_and_classifies(
    tmp_path: Path, weights: str
) -> None:
    data = tiny_dataset(tmp_path / "data")
    bundle = tmp_path / f"bundle-{weights}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["--lora-rank", "4"] if weights == "lora" else ["--lora-rank", "0"]
    train = subprocess.run(
        [sys.executable, "-m", "worker.cli", "train", "--data", str(data), "--output", str(bundle),
         "--max-steps", "3", "--batch-size", "8", "--n-samples", "2", "--weights", weights,
         "--threads", "1", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    manifest = BundleManifest.read(bundle)
    assert manifest.weights == weights
    assert manifest.labels == list(GOEMOTIONS_LABELS)
    assert "model.safetensors" not in {p.name for p in bundle.iterdir()}
    assert sum(p.stat().st_size for p in bundle.iterdir()) < 15_000_000
    assert (bundle / "CARD.md").read_text().startswith("# ")
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": "a", "text": "thank you so much!"}\n{"id": "b", "text": "ugh"}\n')
    out = tmp_path / "out.jsonl"
    classify = subprocess.run(
        [sys.executable, "-m", "worker.cli", "classify", "-i", str(posts), "-o", str(out),
         "--model", str(bundle), "--n-samples", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert classify.returncode == 0, classify.stderr[-3000:]
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["id"] for e in events] == ["a", "b"]
    thresholds = read_thresholds(bundle / "thresholds.json", list(GOEMOTIONS_LABELS))
    assert [e["threshold"] for e in events[0]["emotions"]] == pytest.approx(thresholds, abs=1e-4)


def test_thresholds_round_trip(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    values = np.array([0.12, 0.5, 0.87])
    write_thresholds(tmp_path / "t.json", names, values)
    assert read_thresholds(tmp_path / "t.json", names) == pytest.approx(values)


TARGETS = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0]])
PREDICTIONS = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]])


def test_report_equals_scikit_learn_on_a_fixed_example() -> None:
    report = classification_report(TARGETS, PREDICTIONS, ["a", "b", "c"])
    for average in ("micro", "macro", "weighted", "samples"):
        p, r, f, _ = precision_recall_fscore_support(TARGETS, PREDICTIONS, average=average)
        assert report[average]["precision"] == pytest.approx(p)
        assert report[average]["recall"] == pytest.approx(r)
        assert report[average]["f1"] == pytest.approx(f)
    per_label = f1_score(TARGETS, PREDICTIONS, average=None)
    assert [report["labels"][n]["f1"] for n in "abc"] == pytest.approx(per_label)
    assert [report["labels"][n]["support"] for n in "abc"] == [3, 3, 3]
    assert macro_f1(TARGETS, PREDICTIONS) == pytest.approx(
        f1_score(TARGETS, PREDICTIONS, average="macro")
    )


def test_threshold_tuning_maximises_each_labels_f1() -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 3)) < [0.1, 0.3, 0.5]).astype(int)
    probs = np.clip(targets * 0.3 + rng.random((400, 3)) * 0.7, 0, 1)
    tuned = tune_thresholds(targets, probs, shrink_posts=0)
    for j in range(3):
        best = max(f1_score(targets[:, j], probs[:, j] >= t) for t in np.arange(0.01, 1, 0.01))
        assert f1_score(targets[:, j], probs[:, j] >= tuned[j]) == pytest.approx(best)
    honest, half_b, half_a = split_half_macro_f1(targets, probs)
    assert honest == pytest.approx((half_a + half_b) / 2)
    assert honest <= macro_f1(targets, binarize(probs, tuned)) + 1e-9


def test_thresholds_shrink_toward_the_shared_one_by_how_few_positives_a_label_has() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((2000, 3)) < [0.005, 0.05, 0.4]).astype(int)  # ~10, 100, 800 positives
    targets[:, 0] = 0
    targets[:5, 0] = 1  # 5 positives
    probs = np.clip(targets * 0.35 + rng.random((2000, 3)) * 0.65, 0, 1)
    own = tune_thresholds(targets, probs, shrink_posts=0)
    shared = shared_threshold(targets, probs)
    best = max(macro_f1(targets, binarize(probs, t)) for t in THRESHOLD_GRID)
    assert macro_f1(targets, binarize(probs, shared)) == pytest.approx(best)
    shrunk = tune_thresholds(targets, probs, shrink_posts=100)
    positives = targets.sum(axis=0)
    weight = positives / (positives + 100)
    assert shrunk == pytest.approx(weight * own + (1 - weight) * shared)
    assert weight[0] < 0.05 and weight[2] > 0.85  # a rare label moves nearly all the way
    assert abs(shrunk[0] - shared) < 0.05 * abs(own[0] - shared) + 1e-9
    # no positives: the shared threshold of these targets (without shrinking: 0.5)
    targets[:, 0] = 0
    assert tune_thresholds(targets, probs)[0] == shared_threshold(targets, probs)
    assert tune_thresholds(targets, probs, shrink_posts=0)[0] == 0.5
    # nothing to go on at all: every label at 0.5, not at the grid's first value
    assert tune_thresholds(np.zeros_like(targets), probs).tolist() == [0.5] * 3


def test_risk_coverage_by_hand() -> None:
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 1]])
    probs = np.array([[0.9, 0.1], [0.8, 0.3], [0.6, 0.7], [0.2, 0.9]])
    predictions = predicted_sets(probs, np.array([0.5, 0.5]))
    f1 = per_post_f1(targets, predictions)
    assert f1.tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0])
    wrong = top_label_wrong(targets, probs)
    assert wrong.tolist() == [False, True, False, False]
    result = risk_coverage("s", np.array([0.1, 0.9, 0.2, 0.3]), f1, wrong, rates=(0.25,))
    assert result.aurc == pytest.approx(0.0625)  # kept risk 0, 0, 0, 1/4: mean 1/16
    assert result.at_rates["25%"]["kept_post_f1"] == 1.0
    assert result.at_rates["25%"]["error_ratio"] == pytest.approx(4.0)


def test_the_model_implied_routing_gain_is_what_routing_gets_when_the_probabilities_are_true() -> (
    None
):
    rng = np.random.default_rng(3)
    n, labels = 8_000, 6
    sharpness = rng.uniform(0.5, 8.0, n)[:, None]  # some posts sure, some not
    probs = 1 / (1 + np.exp(-sharpness * rng.normal(-0.6, 1.0, (n, labels))))
    thresholds = np.full(labels, 0.4)
    targets = draw_label_sets(np.random.default_rng(99), probs)  # the probabilities are true
    assert targets.sum(axis=1).min() == 1
    implied = model_implied_routing(probs, thresholds, probs, rate=0.10, draws=20)
    # routing the real posts by the same expected risk gains what the draws say, within noise
    f1 = per_post_f1(targets, predicted_sets(probs, thresholds))
    p_empty = np.prod(1 - probs, axis=1)
    conditional_f1 = (1 - expected_risk(probs, thresholds, probs)) / (1 - p_empty)
    real = risk_coverage("s", -conditional_f1, f1, top_label_wrong(targets, probs), rates=(0.1,))
    real_gain = real.at_rates["10%"]["kept_post_f1"] - f1.mean()
    assert implied["kept_gain"] > 0.03
    assert abs(real_gain - implied["kept_gain"]) < 4 * implied["kept_gain_std"] + 0.002
    assert implied["mean_post_f1"] == pytest.approx(f1.mean(), abs=0.01)
    assert implied["oracle_kept_gain"] > implied["kept_gain"] + 0.02
    # a model whose posts all look alike leaves a router nothing to find
    same = np.tile(probs[:1], (n, 1))
    assert abs(model_implied_routing(same, thresholds, same)["kept_gain"]) < 0.003


def test_default_bundle_loads_and_stays_above_its_floor() -> None:
    bundle = default_bundle_path()
    manifest = BundleManifest.read(bundle)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < DEFAULT_BUNDLE_MAX_BYTES, f"the default bundle is {size / 1e6:.1f} MB"
    classifier = load_classifier(ModelSettings(path="default", device="cpu"))
    assert classifier.label_names == list(GOEMOTIONS_LABELS) == manifest.labels
    assert len(classifier.models) == len(manifest.members) == 4
    assert classifier.ood is not None and classifier.ood.density is not None
    assert classifier.calibration is not None and classifier.selector is not None
    dev = read_tsv(DATA / "dev.tsv", len(GOEMOTIONS_LABELS)).subset(list(range(500)))
    mc = predict_texts(classifier, dev.texts, n_samples=10, seed=0)
    score = macro_f1(dev.targets, binarize(mc.mean, classifier.thresholds))
    assert score >= DEFAULT_BUNDLE_FLOOR, score


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_with_the_same_weights(
    tmp_path: Path, lora_rank: int
) -> None:
    from worker.training.goemotions import load_dataset_dir
    from worker.training.resume import CheckpointMismatch
    from worker.training.train import TrainConfig, default_base_model, train

    names, train_split, dev_split = load_dataset_dir(tiny_dataset(tmp_path / "data", 64, 16))
    config = TrainConfig(
        base_model=default_base_model(),
        lora_rank=lora_rank,
        learning_rate=5e-4 if lora_rank else 8e-5,
        batch_size=16,  # 4 batches an epoch: the checkpoint of step 4 ends the first
        epochs=2,
        eval_every=4,
        patience=99,
        seed=5,
    )

    def run(checkpoints: Path | None, stop_at: int = 0) -> dict[str, np.ndarray]:
        def progress(step: int, total: int) -> None:
            if step == stop_at:
                raise Interrupted

        result = train(config, names, train_split, dev_split, lambda _: None, progress, checkpoints)
        return {
            n: p.detach().numpy().copy()
            for n, p in result.model.named_parameters()
            if p.requires_grad
        }

    straight = run(None)
    folder = tmp_path / "checkpoint"
    with pytest.raises(Interrupted):
        run(folder, stop_at=6)  # after the checkpoint of step 4, in the second epoch
    assert (folder / "checkpoint.pt").is_file()
    resumed = run(folder, stop_at=0)
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)

    other = dataclasses.replace(config, learning_rate=1e-3)
    with pytest.raises(CheckpointMismatch, match="learning_rate"):
        train(other, names, train_split, dev_split, lambda _: None, None, folder)
