"""What a bundle learns from dev beyond its thresholds, fitted in one place for ``emoworker
train``, ``emoworker bundle combine`` and ``emoworker calibrate``:

1. the out-of-distribution signals (``ood_fit.py``: density on the first model's train features,
   references and cut on dev);
2. the routing (``selector_fit.py``: per-label calibration of the MC means, and the learned score
   when it beats the calibrated expected risk, cross-fitted on dev);
3. with ``emoworker calibrate --tune-thresholds``, the thresholds again (``metrics.py``), written
   with the bundle's dev figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.bundle import BUNDLE_FILE, THRESHOLDS_FILE, BundleManifest, is_bundle, write_thresholds
from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.calibration import OodCalibration, write_calibration
from worker.training.evaluation import mc_threshold_metrics
from worker.training.goemotions import LabelledSplit
from worker.training.metrics import SHRINK_POSTS
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


def write_tuned_thresholds(
    folder: Path, labels: list[str], report: dict[str, Any], routing: dict[str, Any]
) -> bool:
    """Thresholds tuned again on dev (``calibration_report``) into ``folder``, and, when it is a
    bundle, the dev figures that go with them into its manifest; False when it is not one."""
    write_thresholds(folder / THRESHOLDS_FILE, labels, report["thresholds"])
    if not is_bundle(folder):
        return False
    manifest = BundleManifest.read(folder)
    manifest.metrics |= {
        "thresholds": f"tuned on dev, shrunk toward one shared threshold ({SHRINK_POSTS:g} posts)",
        **mc_threshold_metrics(report),
        "routing": routing,
    }
    (folder / BUNDLE_FILE).write_text(manifest.to_json(), encoding="utf-8")
    return True
