"""Evaluation of a classifier and of its review routing on labelled data.

Classification: per-label precision/recall/F1/support and micro/macro/weighted/samples averages.

Routing (risk-coverage): each post's *risk* is 1 - F1 of its predicted label set against the true
set. A review score sends the top x % of posts to people; the rest are *kept*. A good score routes
the posts the model gets wrong, so the kept posts' F1 rises as x grows and the routed posts' top
label is wrong more often than an average post's. AURC is the mean risk of the kept posts over all
coverages (lower is better).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.inference.uncertainty import McSummary
from worker.routing.policy import SCORE_KINDS, expected_risk
from worker.routing.policy import review_scores as policy_scores
from worker.training.metrics import binarize, classification_report

REVIEW_RATES = (0.05, 0.10, 0.20)


def predicted_sets(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 predictions with the never-empty rule: the top label when nothing passes."""
    pred = binarize(probs, thresholds)
    empty = pred.sum(axis=1) == 0
    pred[empty, np.argmax(probs[empty], axis=1)] = 1
    return pred


def per_post_f1(targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    tp = (targets * predictions).sum(axis=1)
    denominator = targets.sum(axis=1) + predictions.sum(axis=1)
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)


def top_label_wrong(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    top = np.argmax(probs, axis=1)
    return targets[np.arange(len(targets)), top] == 0


def binary_entropy_np(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return -(q * np.log(q) + (1 - q) * np.log1p(-q))


def review_scores(
    mc: McSummary, deterministic: np.ndarray | None, thresholds: np.ndarray
) -> dict[str, np.ndarray]:
    """Candidate review scores (higher: more uncertain). ``det_*`` use one eval pass only: the
    baselines any MC score must beat to earn its cost."""
    scores = {kind: policy_scores(kind, mc, thresholds) for kind in SCORE_KINDS}
    scores["mc_threshold_margin"] = -np.abs(mc.mean - thresholds).min(axis=1)
    if deterministic is not None:
        scores["det_entropy"] = binary_entropy_np(deterministic).sum(axis=1)
        scores["det_threshold_margin"] = -np.abs(deterministic - thresholds).min(axis=1)
        scores["det_expected_risk"] = expected_risk(deterministic, thresholds)
    return scores


@dataclass
class RoutingResult:
    score: str
    aurc: float
    at_rates: dict[str, dict[str, float]]
    coverage: np.ndarray  # for plots: share of posts kept
    kept_f1: np.ndarray  # per-post F1 of the kept posts at each coverage


def risk_coverage(
    score_name: str,
    score: np.ndarray,
    post_f1: np.ndarray,
    wrong_top: np.ndarray,
    rates: tuple[float, ...] = REVIEW_RATES,
) -> RoutingResult:
    n = len(score)
    # most certain first; ties broken by index for reproducibility
    order = np.lexsort((np.arange(n), score))
    kept_f1 = np.cumsum(post_f1[order]) / np.arange(1, n + 1)
    aurc = float(np.mean(1.0 - kept_f1))
    base_error = float(wrong_top.mean())
    at_rates = {}
    for rate in rates:
        k_routed = max(1, round(rate * n))
        kept = order[: n - k_routed]
        routed = order[n - k_routed :]
        routed_error = float(wrong_top[routed].mean())
        at_rates[f"{rate:.0%}"] = {
            "kept_post_f1": float(post_f1[kept].mean()),
            "routed_post_f1": float(post_f1[routed].mean()),
            "routed_top_label_error": routed_error,
            "error_ratio": routed_error / base_error if base_error > 0 else float("nan"),
        }
    coverage = np.arange(1, n + 1) / n
    return RoutingResult(score_name, aurc, at_rates, coverage, kept_f1)


def oracle_routing(post_f1: np.ndarray, wrong_top: np.ndarray) -> RoutingResult:
    """The best any score could do: route the posts with the worst F1 first."""
    return risk_coverage("oracle", -post_f1 + 1e-9 * wrong_top, post_f1, wrong_top)


def evaluate_predictions(
    targets: np.ndarray,
    mc: McSummary,
    thresholds: np.ndarray,
    label_names: list[str],
    deterministic: np.ndarray | None = None,
    extra_scores: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Classification and routing figures; ``extra_scores``: more review scores to rank by (the
    learned score: ``evaluate.py``)."""
    predictions = predicted_sets(mc.mean, thresholds)
    report = classification_report(targets, predictions, label_names)
    post_f1 = per_post_f1(targets, predictions)
    wrong = top_label_wrong(targets, mc.mean)
    scores = review_scores(mc, deterministic, thresholds) | (extra_scores or {})
    routing = {name: risk_coverage(name, score, post_f1, wrong) for name, score in scores.items()}
    routing["oracle"] = oracle_routing(post_f1, wrong)
    report["posts"] = len(targets)
    report["mean_post_f1"] = float(post_f1.mean())
    report["top_label_error"] = float(wrong.mean())
    report["mean_samples_per_post"] = float(mc.n_samples.mean())
    report["routing"] = {name: {"aurc": r.aurc, **r.at_rates} for name, r in routing.items()}
    report["_curves"] = routing
    return report


def markdown_report(report: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| | precision | recall | f1-score | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for avg in ("micro", "macro", "weighted", "samples"):
        r = report[avg]
        lines.append(
            f"| **{avg} avg** | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{r['support']} |"
        )
    for name, r in report["labels"].items():
        lines.append(
            f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{r['support']} |"
        )
    lines += [
        "",
        f"{report['posts']} posts; mean per-post F1 {report['mean_post_f1']:.3f}; top-label "
        f"error {report['top_label_error']:.3f}; {report['mean_samples_per_post']:.1f} MC samples "
        "per post.",
        "",
        "## Review routing (risk = 1 - per-post F1; lower AURC is better)",
        "",
        "| score | AURC | kept F1 @5% | kept F1 @10% | kept F1 @20% | routed top-label error "
        "@10% (x base) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["routing"].items():
        lines.append(
            f"| {name} | {r['aurc']:.4f} | {r['5%']['kept_post_f1']:.4f} | "
            f"{r['10%']['kept_post_f1']:.4f} | {r['20%']['kept_post_f1']:.4f} | "
            f"{r['10%']['routed_top_label_error']:.3f} ({r['10%']['error_ratio']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"
