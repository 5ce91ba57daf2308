"""Run a classifier over labelled texts with MC Dropout and score it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.inference.engine import EngineConfig, McDropoutEngine, McMode
from worker.inference.loading import Classifier
from worker.inference.precision import Precision
from worker.inference.uncertainty import McSummary
from worker.training.metrics import binarize, macro_f1, split_half_macro_f1, tune_thresholds


def concat_summaries(parts: list[McSummary]) -> McSummary:
    return McSummary.concat(parts)


def predict_texts(
    classifier: Classifier,
    texts: list[str],
    n_samples: int = 30,
    mode: McMode = "full",
    seed: int | None = 0,
    batch_size: int = 256,
    precision: Precision = "auto",
    progress: Callable[[int], Any] | None = None,
    engine_config: EngineConfig | None = None,
) -> McSummary:
    """MC statistics for every text, in order, computed in batches."""
    config = engine_config or EngineConfig(
        n_samples=n_samples, mode=mode, seed=seed, precision=precision
    )
    engine = McDropoutEngine(classifier, config)
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        parts.append(engine.predict(classifier.tokenize(chunk)))
        if progress is not None:
            progress(len(chunk))
    return concat_summaries(parts)


def mc_threshold_metrics(report: dict[str, Any]) -> dict[str, float]:
    """A bundle manifest's figures of the MC means under ``report``'s thresholds
    (``calibration_report``)."""
    return {
        "mc_macro_f1_at_0.5": report["macro_f1_at_0.5"],
        "mc_macro_f1_tuned_on_dev": report["macro_f1_tuned"],
        "mc_macro_f1_split_half": report["macro_f1_split_half"],
    }


def calibration_report(targets: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Thresholds tuned on all of ``probs`` and the figures that go with them.

    ``macro_f1_tuned`` is optimistic (tuned and scored on the same posts);
    ``macro_f1_split_half`` is the honest estimate (tuned on one half, scored on the other).
    """
    thresholds = tune_thresholds(targets, probs)
    honest, half_b, half_a = split_half_macro_f1(targets, probs)
    return {
        "thresholds": thresholds,
        "macro_f1_at_0.5": macro_f1(targets, binarize(probs, 0.5)),
        "macro_f1_tuned": macro_f1(targets, binarize(probs, thresholds)),
        "macro_f1_split_half": honest,
        "macro_f1_half_a": half_a,
        "macro_f1_half_b": half_b,
    }
