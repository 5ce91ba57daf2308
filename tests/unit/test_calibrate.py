"""``emoworker calibrate`` on a small bundle: by default it keeps the model's thresholds; with
``--tune-thresholds`` it tunes them again on the same dev MC means and writes them with the
bundle's dev figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.model_fixtures import export_test_bundle, tiny_dataset
from typer.testing import CliRunner

from schemas.labels import GOEMOTIONS_LABELS
from worker.bundle import THRESHOLDS_FILE, BundleManifest
from worker.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def bundle(test_model_dir: Path, tmp_path: Path) -> Path:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(test_model_dir)
    return export_test_bundle(model, test_model_dir, tmp_path / "bundle", "full", 2, split="dev")


def test_calibrate_tunes_the_thresholds_only_when_asked(bundle: Path, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data", n_train=24, n_dev=80)
    args = ["calibrate", "--data", str(data), "--model", str(bundle), "--n-samples", "2"]
    before = (bundle / THRESHOLDS_FILE).read_text()

    kept = CliRunner().invoke(app, args)
    assert kept.exit_code == 0, kept.output
    assert (bundle / THRESHOLDS_FILE).read_text() == before
    assert (bundle / "calibration.json").is_file()
    assert "mc_macro_f1_split_half" not in BundleManifest.read(bundle).metrics

    tuned = CliRunner().invoke(app, [*args, "--tune-thresholds"])
    assert tuned.exit_code == 0, tuned.output
    thresholds = json.loads((bundle / THRESHOLDS_FILE).read_text())
    assert list(thresholds) == list(GOEMOTIONS_LABELS)
    assert set(thresholds.values()) != {0.5} and all(0 < t < 1 for t in thresholds.values())
    metrics = BundleManifest.read(bundle).metrics
    assert metrics["split"] == "dev" and "shrunk" in metrics["thresholds"]
    assert 0 <= metrics["mc_macro_f1_split_half"] <= 1
    assert metrics["mc_macro_f1_tuned_on_dev"] >= metrics["mc_macro_f1_at_0.5"] - 0.05
    # the routing was fitted around the new thresholds: the figures the manifest keeps are the
    # ones written beside them
    calibration = json.loads((bundle / "calibration.json").read_text())
    assert metrics["routing"] == calibration["measured"]
