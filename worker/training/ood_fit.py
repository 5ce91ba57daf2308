"""Fit the OOD calibration of a model (``emoworker calibrate``, ``train``, ``bundle combine``).

1. density statistics: one deterministic pass over the training posts collects the middle encoder
   layer's mean-pooled output; class-conditional Gaussians with a shared covariance are fitted
   on it (``worker/ood/density.py``);
2. references: every signal on the in-distribution posts (dev), with the MC settings the worker
   runs (the density's features are MC means there);
3. the cut: the combined score's quantile at 1 - ``false_alarm_rate`` on those posts.

Choosing references and cut on the same posts makes the false-alarm rate exact there; the honest
figure, measured on posts neither saw, is the split-half rate: references and cut from one half of
dev, the rate on the other (both ways, averaged), kept in ``measured``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from worker.inference.engine import EngineConfig, encoder_layers
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.calibration import OodCalibration, Reference, choose_cut
from worker.ood.density import fit_class_gaussians
from worker.ood.scorer import OodBatch, OodScorer
from worker.training.evaluation import predict_texts


def middle_layer(classifier: Classifier) -> int:
    """The encoder layer the density reads: the middle one (3 of MiniLM-L6's 6); 0 when the
    model has no encoder layers torch can reach (ONNX)."""
    layers = encoder_layers(classifier.model)
    return 0 if layers is None else max(1, len(layers) // 2)


def references_and_cut(
    raw: dict[str, np.ndarray], false_alarm_rate: float
) -> tuple[dict[str, Reference], float]:
    references = {name: Reference.of(values) for name, values in raw.items()}
    combined = np.max([references[k].z(v) for k, v in raw.items()], axis=0)
    return references, choose_cut(combined, false_alarm_rate)


def split_half_false_alarms(
    raw: dict[str, np.ndarray], false_alarm_rate: float, seed: int = 0
) -> float:
    """The share flagged of one half of the posts by references and cut from the other half,
    averaged both ways."""
    n = len(next(iter(raw.values())))
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    rates = []
    for fit, held in (halves, halves[::-1]):
        references, cut = references_and_cut({k: v[fit] for k, v in raw.items()}, false_alarm_rate)
        combined = np.max([references[k].z(v[held]) for k, v in raw.items()], axis=0)
        rates.append(float(np.mean(combined > cut)))
    return float(np.mean(rates))


def fit_ood(
    classifier: Classifier,
    train_texts: Sequence[str],
    train_targets: np.ndarray,
    dev_texts: Sequence[str],
    engine: EngineConfig,
    supported_languages: tuple[str, ...] = ("en",),
    false_alarm_rate: float = 0.01,
    dev_summary: McSummary | None = None,
    progress: Callable[[int], Any] | None = None,
) -> OodCalibration:
    """The calibration of ``classifier``; ``dev_summary``: MC statistics of ``dev_texts`` with
    features already computed by ``engine`` (``emoworker train`` has them from its thresholds)."""
    layer = middle_layer(classifier)
    references_only = OodCalibration(
        supported_languages=supported_languages,
        references={"language": Reference(0.0, 1.0)},
        cut=0.0,
        false_alarm_rate=false_alarm_rate,
    )
    density = None
    if layer:
        deterministic = replace(engine, mode="off", feature_layer=layer)
        train = predict_texts(
            classifier, list(train_texts), engine_config=deterministic, progress=progress
        )
        assert train.features is not None
        labels = [np.flatnonzero(row).tolist() for row in train_targets]
        density = fit_class_gaussians(train.features, labels, train_targets.shape[1])
    if dev_summary is None or (layer and dev_summary.features is None):
        dev_summary = predict_texts(
            classifier,
            list(dev_texts),
            engine_config=replace(engine, feature_layer=layer),
            progress=progress,
        )
    raw = raw_signals(classifier, references_only, density, layer, dev_texts, dev_summary)
    references, cut = references_and_cut(raw, false_alarm_rate)
    return OodCalibration(
        supported_languages=supported_languages,
        references=references,
        cut=cut,
        false_alarm_rate=false_alarm_rate,
        layer=layer,
        density=density,
        source="bundle",
        measured={
            "reference_posts": len(dev_texts),
            "density_posts": len(train_texts) if density is not None else 0,
            "mc_mode": engine.mode,
            "n_samples": engine.n_samples,
            "false_alarm_rate_split_half": round(split_half_false_alarms(raw, false_alarm_rate), 4),
        },
    )


def raw_signals(
    classifier: Classifier,
    template: OodCalibration,
    density: Any,
    layer: int,
    texts: Sequence[str],
    summary: McSummary,
) -> dict[str, np.ndarray]:
    """Every signal's raw value on ``texts``, whatever their references."""
    references = {
        name: Reference(0.0, 1.0) for name in ("language", "tokens_per_word", "unknown_share")
    }
    if density is not None:
        references["density"] = Reference(0.0, 1.0)
    every = replace(
        template, references=references, density=density, layer=layer if density is not None else 0
    )
    batch: OodBatch = OodScorer(every, classifier.tokenizer, classifier.max_length).score(
        list(texts), [None] * len(texts), classifier.tokenize(list(texts)), summary.features
    )
    return batch.signals
