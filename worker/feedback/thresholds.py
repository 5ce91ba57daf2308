"""Per-label decision thresholds recalibrated from reviewers' verdicts (the cheap, continuous part
of the feedback loop; docs/feedback.md).

Verdicts are a biased sample: the policy routes the posts the model is least sure of, so they
crowd around the thresholds, and a few reviewers may decide most of them. Hence four guards, per
label:

1. no change below ``min_verdicts`` verdicts or ``min_positives`` positive ones, or with fewer
   than ``min_reviewers`` distinct reviewers;
2. each reviewer's weight is capped at ``max_reviewer_share`` of the label's verdicts (a reviewer
   who decided more counts for that share only);
3. the F1-optimal threshold on the weighted verdicts is shrunk toward the current one:
   ``t = t0 + n / (n + prior_weight) * (t_opt - t0)``;
4. the move is at most ``max_shift``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

GRID = np.round(np.arange(0.02, 0.99, 0.01), 2)


@dataclass(frozen=True)
class RecalibrationGuards:
    min_verdicts: int = 50
    min_positives: int = 10
    min_reviewers: int = 3
    max_reviewer_share: float = 0.34
    prior_weight: float = 200.0
    max_shift: float = 0.15


@dataclass
class Recalibration:
    thresholds: np.ndarray
    changed: dict[str, tuple[float, float]] = field(default_factory=dict)  # label: (old, new)
    kept: dict[str, str] = field(default_factory=dict)  # label: why unchanged


def reviewer_weights(reviewers: list[str], max_share: float) -> np.ndarray:
    """Per verdict, a weight so that no reviewer holds more than ``max_share`` of the total
    (when enough reviewers share the work for that to be possible)."""
    counts = Counter(reviewers)
    n = len(reviewers)
    cap = max(max_share * n, n / max(len(counts), 1))  # the cap cannot go below an even split
    per = {r: min(1.0, cap / c) for r, c in counts.items()}
    return np.array([per[r] for r in reviewers], dtype=np.float64)


def weighted_f1_grid(
    probabilities: np.ndarray, labels: np.ndarray, weights: np.ndarray, grid: np.ndarray = GRID
) -> np.ndarray:
    """F1 of one label at each threshold of ``grid``, each verdict counted with its weight."""
    predicted = probabilities[None, :] >= grid[:, None]
    positive = labels > 0
    tp = (predicted & positive) @ weights
    fp = (predicted & ~positive) @ weights
    fn = ((~predicted) & positive) @ weights
    return np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), 0.0)


def recalibrate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    reviewers: list[str],
    current: np.ndarray,
    label_names: list[str],
    guards: RecalibrationGuards | None = None,
) -> Recalibration:
    """New thresholds from verdicts: ``probabilities`` (n, L) the model's means for the reviewed
    posts, ``labels`` (n, L) the reviewers' 0/1 labels, ``reviewers`` one id per verdict."""
    g = guards or RecalibrationGuards()
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    out = Recalibration(thresholds=np.asarray(current, dtype=np.float64).copy())
    n = len(reviewers)
    if n < g.min_verdicts:
        out.kept = dict.fromkeys(label_names, f"{n} verdicts (fewer than {g.min_verdicts})")
        return out
    distinct = len(set(reviewers))
    weights = reviewer_weights(reviewers, g.max_reviewer_share)
    for j, name in enumerate(label_names):
        positives = int(labels[:, j].sum())
        if positives < g.min_positives:
            out.kept[name] = f"{positives} positive verdicts (fewer than {g.min_positives})"
            continue
        if distinct < g.min_reviewers:
            out.kept[name] = f"{distinct} reviewers (fewer than {g.min_reviewers})"
            continue
        f1 = weighted_f1_grid(probabilities[:, j], labels[:, j], weights)
        best = np.flatnonzero(np.isclose(f1, f1.max()))
        optimum = float(GRID[best[len(best) // 2]])
        old = float(out.thresholds[j])
        moved = old + n / (n + g.prior_weight) * (optimum - old)
        new = float(np.clip(moved, old - g.max_shift, old + g.max_shift))
        new = round(new, 4)
        if new != old:
            out.thresholds[j] = new
            out.changed[name] = (old, new)
    return out
