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


def model_implied_routing(
    mean: np.ndarray,
    thresholds: np.ndarray,
    probabilities: np.ndarray,
    rate: float = 0.10,
    draws: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """How much routing could gain if ``probabilities`` (the calibrated means) were the truth.

    Each draw gives every post a true label set from its probabilities (labels independent, at
    least one label: a GoEmotions post always has one) and scores the predicted sets (``mean``,
    ``thresholds``) against it. Routing by the expected risk under that same distribution is
    then the best any router can do (it maximises the kept posts' expected F1), so its gain at
    ``rate`` is the ceiling this model's probabilities allow; the real gain far below it points
    at the router, near it at the probabilities: a sharper model is the way up. ``oracle``: the
    gain of routing each draw's worst posts first, as the real oracle does."""
    q = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-9, 1.0 - 1e-9)
    predictions = predicted_sets(np.asarray(mean, dtype=np.float64), thresholds)
    p_empty = np.prod(1.0 - q, axis=1)
    # E[F1 | Y non-empty]: F1 is 0 when Y is empty (the predicted set never is)
    expected_f1 = (1.0 - expected_risk(mean, thresholds, q)) / (1.0 - p_empty)
    order = np.lexsort((np.arange(len(q)), -expected_f1))  # highest expected F1 (kept) first
    kept = order[: len(q) - max(1, round(rate * len(q)))]
    rng = np.random.default_rng(seed)
    gains, oracle, f1s = [], [], []
    for _ in range(draws):
        truth = draw_label_sets(rng, q)
        f1 = per_post_f1(truth, predictions)
        gains.append(f1[kept].mean() - f1.mean())
        oracle.append(np.sort(f1)[::-1][: len(kept)].mean() - f1.mean())
        f1s.append(f1.mean())
    return {
        "rate": rate,
        "draws": draws,
        "kept_gain": float(np.mean(gains)),
        "kept_gain_std": float(np.std(gains)),
        "oracle_kept_gain": float(np.mean(oracle)),
        "mean_post_f1": float(np.mean(f1s)),
    }


def draw_label_sets(rng: np.random.Generator, q: np.ndarray, tries: int = 1_000) -> np.ndarray:
    """(B, L) 0/1 label sets, labels independent with probabilities ``q``, redrawn while empty
    (after ``tries`` rounds a post still empty gets its most probable label)."""
    truth = rng.random(q.shape) < q
    empty = np.flatnonzero(~truth.any(axis=1))
    for _ in range(tries):
        if not len(empty):
            break
        truth[empty] = rng.random((len(empty), q.shape[1])) < q[empty]
        empty = empty[~truth[empty].any(axis=1)]
    truth[empty, np.argmax(q[empty], axis=1)] = True
    return truth.astype(np.int8)


def evaluate_predictions(
    targets: np.ndarray,
    mc: McSummary,
    thresholds: np.ndarray,
    label_names: list[str],
    deterministic: np.ndarray | None = None,
    extra_scores: dict[str, np.ndarray] | None = None,
    calibrated: np.ndarray | None = None,
) -> dict[str, Any]:
    """Classification and routing figures; ``extra_scores``: more review scores to rank by (the
    learned score: ``evaluate.py``); ``calibrated``: calibrated means, for the routing ceiling
    they imply (``model_implied_routing``)."""
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
    if calibrated is not None:
        report["model_implied_routing"] = model_implied_routing(mc.mean, thresholds, calibrated)
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
    implied = report.get("model_implied_routing")
    if implied is not None:
        oracle = report["routing"]["oracle"][f"{implied['rate']:.0%}"]["kept_post_f1"]
        lines += [
            "",
            f"If the calibrated probabilities were the truth (labels drawn from them, "
            f"{implied['draws']} draws), the best router would keep "
            f"{implied['kept_gain']:+.4f} ± {implied['kept_gain_std']:.4f} per-post F1 over all "
            f"posts at {implied['rate']:.0%}, and the oracle {implied['oracle_kept_gain']:+.4f}"
            f" (the real oracle: {oracle - report['mean_post_f1']:+.4f}). A real gain near the "
            "first is what these probabilities allow: only a "
            "sharper model raises it.",
        ]
    return "\n".join(lines) + "\n"
