"""Fit the learned review score (``worker/routing/selector.py``) on labelled posts, honestly.

* the risk each post is fitted to is 1 - the F1 of its predicted label set under thresholds tuned
  on the *other* half of the posts (thresholds tuned on a post flatter its F1);
* the figures are cross-fitted: the posts are cut into ``folds`` parts and each part is scored by a
  model fitted on the others, so no post is scored by a model that saw it;
* the selector a bundle ships is then fitted on every post.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.calibration import OodCalibration, builtin_calibration
from worker.ood.scorer import OodScorer
from worker.routing.calibration import LabelCalibration, logit
from worker.routing.policy import expected_risk
from worker.routing.selector import SELECTOR_FILE, RiskSelector, features
from worker.training.goemotions import LabelledSplit
from worker.training.metrics import tune_thresholds
from worker.training.report import (
    per_post_f1,
    predicted_sets,
    risk_coverage,
    top_label_wrong,
)

ALPHA = 1.0  # ridge penalty on standardised features
PLATT_C = 100.0  # inverse penalty of the per-label Platt scaling (barely regularised)
FOLDS = 5


def cross_fitted_thresholds(targets: np.ndarray, mean: np.ndarray, seed: int = 0) -> np.ndarray:
    """(B, L): each post's thresholds, tuned on the other half of the posts."""
    order = np.random.default_rng(seed).permutation(len(targets))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    out = np.zeros_like(mean, dtype=np.float64)
    for tuned_on, applied_to in (halves, halves[::-1]):
        out[applied_to] = tune_thresholds(targets[tuned_on], mean[tuned_on])
    return out


def honest_risk(targets: np.ndarray, mean: np.ndarray, seed: int = 0) -> np.ndarray:
    """1 - per-post F1 under cross-fitted thresholds."""
    thresholds = cross_fitted_thresholds(targets, mean, seed)
    predicted = (mean >= thresholds).astype(np.int8)
    empty = predicted.sum(axis=1) == 0
    predicted[empty, np.argmax(mean[empty], axis=1)] = 1
    return 1.0 - per_post_f1(targets, predicted)


def fit_selector(x: np.ndarray, risk: np.ndarray, alpha: float = ALPHA) -> RiskSelector:
    scaler = StandardScaler().fit(x)
    scales = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    ridge = Ridge(alpha=alpha).fit((x - scaler.mean_) / scales, risk)
    return RiskSelector(
        means=np.asarray(scaler.mean_, dtype=np.float64),
        scales=np.asarray(scales, dtype=np.float64),
        weights=np.asarray(ridge.coef_, dtype=np.float64),
        intercept=float(ridge.intercept_),
        measured={},
    )


def cross_fitted_scores(
    x: np.ndarray,
    risk: np.ndarray,
    folds: int = FOLDS,
    seed: int = 0,
    fit: Callable[[np.ndarray, np.ndarray], RiskSelector] = fit_selector,
) -> np.ndarray:
    """Each post's predicted risk from a selector fitted on the other folds."""
    scores = np.zeros(len(x))
    for train, held in KFold(folds, shuffle=True, random_state=seed).split(x):
        scores[held] = fit(x[train], risk[train]).predict(x[held])
    return scores


