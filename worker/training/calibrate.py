"""What a bundle learns from dev beyond its thresholds, fitted in one place for ``emoworker
train``, ``emoworker bundle combine`` and ``emoworker calibrate``:

1. the out-of-distribution signals (``ood_fit.py``: density on the first model's train features,
   references and cut on dev);
2. the routing (``selector_fit.py``: per-label calibration of the MC means, and the learned score
   when it beats the calibrated expected risk, cross-fitted on dev).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.calibration import OodCalibration, write_calibration
from worker.training.goemotions import LabelledSplit
from worker.training.ood_fit import fit_ood
from worker.training.selector_fit import Routing, fit_routing, write_routing


def fit_calibration(
    classifier: Classifier,
    train: LabelledSplit,
    dev: LabelledSplit,
    mc: McSummary,
    engine: EngineConfig,
    languages: tuple[str, ...] = ("en",),
    false_alarm_rate: float = 0.01,
    progress: Callable[[int], Any] | None = None,
) -> tuple[OodCalibration, Routing]:
    """``mc``: the MC statistics of ``dev`` under ``engine``, with the middle layer's features;
    ``classifier.thresholds``: the model's own (the routing is fitted around them)."""
    first_only = dataclasses.replace(classifier, members=[])  # density: the first model's
    ood = fit_ood(
        first_only,
        train.texts,
        train.targets,
        dev.texts,
        engine,
        supported_languages=languages,
        false_alarm_rate=false_alarm_rate,
        dev_summary=mc,
        progress=progress,
    )
    return ood, fit_routing(classifier, dev, mc, ood)


def write_fitted(folder: Path, ood: OodCalibration, routing: Routing, labels: list[str]) -> None:
    write_calibration(folder, ood)
    write_routing(folder, routing, labels)
