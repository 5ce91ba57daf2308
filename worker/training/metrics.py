"""Multi-label metrics and per-label threshold calibration (scikit-learn for reported figures)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)


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


def tune_thresholds(
    targets: np.ndarray, probs: np.ndarray, grid: np.ndarray = THRESHOLD_GRID
) -> np.ndarray:
    """Per label, the threshold in ``grid`` that maximises that label's F1.

    Ties go to the threshold nearest the middle of the tied run, which is steadier on unseen data
    than the first or last of a flat optimum. Labels with no positives keep 0.5.
    """
    f1 = per_label_f1_grid(targets, probs, grid)
    thresholds = np.full(targets.shape[1], 0.5)
    for j in range(targets.shape[1]):
        if targets[:, j].sum() == 0:
            continue
        best = np.flatnonzero(np.isclose(f1[:, j], f1[:, j].max()))
        thresholds[j] = grid[best[len(best) // 2]]
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
