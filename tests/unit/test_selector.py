"""The learned review score: cross-fitting never scores a post with a model that saw it, the
bundle file round-trips, and the policy ranks by it when the model carries one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.inference.uncertainty import McSummary
from worker.routing.policy import ReviewPolicy, expected_risk
from worker.routing.selector import FEATURES, RiskSelector, features
from worker.settings import ReviewSettings
from worker.training.selector_fit import (
    cross_fitted_scores,
    cross_fitted_thresholds,
    fit_selector,
    honest_risk,
)

LABELS = ["joy", "anger", "neutral"]
THRESHOLDS = np.array([0.5, 0.4, 0.6])


def summary(n: int, seed: int = 0) -> McSummary:
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0, 1, (n, 3))
    mi = rng.uniform(0, 0.1, n)
    return McSummary(
        mean=mean,
        std=rng.uniform(0, 0.1, (n, 3)),
        n_samples=np.full(n, 10),
        predictive_entropy=mi + 1,
        expected_entropy=np.ones(n),
        mutual_information=mi,
        flip_rate=rng.uniform(0, 0.5, (n, 3)),
    )


def test_cross_fitting_never_scores_a_post_with_a_model_that_saw_it() -> None:
    rng = np.random.default_rng(1)
    x = np.column_stack([np.arange(100.0), rng.normal(size=(100, len(FEATURES) - 1))])
    risk = rng.uniform(size=100)
    seen_by_scorer: dict[int, set[int]] = {}

    def fit(train_x: np.ndarray, train_risk: np.ndarray) -> RiskSelector:
        trained_on = {int(v) for v in train_x[:, 0]}
        selector = fit_selector(train_x, train_risk)
        original = selector.predict

        def predict(held: np.ndarray) -> np.ndarray:
            for post in held[:, 0]:
                seen_by_scorer[int(post)] = trained_on
            return original(held)

        object.__setattr__(selector, "predict", predict)
        return selector

    scores = cross_fitted_scores(x, risk, folds=5, fit=fit)
    assert sorted(seen_by_scorer) == list(range(100)), "every post scored once"
    assert all(post not in trained for post, trained in seen_by_scorer.items())
    assert all(len(trained) == 80 for trained in seen_by_scorer.values())
    assert scores.shape == (100,) and np.isfinite(scores).all()


def test_honest_risk_uses_thresholds_tuned_on_the_other_half() -> None:
    rng = np.random.default_rng(2)
    targets = (rng.uniform(size=(200, 3)) < 0.3).astype(np.float32)
    mean = np.clip(targets * 0.6 + rng.uniform(0, 0.4, (200, 3)), 0, 1)
    per_post = cross_fitted_thresholds(targets, mean)
    halves = {tuple(row) for row in per_post}
    assert len(halves) == 2, "one set of thresholds per half"
    risk = honest_risk(targets, mean)
    assert risk.shape == (200,) and ((risk >= 0) & (risk <= 1)).all()


def test_a_selector_round_trips_and_refuses_other_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x, risk = rng.normal(size=(50, len(FEATURES))), rng.uniform(size=50)
    selector = fit_selector(x, risk)
    selector.write(tmp_path)
    back = RiskSelector.read(tmp_path)
    assert back is not None
    np.testing.assert_allclose(back.predict(x), selector.predict(x))
    data = (tmp_path / "selector.json").read_text().replace('"log_tokens"', '"colour"')
    (tmp_path / "selector.json").write_text(data)
    with pytest.raises(ValueError, match="other features"):
        RiskSelector.read(tmp_path)
    assert RiskSelector.read(tmp_path / "none") is None


def test_the_policy_ranks_by_the_learned_score_when_the_model_has_one() -> None:
    stats = summary(40)
    counts = list(range(5, 45))
    x = features(
        stats, THRESHOLDS, expected_risk(stats.mean, THRESHOLDS), np.array(counts), None, 2
    )
    rng = np.random.default_rng(4)
    selector = fit_selector(x, rng.uniform(size=40))
    auto = ReviewPolicy(ReviewSettings(), LABELS, THRESHOLDS, selector=selector)
    assert auto.score_kind == "learned"
    np.testing.assert_allclose(auto.scores(stats, counts), selector.predict(x))
    plain = ReviewPolicy(ReviewSettings(), LABELS, THRESHOLDS)
    assert plain.score_kind == "expected_risk"
    np.testing.assert_allclose(plain.scores(stats), expected_risk(stats.mean, THRESHOLDS))
    chosen = ReviewPolicy(
        ReviewSettings(score="expected_risk"), LABELS, THRESHOLDS, selector=selector
    )
    assert chosen.score_kind == "expected_risk"
    with pytest.raises(ValueError, match="needs a model whose bundle carries a selector"):
        ReviewPolicy(ReviewSettings(score="learned"), LABELS, THRESHOLDS)


def test_label_calibration_fixes_miscalibrated_means_and_round_trips(tmp_path: Path) -> None:
    from worker.routing.calibration import LabelCalibration
    from worker.training.selector_fit import (
        calibration_error,
        cross_fitted_calibration,
        fit_label_calibration,
    )

    rng = np.random.default_rng(5)
    truth = rng.uniform(0.02, 0.9, (4000, 2))
    targets = (rng.uniform(size=truth.shape) < truth).astype(np.float64)
    targets[:, 1] = 0.0  # a label no post carries keeps the identity
    overconfident = 1 / (1 + np.exp(-3 * np.log(truth / (1 - truth)) - 1))  # means too extreme
    calibration = fit_label_calibration(targets, overconfident)
    assert calibration.slopes[0] == pytest.approx(1 / 3, abs=0.05)
    assert (calibration.slopes[1], calibration.intercepts[1]) == (1.0, 0.0)
    crossed = cross_fitted_calibration(targets, overconfident)
    assert calibration_error(crossed[:, :1], targets[:, :1]) < 0.3 * calibration_error(
        overconfident[:, :1], targets[:, :1]
    )
    # monotone: the order of the means (so the predicted labels) is kept
    order = np.argsort(overconfident[:, 0])
    assert (np.diff(calibration.apply(overconfident)[order, 0]) >= 0).all()
    calibration.write(tmp_path, ["a", "b"])
    back = LabelCalibration.read(tmp_path, ["a", "b"])
    assert back is not None
    np.testing.assert_allclose(back.apply(overconfident), calibration.apply(overconfident))
    with pytest.raises(ValueError, match="other labels"):
        LabelCalibration.read(tmp_path, ["a", "c"])


def test_expected_risk_reads_the_calibrated_probabilities_with_the_same_predicted_set() -> None:
    mean = np.array([[0.7, 0.2, 0.1]])
    sure = expected_risk(mean, THRESHOLDS, np.array([[1.0, 0.0, 0.0]]))
    assert sure[0] == pytest.approx(0.0)  # joy certainly true, the rest certainly false
    wrong = expected_risk(mean, THRESHOLDS, np.array([[0.0, 1.0, 0.0]]))
    assert wrong[0] == pytest.approx(1.0)  # the predicted joy is false, anger true
    assert expected_risk(mean, THRESHOLDS)[0] == pytest.approx(
        expected_risk(mean, THRESHOLDS, mean)[0]
    )
