"""The review policy: a review score for every post, and the rules that explain a routing.

Scores (higher means more uncertain; the chosen one is published as ``uncertainty.review_score``):

* ``threshold_distance``: 1 / (1 + z) with z = min over labels of |mean - threshold| / std, the
  distance of the closest decision to flipping, in units of its MC standard deviation;
* ``mutual_information``: epistemic uncertainty (BALD);
* ``predictive_entropy``: total uncertainty.

Rules (each adds a ``ReviewReason``):

* ``ambiguous_label``: a label's mean lies within ``band_sigmas`` standard deviations of its
  threshold;
* ``epistemic``: mutual information above ``epistemic_cut``;
* ``watch_label``: a watch-listed label reaches ``watch_min_probability`` (always routed, outside
  the budget: for labels a team must never miss, such as grief or fear);
* ``low_confidence_neutral``: neutral is the only prediction and its probability is low;
* ``budget``: the review score is in the top share the budget allows.

The policy can also be read from a TOML or YAML file with the same field names as the settings.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from schemas import ReviewReason
from worker.inference.uncertainty import STD_FLOOR, McSummary
from worker.routing.budget import BudgetDecision, ReviewBudget
from worker.settings import ReviewSettings

MAX_LABEL_REASONS = 3


def load_review_settings(settings: ReviewSettings) -> ReviewSettings:
    """The settings, overridden by the policy file they name (TOML or YAML)."""
    if settings.policy_file is None:
        return settings
    path = Path(settings.policy_file)
    text = path.read_text(encoding="utf-8")
    data: dict[str, Any] = (
        tomllib.loads(text) if path.suffix.lower() == ".toml" else (yaml.safe_load(text) or {})
    )
    data = data.get("review", data)
    merged = settings.model_dump() | data
    merged["policy_file"] = None
    return ReviewSettings.model_validate(merged)


@dataclass
class ReviewDecision:
    score: float
    reasons: list[ReviewReason]
    routed: bool
    priority: int


def review_scores(kind: str, summary: McSummary, thresholds: np.ndarray) -> np.ndarray:
    if kind == "threshold_distance":
        z = np.abs(summary.mean - thresholds) / np.maximum(summary.std, STD_FLOOR)
        return np.asarray(1.0 / (1.0 + z.min(axis=1)))
    if kind == "mutual_information":
        return np.asarray(summary.mutual_information, dtype=np.float64)
    if kind == "predictive_entropy":
        return np.asarray(summary.predictive_entropy, dtype=np.float64)
    raise ValueError(f"unknown review score {kind!r}")


class ReviewPolicy:
    def __init__(
        self,
        settings: ReviewSettings,
        label_names: list[str],
        thresholds: np.ndarray,
        budget: ReviewBudget | None = None,
    ) -> None:
        self.settings = load_review_settings(settings)
        unknown = sorted(set(self.settings.watch_labels) - set(label_names))
        if unknown:
            raise ValueError(f"watch-listed labels the model does not have: {unknown}")
        self.label_names = label_names
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.watch = [label_names.index(n) for n in self.settings.watch_labels]
        self.neutral = (
            label_names.index(self.settings.neutral_label)
            if self.settings.neutral_label in label_names
            else None
        )
        self.budget = budget or ReviewBudget(
            self.settings.target_rate,
            self.settings.max_per_minute,
            warmup=self.settings.warmup_posts,
        )

    def scores(self, summary: McSummary) -> np.ndarray:
        return review_scores(self.settings.score, summary, self.thresholds)

    def rules(
        self, summary: McSummary, i: int, predicted: list[int], score: float
    ) -> tuple[list[ReviewReason], bool]:
        """Reasons that apply to post ``i``, and whether one of them forces routing."""
        s = self.settings
        mean, std = summary.mean[i], summary.std[i]
        reasons: list[ReviewReason] = []
        forced = False
        if summary.n_samples[i] > 1:
            distance = np.abs(mean - self.thresholds)
            ambiguous = np.flatnonzero((std > 0) & (distance < s.band_sigmas * std))
            for j in ambiguous[np.argsort(distance[ambiguous] / std[ambiguous])][
                :MAX_LABEL_REASONS
            ]:
                reasons.append(
                    ReviewReason(
                        rule="ambiguous_label",
                        label=self.label_names[j],
                        value=round(float(mean[j]), 4),
                        cut=round(float(self.thresholds[j]), 4),
                        message=(
                            f"{self.label_names[j]}: mean {mean[j]:.3f} is within "
                            f"{s.band_sigmas:g} std ({std[j]:.3f}) of its threshold "
                            f"{self.thresholds[j]:.2f}"
                        ),
                    )
                )
            mi = float(summary.mutual_information[i])
            if s.epistemic_cut is not None and mi > s.epistemic_cut:
                reasons.append(
                    ReviewReason(
                        rule="epistemic",
                        value=round(mi, 5),
                        cut=s.epistemic_cut,
                        message=f"mutual information {mi:.4f} exceeds {s.epistemic_cut:g}",
                    )
                )
        for j in self.watch:
            if mean[j] >= s.watch_min_probability:
                forced = True
                reasons.append(
                    ReviewReason(
                        rule="watch_label",
                        label=self.label_names[j],
                        value=round(float(mean[j]), 4),
                        cut=s.watch_min_probability,
                        message=(
                            f"watch-listed {self.label_names[j]} at {mean[j]:.3f} "
                            f"(>= {s.watch_min_probability:g})"
                        ),
                    )
                )
        if (
            s.low_confidence_neutral is not None
            and self.neutral is not None
            and predicted == [self.neutral]
            and mean[self.neutral] < s.low_confidence_neutral
        ):
            reasons.append(
                ReviewReason(
                    rule="low_confidence_neutral",
                    label=self.label_names[self.neutral],
                    value=round(float(mean[self.neutral]), 4),
                    cut=s.low_confidence_neutral,
                    message=(
                        f"only neutral predicted, at a low {mean[self.neutral]:.3f} "
                        f"(< {s.low_confidence_neutral:g})"
                    ),
                )
            )
        if not self.budget.enabled and reasons:
            forced = True  # no budget: every rule routes
        return reasons, forced

    def decide(
        self, summary: McSummary, i: int, predicted: list[int], score: float
    ) -> ReviewDecision:
        reasons, forced = self.rules(summary, i, predicted, score)
        verdict: BudgetDecision = self.budget.decide(score, forced=forced)
        if verdict.routed and not forced:
            reasons.append(
                ReviewReason(
                    rule="budget",
                    value=round(score, 5),
                    cut=None if verdict.cut is None else round(verdict.cut, 5),
                    message=(
                        f"review score {score:.4f} is in the top {100 * verdict.rate:.3g}% of "
                        f"recent posts (percentile {verdict.priority})"
                    ),
                )
            )
        return ReviewDecision(
            score=score,
            reasons=reasons if verdict.routed else [],
            routed=verdict.routed,
            priority=verdict.priority,
        )
