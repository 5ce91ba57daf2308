"""The feedback simulation: each strategy routes the posts it should, the curves count the
verdicts the budget allows, and the report says how much faster than random each learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.model_fixtures import DATA

from schemas.labels import GOEMOTIONS_LABELS
from worker.routing.policy import expected_risk
from worker.training.feedback_sim import SimConfig, choose, simulate, write_report
from worker.training.goemotions import read_tsv
from worker.training.train import default_base_model


def test_each_strategy_routes_its_most_uncertain_posts() -> None:
    rng = np.random.default_rng(0)
    samples = rng.uniform(0, 1, size=(8, 50, 4)) ** 3  # (S, B, L)
    thresholds = np.full(4, 0.3)
    risk = expected_risk(samples.mean(0), thresholds)
    chosen = choose("expected_risk", samples, thresholds, 5, rng)
    assert set(chosen) == set(np.argsort(-risk)[:5])
    samples[:, 7] = np.where(np.arange(8)[:, None] % 2 == 0, 0.95, 0.05)  # the samples disagree
    assert 7 in choose("mutual_information", samples, thresholds, 1, rng)
    picks = {tuple(sorted(choose("random", samples, thresholds, 5, rng))) for _ in range(5)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="unknown strategy"):
        choose("oracle", samples, thresholds, 5, rng)


def test_a_small_simulation_counts_verdicts_and_reports_against_random(
    tmp_path: Path, one_torch_thread: None
) -> None:
    train = read_tsv(DATA / "train.tsv", len(GOEMOTIONS_LABELS))
    dev = read_tsv(DATA / "dev.tsv", len(GOEMOTIONS_LABELS))
    config = SimConfig(rounds=2, seeds=[0], n_samples=4, epochs=2, budget=0.1)
    result = simulate(train, dev, list(GOEMOTIONS_LABELS), default_base_model(),
                      tmp_path / "cache", config, progress=lambda _: None)  # fmt: skip
    streamed = len(train) - int(len(train) * config.initial_share)
    per_round = [round(0.1 * len(c)) for c in np.array_split(np.arange(streamed), 2)]
    for strategy, curve in result["mean_curves"].items():
        assert [p["verdicts"] for p in curve] == [0, per_round[0], sum(per_round)], strategy
        assert all(0 <= p["model_f1"] <= 1 for p in curve)
    assert set(result["summary"]["model_f1"]) >= {"expected_risk", "random_slope_per_1000"}
    paths = write_report(result, tmp_path / "report")
    assert [p.name for p in paths][:2] == ["feedback-simulation.json", "feedback-simulation.md"]
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())  # features kept
