"""``emoworker evaluate``: score a model on labelled posts with MC Dropout and one deterministic
pass; write the metrics, the routing (risk-coverage) report and the plots.

The scoring itself is in ``evaluation.py`` (predictions), ``report.py`` (metrics and routing) and
``plots.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from worker.inference.engine import EngineConfig, engine_precision
from worker.inference.loading import Classifier, load_classifier
from worker.inference.uncertainty import McSummary
from worker.ood.scorer import OodBatch
from worker.processing import ood_scorer
from worker.routing.policy import expected_risk
from worker.routing.selector import features as selector_features
from worker.settings import ModelSettings, WorkerSettings
from worker.training.evaluation import predict_texts
from worker.training.goemotions import LabelledSplit, read_label_names, read_tsv
from worker.training.ood_report import ood_markdown, ood_report
from worker.training.report import evaluate_predictions, markdown_report
from worker.training.selector_fit import (
    cross_fitted_calibration,
    cross_fitted_scores,
    predicted_risk_targets,
)


def load_evaluation(
    model: ModelSettings, data: Path, labels: Path | None = None, limit: int = 0
) -> tuple[Classifier, LabelledSplit]:
    """The classifier and the labelled posts of ``data`` (GoEmotions-format TSV; its first
    ``limit`` posts, 0: all); ``labels`` (a labels.txt) must match the model's."""
    classifier = load_classifier(model)
    names = classifier.label_names
    if labels is not None and read_label_names(labels) != names:
        raise ValueError(f"{labels} does not match the model's labels")
    if not data.is_file():
        raise FileNotFoundError(f"data file {data} does not exist")
    split = read_tsv(data, len(names))
    if limit:
        split = split.subset(list(range(min(limit, len(split)))))
    return classifier, split


def learned_scores(
    classifier: Classifier,
    split: LabelledSplit,
    mc: McSummary,
    token_counts: list[int],
    ood: OodBatch | None,
    calibrated: np.ndarray,
) -> dict[str, np.ndarray]:
    """The scores the bundle's routing files make, two ways each: as the bundle ships them
    (fitted on dev: optimistic when ``split`` is dev, honest elsewhere), and refitted on ``split``
    itself, cross-fitted (each post scored by a fit on the other folds: honest on any data):
    the expected risk from per-label calibrated means, and the learned score. ``calibrated``:
    the means calibrated cross-fitted on ``split`` (``cross_fitted_calibration``)."""
    thresholds = classifier.thresholds
    names = classifier.label_names
    neutral = names.index("neutral") if "neutral" in names else None
    counts = np.asarray(token_counts)
    crossed_risk = expected_risk(mc.mean, thresholds, calibrated)
    x = selector_features(mc, thresholds, crossed_risk, counts, ood, neutral)
    scores = {
        "expected_risk_calibrated_cross_fitted": crossed_risk,
        "learned_cross_fitted": cross_fitted_scores(
            x, predicted_risk_targets(split.targets, mc.mean, thresholds)
        ),
    }
    if classifier.calibration is not None:
        bundle_risk = expected_risk(mc.mean, thresholds, classifier.calibration.apply(mc.mean))
        scores["expected_risk_calibrated_bundle"] = bundle_risk
        if classifier.selector is not None:
            x = selector_features(mc, thresholds, bundle_risk, counts, ood, neutral)
            scores["learned_bundle"] = classifier.selector.predict(x)
    return scores


def run_evaluation(
    classifier: Classifier,
    split: LabelledSplit,
    data: Path,
    output_dir: Path,
    model: ModelSettings,
    *,
    seed: int = 0,
    progress: Callable[[int], Any] | None = None,
    ood_files: list[Path] | None = None,
    settings: WorkerSettings | None = None,
) -> str:
    """Score ``classifier`` on ``split`` (read from ``data``) with ``model.n_samples`` MC samples
    seeded by ``seed`` and with one deterministic pass; write report.json, report.md,
    reliability.png, f1_rejection.png and probability_vs_uncertainty.png into ``output_dir``;
    return the markdown report. ``progress(k)``: k more posts done (each pass counts them once:
    twice the posts in all). ``ood_files``: also the OOD report (``ood_report.py``) of those
    files against ``split``, with the OOD and review settings of ``settings``."""
    from worker.training.plots import (
        probability_uncertainty_scatter,
        rejection_curves,
        reliability_diagram,
    )

    names = classifier.label_names
    n = model.n_samples
    settings = settings or WorkerSettings(model=model)
    scorer = ood_scorer(classifier, settings)  # the worker computes the signals for every post
    engine = EngineConfig(
        n_samples=n,
        mode=model.mc_mode,
        seed=seed,
        precision=model.precision,
        feature_layer=scorer.feature_layer if scorer is not None else 0,
    )
    mc = predict_texts(classifier, split.texts, engine_config=engine, progress=progress)
    det = predict_texts(
        classifier, split.texts, mode="off", precision=model.precision, progress=progress
    )
    ids = classifier.tokenize(split.texts)
    id_batch = scorer.score(split.texts, [None] * len(split), ids, mc.features) if scorer else None
    calibrated = cross_fitted_calibration(split.targets, mc.mean)
    learned = learned_scores(classifier, split, mc, [len(t) for t in ids], id_batch, calibrated)
    report = evaluate_predictions(
        split.targets,
        mc,
        classifier.thresholds,
        names,
        det.mean,
        extra_scores=learned,
        calibrated=calibrated,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    curves = report.pop("_curves")
    report["ece"] = reliability_diagram(split.targets, mc.mean, output_dir / "reliability.png")
    rejection_curves(curves, output_dir / "f1_rejection.png")
    probability_uncertainty_scatter(mc.mean, mc.std, output_dir / "probability_vs_uncertainty.png")
    report["model"] = {
        "name": classifier.name,
        "revision": classifier.revision,
        "n_samples": n,
        "mc_mode": model.mc_mode,
        "precision": engine_precision(
            classifier, EngineConfig(precision=model.precision), model.mc_mode
        ),
    }
    report["data"] = str(data)
    if scorer is not None and id_batch is not None and ood_files:
        report["ood"] = ood_report(
            classifier,
            settings,
            scorer,
            engine,
            (id_batch, mc, [len(t) for t in ids]),
            ood_files,
            progress,
        )
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = markdown_report(report, f"{classifier.name} on {data.name}")
    if "ood" in report:
        markdown += "\n" + ood_markdown(report["ood"])
    (output_dir / "report.md").write_text(markdown)
    return markdown
