"""``emoworker evaluate`` end to end on the small test model: the routing table's scores
(calibrated and learned, cross-fitted) and the OOD report from a folder of sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.model_fixtures import tiny_dataset
from support.texts import ENGLISH_POSTS, FOREIGN_POSTS
from typer.testing import CliRunner

from worker.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_evaluate_reports_the_routing_scores_and_the_ood_sets(
    tmp_path: Path, test_model_dir: Path
) -> None:
    data = tiny_dataset(tmp_path / "data", n_train=0, n_dev=60)
    sets = tmp_path / "ood"
    sets.mkdir()
    (sets / "foreign.txt").write_text("\n".join(t for _, t in FOREIGN_POSTS) + "\n")
    (sets / "english.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "lang": "de"}) for t in ENGLISH_POSTS) + "\n"
    )
    (sets / "notes.md").write_text("not a set\n")  # a folder's other files are left alone
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--data", str(data / "dev.tsv"), "--model", str(test_model_dir),
         "--n-samples", "2", "--output-dir", str(out), "--ood", str(sets)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    routing = report["routing"]
    assert {"expected_risk", "expected_risk_calibrated_cross_fitted", "learned_cross_fitted"} <= (
        set(routing)
    )
    assert "oracle" in routing and "det_entropy" in routing
    implied = report["model_implied_routing"]  # from the cross-fitted calibrated means
    assert implied["draws"] == 20 and implied["rate"] == 0.1
    assert implied["oracle_kept_gain"] >= implied["kept_gain"]
    assert "If the calibrated probabilities were the truth" in (out / "report.md").read_text()
    ood = report["ood"]
    assert ood["in_distribution_posts"] == 60 and ood["calibration"] == "builtin"
    assert set(ood["sets"]) == {"foreign", "english"}
    foreign, english = ood["sets"]["foreign"], ood["sets"]["english"]
    assert foreign["posts"] == len(FOREIGN_POSTS) and english["posts"] == len(ENGLISH_POSTS)
    assert foreign["flagged"] == 1.0 and foreign["combined"]["auroc"] > 0.95
    # English text declared German by its producer: the producer's lang wins
    assert english["flagged"] == 1.0
    assert "## Out of distribution" in (out / "report.md").read_text()
