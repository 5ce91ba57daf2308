"""The OOD part of ``emoworker evaluate --ood FILE ...``: how well each signal, and the combined
score the worker publishes, tells the in-distribution posts (the evaluation's labelled file) from
each OOD file (one post per line, or JSON lines with ``text`` and optionally ``lang``).

Per OOD file and per signal: AUROC (0.5 is chance; higher means the OOD posts score higher) and
the false-alarm rate at 95 % recall (the share of in-distribution posts scoring at least what 95 %
of the OOD posts reach). For the combined score also: the share flagged (what ``ood.action``
routes to review or to the unsupported topic, before the per-minute cap), and the share that
reaches a person at all, flagged or routed by the review budget (its score cut taken as the
in-distribution posts' quantile at 1 - ``review.target_rate``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.scorer import OodBatch, OodScorer
from worker.routing.policy import ReviewPolicy
from worker.settings import WorkerSettings
from worker.training.evaluation import predict_texts

RECALL = 0.95


def read_posts(path: Path) -> tuple[list[str], list[str | None]]:
    """Texts and producer languages of an OOD file: plain lines, or JSON lines of posts."""
    texts: list[str] = []
    langs: list[str | None] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            post = json.loads(line)
            texts.append(str(post["text"]))
            langs.append(post.get("lang"))
        else:
            texts.append(line)
            langs.append(None)
    return texts, langs


def separation(in_dist: np.ndarray, ood: np.ndarray) -> dict[str, float]:
    """AUROC and the false-alarm rate at 95 % recall of ``ood`` against ``in_dist`` (higher
    scores: more out of distribution; NaN, a signal not measured, counts as 0)."""
    scores = np.nan_to_num(np.concatenate([in_dist, ood]), nan=0.0)
    truth = np.concatenate([np.zeros(len(in_dist)), np.ones(len(ood))])
    fpr, tpr, _ = roc_curve(truth, scores)
    return {
        "auroc": round(float(roc_auc_score(truth, scores)), 4),
        "fpr_at_95_recall": round(float(fpr[np.searchsorted(tpr, RECALL)]), 4),
    }


def score_texts(
    classifier: Classifier,
    scorer: OodScorer,
    engine: EngineConfig,
    texts: list[str],
    langs: list[str | None],
    progress: Callable[[int], Any] | None = None,
) -> tuple[OodBatch, McSummary]:
    summary = predict_texts(classifier, texts, engine_config=engine, progress=progress)
    batch = scorer.score(texts, langs, classifier.tokenize(texts), summary.features)
    return batch, summary


def ood_report(
    classifier: Classifier,
    settings: WorkerSettings,
    scorer: OodScorer,
    engine: EngineConfig,
    in_dist: tuple[OodBatch, McSummary, list[int]],
    files: list[Path],
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """The report's ``ood`` section; ``in_dist``: the signals, MC statistics and token counts
    of the evaluation's labelled posts."""
    engine = replace(engine, feature_layer=scorer.feature_layer)
    id_batch, id_summary, id_counts = in_dist
    policy = ReviewPolicy(
        settings.review,
        classifier.label_names,
        classifier.thresholds,
        selector=classifier.selector,
    )
    score_kind = policy.score_kind
    id_review = policy.scores(id_summary, id_counts, id_batch)
    rate = settings.review.target_rate
    review_cut = float(np.quantile(id_review, 1 - rate)) if rate else float("inf")
    sets: dict[str, Any] = {}
    for path in files:
        texts, langs = read_posts(path)
        batch, summary = score_texts(classifier, scorer, engine, texts, langs, progress)
        counts = [len(t) for t in classifier.tokenize(texts)]
        routed = policy.scores(summary, counts, batch) > review_cut
        entry: dict[str, Any] = {
            "posts": len(texts),
            "combined": separation(id_batch.score, batch.score),
            "flagged": round(float(batch.flagged.mean()), 4),
            "flagged_or_routed": round(float((batch.flagged | routed).mean()), 4),
            "routed_by_score_alone": round(float(routed.mean()), 4),
            "signals": {
                name: separation(id_batch.signals[name], values)
                for name, values in batch.signals.items()
            },
        }
        sets[path.stem] = entry
    return {
        "in_distribution_posts": len(id_batch),
        "in_distribution_flagged": round(float(id_batch.flagged.mean()), 4),
        "cut": scorer.cut,
        "calibration": scorer.calibration.source,
        "signals": list(scorer.calibration.signals),
        "supported_languages": list(scorer.supported_languages),
        "action": settings.ood.action,
        "review_score": score_kind,
        "review_target_rate": rate,
        "sets": sets,
    }


def ood_markdown(section: dict[str, Any]) -> str:
    signals = section["signals"]
    lines = [
        "## Out of distribution",
        "",
        f"In-distribution posts: {section['in_distribution_posts']:,}, of which "
        f"{100 * section['in_distribution_flagged']:.1f} % flagged (cut {section['cut']:.3f}, "
        f"{section['calibration']} calibration; supported languages: "
        f"{', '.join(section['supported_languages'])}).",
        "",
        "AUROC of each score against the in-distribution posts (false-alarm rate at 95 % recall "
        "in brackets); flagged: share the worker flags out of distribution; reaches a person: "
        f"flagged or routed by the review budget ({section['review_score']}, top "
        f"{100 * (section['review_target_rate'] or 0):g} % of in-distribution scores).",
        "",
        "| set | posts | combined | " + " | ".join(signals) + " | flagged | reaches a person "
        "| by the score alone |",
        "|---|---:|---:|" + "---:|" * len(signals) + "---:|---:|---:|",
    ]
    for name, entry in section["sets"].items():

        def cell(s: dict[str, float]) -> str:
            return f"{s['auroc']:.3f} ({s['fpr_at_95_recall']:.2f})"

        per_signal = [cell(entry["signals"][s]) if s in entry["signals"] else "" for s in signals]
        lines.append(
            f"| {name} | {entry['posts']:,} | {cell(entry['combined'])} | "
            + " | ".join(per_signal)
            + f" | {100 * entry['flagged']:.1f} % | {100 * entry['flagged_or_routed']:.1f} % "
            f"| {100 * entry['routed_by_score_alone']:.1f} % |"
        )
    return "\n".join(lines) + "\n"
