"""The learned review score: a small linear model that predicts a post's risk (1 - the F1 of its
predicted label set) from what the worker already knows about it.

Features (per post; ``FEATURES`` names them in order): the expected risk, mutual information,
predictive and expected entropy, the largest flip rate, the two largest mean probabilities and
their gap, how many labels are predicted, the neutral label's mean, the largest and the summed MC
standard deviation, the smallest threshold distance in standard deviations and in probability,
the post's length in tokens (log), and the OOD signals (language, word pieces per word, unknown
pieces; 0 when not measured). They are standardised and weighed by ridge regression fitted on
labelled posts (dev for the default bundle: ``worker/training/selector_fit.py``), whose figures
are cross-fitted there: no post is scored by a model that saw it.

Stored in a bundle as ``selector.json`` (plain numbers: the feature names, means, scales,
weights and intercept), so a bundle stays loadable offline and safe: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.inference.uncertainty import STD_FLOOR, McSummary
from worker.ood.scorer import OodBatch

SELECTOR_FILE = "selector.json"
FEATURES = (
    "expected_risk",
    "mutual_information",
    "predictive_entropy",
    "expected_entropy",
    "max_flip_rate",
    "top_probability",
    "second_probability",
    "top_gap",
    "predicted_count",
    "neutral_probability",
    "max_std",
    "sum_std",
    "threshold_z",
    "threshold_margin",
    "log_tokens",
    "ood_language",
    "ood_tokens_per_word",
    "ood_unknown_share",
)


def features(
    summary: McSummary,
    thresholds: np.ndarray,
    risk: np.ndarray,
    token_counts: np.ndarray,
    ood: OodBatch | None,
    neutral: int | None,
) -> np.ndarray:
    """(B, len(FEATURES)); ``risk``: the posts' expected risk (``policy.expected_risk``)."""
    mean = np.asarray(summary.mean, dtype=np.float64)
    std = np.asarray(summary.std, dtype=np.float64)
    n = len(mean)
    ordered = np.sort(mean, axis=1)
    top = ordered[:, -1]
    second = ordered[:, -2] if mean.shape[1] > 1 else np.zeros(n)
    predicted = mean >= thresholds
    count = np.maximum(predicted.sum(axis=1), 1)
    margin = np.abs(mean - thresholds)
    z = margin / np.maximum(std, STD_FLOOR)

    def signal(name: str) -> np.ndarray:
        if ood is None or name not in ood.signals:
            return np.zeros(n)
        return np.nan_to_num(np.asarray(ood.signals[name], dtype=np.float64), nan=0.0)

    return np.column_stack(
        [
            risk,
            summary.mutual_information,
            summary.predictive_entropy,
            summary.expected_entropy,
            np.asarray(summary.flip_rate).max(axis=1),
            top,
            second,
            top - second,
            count,
            mean[:, neutral] if neutral is not None else np.zeros(n),
            std.max(axis=1),
            std.sum(axis=1),
            z.min(axis=1),
            margin.min(axis=1),
            np.log(np.maximum(np.asarray(token_counts, dtype=np.float64), 1.0)),
            signal("language"),
            signal("tokens_per_word"),
            signal("unknown_share"),
        ]
    ).astype(np.float64)


@dataclass(frozen=True)
class RiskSelector:
    """Standardise, then a linear function: predicted risk (higher: route first)."""

    means: np.ndarray
    scales: np.ndarray
    weights: np.ndarray
    intercept: float
    measured: dict[str, Any]

    def __post_init__(self) -> None:
        shapes = {self.means.shape, self.scales.shape, self.weights.shape}
        if shapes != {(len(FEATURES),)}:
            raise ValueError(f"a selector needs {len(FEATURES)} means, scales and weights")

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray((x - self.means) / self.scales @ self.weights + self.intercept)

    def write(self, folder: Path) -> None:
        data = {
            "model": "ridge",
            "target": "1 - per-post F1 of the predicted label set",
            "features": list(FEATURES),
            "means": self.means.tolist(),
            "scales": self.scales.tolist(),
            "weights": self.weights.tolist(),
            "intercept": self.intercept,
            "measured": self.measured,
        }
        (folder / SELECTOR_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> RiskSelector | None:
        path = folder / SELECTOR_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if list(data["features"]) != list(FEATURES):
            raise ValueError(
                f"{path}: a selector over other features ({data['features']}); this worker "
                f"computes {list(FEATURES)}"
            )
        return cls(
            means=np.asarray(data["means"], dtype=np.float64),
            scales=np.asarray(data["scales"], dtype=np.float64),
            weights=np.asarray(data["weights"], dtype=np.float64),
            intercept=float(data["intercept"]),
            measured=dict(data.get("measured", {})),
        )