def predicted_risk_targets(
    targets: np.ndarray, mean: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """1 - per-post F1 under fixed ``thresholds`` (posts they were not tuned on)."""
    return 1.0 - per_post_f1(targets, predicted_sets(mean, thresholds))


def fit_label_calibration(targets: np.ndarray, mean: np.ndarray) -> LabelCalibration:
    """Platt scaling per label on the logits of the MC means (``routing/calibration.py``)."""
    x = logit(mean)
    slopes, intercepts = np.ones(mean.shape[1]), np.zeros(mean.shape[1])
    for j in range(mean.shape[1]):
        y = targets[:, j]
        if 0 < y.sum() < len(y):  # a label with one class only keeps the identity
            model = LogisticRegression(C=PLATT_C).fit(x[:, j : j + 1], y)
            slopes[j], intercepts[j] = float(model.coef_[0, 0]), float(model.intercept_[0])
    return LabelCalibration(slopes, intercepts, measured={})


def cross_fitted_calibration(
    targets: np.ndarray, mean: np.ndarray, folds: int = FOLDS, seed: int = 0
) -> np.ndarray:
    """(B, L) calibrated means, each post's from a calibration fitted on the other folds."""
    out = np.zeros_like(mean, dtype=np.float64)
    for train, held in KFold(folds, shuffle=True, random_state=seed).split(mean):
        out[held] = fit_label_calibration(targets[train], mean[train]).apply(mean[held])
    return out


def calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over every (post, label) pair, equal-width bins."""
    p, y = probabilities.ravel(), targets.ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(float(p[inside].mean()) - float(y[inside].mean()))
    return total / len(p)


def routing_figures(score: np.ndarray, risk: np.ndarray, wrong: np.ndarray) -> dict[str, float]:
    result = risk_coverage("score", score, 1.0 - risk, wrong)
    at10 = result.at_rates["10%"]
    return {
        "aurc": round(result.aurc, 4),
        "kept_post_f1_at_10": round(at10["kept_post_f1"], 4),
        "routed_top_label_error_ratio_at_10": round(at10["error_ratio"], 3),
    }


@dataclasses.dataclass
class Routing:
    """What a bundle ships for routing, with the cross-fitted dev figures that chose it."""

    calibration: LabelCalibration
    selector: RiskSelector | None  # None when it did not beat the calibrated expected risk
    measured: dict[str, Any]


def fit_routing(
    classifier: Classifier,
    dev: LabelledSplit,
    mc: McSummary,
    ood: OodCalibration | None,
    seed: int = 0,
) -> Routing:
    """Per-label calibration and the learned score, fitted on every dev post; each kept only
    when its cross-fitted figures (AURC and the kept posts' F1 at a 10 % review rate, risk under
    cross-fitted thresholds) beat what it would replace."""
    thresholds = classifier.thresholds
    risk = honest_risk(dev.targets, mc.mean, seed)
    wrong = top_label_wrong(dev.targets, mc.mean)
    calibrated = cross_fitted_calibration(dev.targets, mc.mean, seed=seed)
    raw_score = expected_risk(mc.mean, thresholds)
    calibrated_score = expected_risk(mc.mean, thresholds, calibrated)
    scorer = OodScorer(ood or builtin_calibration(), classifier.tokenizer, classifier.max_length)
    ids = classifier.tokenize(dev.texts)
    batch = scorer.score(dev.texts, [None] * len(dev), ids, mc.features)
    names = classifier.label_names
    neutral = names.index("neutral") if "neutral" in names else None
    counts = np.array([len(t) for t in ids])
    x = features(mc, thresholds, calibrated_score, counts, batch, neutral)
    learned_score = cross_fitted_scores(x, risk, seed=seed)
    measured: dict[str, Any] = {
        "posts": len(dev),
        "folds": FOLDS,
        "mean_post_f1": round(float(1.0 - risk.mean()), 4),
        "ece_raw": round(calibration_error(mc.mean, dev.targets), 4),
        "ece_calibrated": round(calibration_error(calibrated, dev.targets), 4),
        "expected_risk": routing_figures(raw_score, risk, wrong),
        "expected_risk_calibrated": routing_figures(calibrated_score, risk, wrong),
        "learned": routing_figures(learned_score, risk, wrong),
    }
    calibration = fit_label_calibration(dev.targets, mc.mean)
    calibration = dataclasses.replace(calibration, measured=measured)
    base, learned = measured["expected_risk_calibrated"], measured["learned"]
    keep = (
        learned["aurc"] <= base["aurc"]
        and learned["kept_post_f1_at_10"] >= base["kept_post_f1_at_10"]
    )
    measured["learned_shipped"] = keep
    x_all = features(
        mc,
        thresholds,
        expected_risk(mc.mean, thresholds, calibration.apply(mc.mean)),
        counts,
        batch,
        neutral,
    )
    selector = dataclasses.replace(fit_selector(x_all, risk), measured=measured) if keep else None
    return Routing(calibration, selector, measured)


def write_routing(folder: Path, routing: Routing, labels: list[str]) -> None:
    routing.calibration.write(folder, labels)
    (folder / SELECTOR_FILE).unlink(missing_ok=True)
    if routing.selector is not None:
        routing.selector.write(folder)
