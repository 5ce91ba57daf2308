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
from typing import Any

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.calibration import OodCalibration, builtin_calibration
from worker.ood.scorer import OodScorer
from worker.routing.policy import expected_risk
from worker.routing.selector import RiskSelector, features
from worker.training.goemotions import LabelledSplit
from worker.training.metrics import tune_thresholds
from worker.training.report import (
    per_post_f1,
    predicted_sets,
    risk_coverage,
    top_label_wrong,
)

ALPHA = 1.0  # ridge penalty on standardised features
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


def fit_bundle_selector(
    classifier: Classifier,
    dev: LabelledSplit,
    mc: McSummary,
    ood: OodCalibration | None,
    seed: int = 0,
) -> RiskSelector:
    """The selector a bundle ships, fitted on every dev post, with its cross-fitted figures
    against the expected risk (``measured``): AURC and the kept posts' F1 at a 10 % review
    rate, both under cross-fitted thresholds."""
    thresholds = classifier.thresholds
    scorer = OodScorer(ood or builtin_calibration(), classifier.tokenizer, classifier.max_length)
    ids = classifier.tokenize(dev.texts)
    batch = scorer.score(dev.texts, [None] * len(dev), ids, mc.features)
    neutral = (
        classifier.label_names.index("neutral") if "neutral" in classifier.label_names else None
    )
    risk_now = expected_risk(mc.mean, thresholds)
    x = features(mc, thresholds, risk_now, np.array([len(t) for t in ids]), batch, neutral)
    risk = honest_risk(dev.targets, mc.mean, seed)
    crossed = cross_fitted_scores(x, risk, seed=seed)
    wrong = top_label_wrong(dev.targets, mc.mean)
    measured: dict[str, Any] = {"posts": len(dev), "folds": FOLDS, "alpha": ALPHA}
    for name, score in (("learned", crossed), ("expected_risk", risk_now)):
        result = risk_coverage(name, score, 1.0 - risk, wrong)
        at10 = result.at_rates["10%"]
        measured[name] = {
            "aurc": round(result.aurc, 4),
            "kept_post_f1_at_10": round(at10["kept_post_f1"], 4),
            "routed_top_label_error_ratio_at_10": round(at10["error_ratio"], 3),
        }
    measured["mean_post_f1"] = round(float(1.0 - risk.mean()), 4)
    selector = fit_selector(x, risk)
    return dataclasses.replace(selector, measured=measured)
