"""Multi-label metrics and per-label threshold calibration (scikit-learn for reported figures)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)
SHRINK_POSTS = 100.0  # per-label thresholds shrunk toward one shared threshold (tune_thresholds)


def binarize(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    return (probs >= np.asarray(thresholds, dtype=probs.dtype)).astype(np.int8)


def macro_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
    _, _, f1, _ = precision_recall_fscore_support(
        targets, predictions, average="macro", zero_division=0
    )
    return float(f1)


def per_label_f1_grid(targets: np.ndarray, probs: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """F1 of every label at every threshold in ``grid``: shape (len(grid), n_labels)."""
    positives = targets.sum(axis=0)
    out = np.empty((len(grid), targets.shape[1]), dtype=np.float64)
    for i, t in enumerate(grid):
        pred = probs >= t
        tp = (pred & (targets > 0)).sum(axis=0)
        denominator = pred.sum(axis=0) + positives
        out[i] = np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1), 0.0)
    return out


def _middle_of_best(scores: np.ndarray, grid: np.ndarray) -> float:
    """The grid value at the middle of the run of best ``scores`` (steadier on unseen data than
    the first or last of a flat optimum)."""
    best = np.flatnonzero(np.isclose(scores, scores.max()))
    return float(grid[best[len(best) // 2]])


def shared_threshold(
    targets: np.ndarray, probs: np.ndarray, grid: np.ndarray = THRESHOLD_GRID
) -> float:
    """The one threshold in ``grid`` that, applied to every label, maximises macro-F1 (the mean
    of the labels' F1, a label with no positives and no predictions counting 0, as
    scikit-learn's ``zero_division=0``); 0.5 when there is nothing to go on (no positives)."""
    return _middle_of_best(per_label_f1_grid(targets, probs, grid).mean(axis=1), grid)


def tune_thresholds(
    targets: np.ndarray,
    probs: np.ndarray,
    grid: np.ndarray = THRESHOLD_GRID,
    shrink_posts: float = SHRINK_POSTS,
) -> np.ndarray:
    """Per label, the threshold in ``grid`` that maximises that label's F1, shrunk toward the
    shared threshold (``shared_threshold``) by as much as the label has few positives:

        t[l] = w t_own[l] + (1 - w) t_shared,   w = positives[l] / (positives[l] + shrink_posts)

    A label's own optimum on a few dozen positives is mostly noise (on GoEmotions dev, grief has
    13 and relief 18; two MC draws of the same model moved the tuned thresholds by up to 0.15).
    Measured on two MC draws of the default ensemble over dev (thresholds tuned on 4/5 of dev,
    scored on the other fifth, 5 folds x 20 seeds each), ``shrink_posts`` = 100 against none:
    macro-F1 +0.009 and +0.005 (0.507 -> 0.516, 0.512 -> 0.518), per-post F1 +0.003 and +0.002;
    30, 300 and 1,000 posts or one shared threshold alone did less (docs/review-routing.md).
    ``shrink_posts`` = 0 gives each label its own optimum.

    Ties go to the threshold nearest the middle of the tied run. A label with no positives takes
    the shared threshold (0.5 with ``shrink_posts`` = 0).
    """
    f1 = per_label_f1_grid(targets, probs, grid)
    shared = _middle_of_best(f1.mean(axis=1), grid) if shrink_posts > 0 else 0.5
    positives = targets.sum(axis=0).astype(np.float64)
    thresholds = np.full(targets.shape[1], shared)
    for j in range(targets.shape[1]):
        if positives[j] == 0:
            continue
        own = _middle_of_best(f1[:, j], grid)
        weight = positives[j] / (positives[j] + shrink_posts)
        thresholds[j] = weight * own + (1.0 - weight) * shared
    return thresholds


def split_half_macro_f1(
    targets: np.ndarray, probs: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """Honest macro-F1 on data the thresholds were not tuned on.

    Splits the posts in two halves at random, tunes thresholds on each half and scores the other;
    returns (mean, score on half B, score on half A).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    a, b = order[: len(order) // 2], order[len(order) // 2 :]
    f1_b = macro_f1(targets[b], binarize(probs[b], tune_thresholds(targets[a], probs[a])))
    f1_a = macro_f1(targets[a], binarize(probs[a], tune_thresholds(targets[b], probs[b])))
    return (f1_a + f1_b) / 2, f1_b, f1_a


def classification_report(
    targets: np.ndarray, predictions: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    """Per-label precision/recall/F1/support and micro/macro/weighted/samples averages."""
    p, r, f, s = precision_recall_fscore_support(targets, predictions, zero_division=0)
    report: dict[str, Any] = {
        "labels": {
            name: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, name in enumerate(label_names)
        }
    }
    for average in ("micro", "macro", "weighted", "samples"):
        ap, ar, af, _ = precision_recall_fscore_support(
            targets, predictions, average=average, zero_division=0
        )
        report[average] = {
            "precision": float(ap),
            "recall": float(ar),
            "f1": float(af),
            "support": int(targets.sum()),
        }
    return report
