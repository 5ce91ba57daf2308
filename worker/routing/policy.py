"""The review policy: a review score for every post, and the rules that explain a routing.

Scores (higher means more uncertain; the chosen one is published as ``uncertainty.review_score``):

* ``threshold_distance``: 1 / (1 + z) with z = min over labels of |mean - threshold| / std, the
  distance of the closest decision to flipping, in units of its MC standard deviation;
* ``expected_risk``: 1 - E[F1(P, Y)], the expected per-post risk of the predicted label set P when
  the true labels Y are independent Bernoulli(mean) draws. Computed exactly (see
  :func:`expected_risk`); needs only the mean, so it works for deterministic runs too. It is the
  per-post risk that AURC integrates;
* ``mutual_information``: epistemic uncertainty (BALD);
* ``predictive_entropy``: total uncertainty.

Rules (each adds a ``ReviewReason``):

* ``ambiguous_label``: a label's mean lies within ``band_sigmas`` MC standard deviations of its
  threshold (at most 3 such labels are named, closest first);
* ``epistemic``: mutual information above ``epistemic_cut``;
* ``watch_label``: a watch-listed label (e.g. grief, remorse, nervousness, fear for a mental-health
  team) is predicted, or its mean lies within ``watch_band_sigmas`` (default 2 x ``band_sigmas``)
  standard deviations of its threshold, or its mean reaches ``watch_min_probability``. Always
  routed, even when the budget would not route the post;
* ``low_confidence_neutral``: neutral is the only predicted label and its mean is below the cut;
* ``budget``: the review score is in the top share the budget allows (see ``budget.py``);
* ``out_of_distribution``: the post is unlike anything the model was trained on (another language,
  code, log lines, links: ``worker/ood``); the reason names the signal. What follows is
  ``OodSettings.action``: ``review`` routes it past the score budget (like a watch-listed label,
  but under its own per-minute cap, and not counted in the budget: a flood of foreign spam
  neither swamps reviewers nor crowds out the uncertain posts the budget would route; its score
  does not enter the budget's window either, since it ranks nothing for such a post); ``topic``
  sends it to the unsupported topic instead of review (also outside the budget); ``tag`` only
  marks its event and leaves the routing as it would be.

Without a budget (``target_rate`` and ``max_per_minute`` both empty) a post is routed exactly when
a rule fires. With a budget the score decides (watch-listed posts excepted) and the other rules
explain what makes a routed post uncertain.

The policy can also be read from a TOML or YAML file (``ReviewSettings.policy_file``) with the same
field names as the settings (top level or under a ``[review]`` table) plus ``watch_band_sigmas``,
``watch_in_budget`` and ``budget_window``. TOML has no null: write ``"off"`` to disable an optional
cut. Unknown keys are an error.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas import ReviewReason
from worker.inference.uncertainty import STD_FLOOR, McSummary
from worker.ood.scorer import OodBatch
from worker.routing.budget import BudgetDecision, ReviewBudget
from worker.routing.calibration import LabelCalibration
from worker.routing.rate_cap import RateCap
from worker.routing.selector import RiskSelector
from worker.routing.selector import features as selector_features
from worker.settings import OodSettings, ReviewScore, ReviewSettings

MAX_LABEL_REASONS = 3
OOD_PRIORITY = 50  # a post routed as out of distribution: its review score ranks nothing

ScoreKind = ReviewScore
# the scores any summary gives (``learned`` needs the model's selector, ``auto`` picks)
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)[2:]
# scores that mean nothing for a single deterministic pass (no MC spread): published as null then
SCORES_NEEDING_SAMPLES = frozenset({"threshold_distance", "mutual_information"})
OFF_WORDS = frozenset({"off", "none", "null", "no", "false", ""})


class PolicyConfig(BaseModel):
    """Every knob of the review policy: the ``ReviewSettings`` fields, plus those only a policy
    file (or a newer ``ReviewSettings``) sets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: ScoreKind = "auto"
    target_rate: float | None = Field(0.05, ge=0.0, le=1.0)
    max_per_minute: float | None = Field(None, gt=0)
    epistemic_cut: float | None = Field(None, ge=0)
    band_sigmas: float = Field(1.0, ge=0)
    watch_labels: list[str] = Field(default_factory=list)
    watch_min_probability: float | None = Field(0.2, ge=0.0, le=1.0)
    watch_band_sigmas: float | None = Field(None, ge=0)  # None: 2 x band_sigmas
    watch_in_budget: bool = True
    neutral_label: str = "neutral"
    low_confidence_neutral: float | None = Field(None, ge=0.0, le=1.0)
    warmup_posts: int = Field(200, ge=0)
    budget_window: int = Field(5_000, ge=1)

    @field_validator(
        "target_rate",
        "max_per_minute",
        "epistemic_cut",
        "watch_min_probability",
        "watch_band_sigmas",
        "low_confidence_neutral",
        mode="before",
    )
    @classmethod
    def _off(cls, value: object) -> object:
        """``"off"`` (or false) disables an optional cut: TOML cannot write null."""
        if value is False or (isinstance(value, str) and value.strip().lower() in OFF_WORDS):
            return None
        return value

    @field_validator("watch_labels", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def effective_watch_band_sigmas(self) -> float:
        if self.watch_band_sigmas is not None:
            return self.watch_band_sigmas
        return 2.0 * self.band_sigmas


def read_policy_file(path: Path) -> dict[str, Any]:
    """The fields a TOML or YAML policy file sets (top level, or under ``review``)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        if Path(path).suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"review policy {path} cannot be parsed: {exc}") from exc
    if data is None:
        return {}
    if isinstance(data, dict) and isinstance(data.get("review"), dict):
        data = data["review"]
    if not isinstance(data, dict):
        raise ValueError(f"review policy {path} must hold a table of settings")
    return dict(data)


def load_policy(settings: ReviewSettings) -> PolicyConfig:
    """The policy of ``settings`` (a ``ReviewSettings``), overridden by the file it names.

    Fields ``settings`` lacks (older settings) take the defaults of :class:`PolicyConfig`.
    """
    values = {
        name: getattr(settings, name)
        for name in PolicyConfig.model_fields
        if hasattr(settings, name)
    }
    path = getattr(settings, "policy_file", None)
    if path is None:
        return PolicyConfig.model_validate(values)
    data = read_policy_file(Path(path))
    unknown = sorted(set(data) - set(PolicyConfig.model_fields))
    if unknown:
        raise ValueError(
            f"review policy {path}: unknown setting(s) {unknown}; known: "
            f"{sorted(PolicyConfig.model_fields)}"
        )
    try:
        return PolicyConfig.model_validate(values | data)
    except ValidationError as exc:
        raise ValueError(f"review policy {path}: {exc}") from exc


@dataclass
class ReviewDecision:
    score: float
    reasons: list[ReviewReason]
    routed: bool
    priority: int
    ood: str | None = None  # a flagged post's outcome: review, capped, tag or topic


def predicted_mask(mean: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(B, L) labels at or above their threshold; a post with none gets its most probable label
    (``router.predicted_label_lists`` orders them)."""
    predicted = mean >= thresholds
    none = ~predicted.any(axis=1)
    if none.any():
        rows = np.flatnonzero(none)
        predicted[rows, np.argmax(mean[rows], axis=1)] = True
    return predicted


def poisson_binomial(
    probs: np.ndarray, include: np.ndarray, max_count: int | None = None
) -> np.ndarray:
    """(B, max_count + 1): per post, the distribution of how many of the ``include``-d labels
    (B, L) are on, each on independently with its probability in ``probs`` (B, L). By default
    ``max_count`` = L; a smaller one must be at least the most labels any post includes (the
    counts above it then have probability 0, and leaving them out is exact)."""
    n_posts, n_labels = probs.shape
    pmf = np.zeros((n_posts, (n_labels if max_count is None else max_count) + 1))
    pmf[:, 0] = 1.0
    q_all = np.where(include, probs, 0.0)
    for j in np.flatnonzero(include.any(axis=0)):  # a label no post includes changes nothing
        q = q_all[:, j, None]
        moved = pmf[:, :-1] * q
        pmf *= 1.0 - q
        pmf[:, 1:] += moved
    return pmf


def expected_risk(
    mean: np.ndarray, thresholds: np.ndarray, probabilities: np.ndarray | None = None
) -> np.ndarray:
    """Per post, 1 - E[F1(P, Y)] with P the predicted set (from ``mean`` and ``thresholds``) and
    Y_l ~ Bernoulli(q_l) independent, q = ``probabilities`` (calibrated means: ``calibration.py``)
    or ``mean`` itself.

    F1(P, Y) = 2 |P & Y| / (|P| + |Y|); P is never empty, so the ratio is always defined. With
    A = |P & Y| and C = |Y - P| (independent Poisson-binomial counts over the labels in and out of
    P, k = |P|):

        E[F1] = sum_a sum_c P(A = a) P(C = c) 2a / (k + a + c)

    Exact, deterministic (a post's score does not depend on its batch) and O(B L^2).
    """
    m = np.clip(np.asarray(mean, dtype=np.float64), 0.0, 1.0)
    if m.size == 0:
        return np.zeros(len(m))
    predicted = predicted_mask(m, np.asarray(thresholds, dtype=np.float64))
    p = m if probabilities is None else np.clip(np.asarray(probabilities, np.float64), 0.0, 1.0)
    k = predicted.sum(axis=1)
    in_p = poisson_binomial(p, predicted, max_count=int(k.max()))  # A <= k: exact
    out_p = poisson_binomial(p, ~predicted)  # C
    k = k.astype(np.float64)
    a = np.arange(in_p.shape[1], dtype=np.float64)[:, None]
    c = np.arange(out_p.shape[1], dtype=np.float64)[None, :]
    f1 = 2.0 * a / (k[:, None, None] + a + c)  # (B, A, C)
    expected_f1 = np.einsum("ba,bc,bac->b", in_p, out_p, f1)
    return np.asarray(np.clip(1.0 - expected_f1, 0.0, 1.0))


def review_scores(
    kind: str,
    summary: McSummary,
    thresholds: np.ndarray,
    calibration: LabelCalibration | None = None,
) -> np.ndarray:
    """Per post, the review score ``kind`` (higher: more uncertain); ``calibration``: the
    expected risk reads the calibrated means."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if kind == "threshold_distance":
        z = np.abs(summary.mean - thresholds) / np.maximum(summary.std, STD_FLOOR)
        return np.asarray(1.0 / (1.0 + z.min(axis=1)))
    if kind == "expected_risk":
        calibrated = None if calibration is None else calibration.apply(summary.mean)
        return expected_risk(summary.mean, thresholds, calibrated)
    if kind == "mutual_information":
        return np.asarray(summary.mutual_information, dtype=np.float64)
    if kind == "predictive_entropy":
        return np.asarray(summary.predictive_entropy, dtype=np.float64)
    raise ValueError(f"unknown review score {kind!r}; known: {list(SCORE_KINDS)}")


def _round(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


class ReviewPolicy:
    def __init__(
        self,
        settings: ReviewSettings,
        label_names: list[str],
        thresholds: np.ndarray,
        budget: ReviewBudget | None = None,
        ood: OodSettings | None = None,
        ood_cap: RateCap | None = None,
        selector: RiskSelector | None = None,
        calibration: LabelCalibration | None = None,
    ) -> None:
        self.settings = settings
        self.selector = selector
        self.calibration = calibration
        self.ood_settings = ood or OodSettings()
        self.ood_cap = ood_cap or RateCap(self.ood_settings.max_per_minute)
        self.config = config = load_policy(settings)
        self.label_names = list(label_names)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.shape != (len(self.label_names),):
            raise ValueError(
                f"{len(self.label_names)} labels but thresholds of shape {self.thresholds.shape}"
            )
        if config.score == "learned" and selector is None:
            raise ValueError(
                "review score 'learned' needs a model whose bundle carries a selector "
                "(selector.json: emoworker bundle combine, emoworker train); use auto or "
                "expected_risk"
            )
        unknown = sorted(set(config.watch_labels) - set(self.label_names))
        if unknown:
            raise ValueError(
                f"watch-listed labels the model does not have: {unknown}; the model's labels: "
                f"{self.label_names}"
            )
        self.watch = [self.label_names.index(n) for n in dict.fromkeys(config.watch_labels)]
        self.neutral = (
            self.label_names.index(config.neutral_label)
            if config.neutral_label in self.label_names
            else None
        )
        if config.low_confidence_neutral is not None and self.neutral is None:
            raise ValueError(
                f"low_confidence_neutral is set but the model has no {config.neutral_label!r} "
                "label (see neutral_label)"
            )
        self.budget = (
            budget
            if budget is not None
            else ReviewBudget(
                config.target_rate,
                config.max_per_minute,
                window=config.budget_window,
                warmup=config.warmup_posts,
                count_forced=config.watch_in_budget,
            )
        )

    @property
    def score_kind(self) -> str:
        """The score that ranks posts: ``auto`` is the model's learned score when its bundle
        has one (``selector.py``), expected risk otherwise."""
        if self.config.score == "auto":
            return "learned" if self.selector is not None else "expected_risk"
        return self.config.score

    @property
    def score_needs_samples(self) -> bool:
        """Whether the score means nothing for a post with one (deterministic) sample."""
        return self.score_kind in SCORES_NEEDING_SAMPLES

    def scores(
        self,
        summary: McSummary,
        token_counts: list[int] | None = None,
        ood: OodBatch | None = None,
    ) -> np.ndarray:
        if self.score_kind != "learned":
            return review_scores(self.score_kind, summary, self.thresholds, self.calibration)
        assert self.selector is not None
        risk = review_scores("expected_risk", summary, self.thresholds, self.calibration)
        counts = np.ones(len(risk)) if token_counts is None else np.asarray(token_counts)
        x = selector_features(summary, self.thresholds, risk, counts, ood, self.neutral)
        return self.selector.predict(x)

    def _near_threshold(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """Labels (last axis) whose mean is within ``band_sigmas`` std of their threshold."""
        return (std > 0) & (np.abs(mean - self.thresholds) < self.config.band_sigmas * std)

    def _ambiguous(self, mean: np.ndarray, std: np.ndarray) -> list[ReviewReason]:
        band = self.config.band_sigmas
        ambiguous = np.flatnonzero(self._near_threshold(mean, std))
        distance = np.abs(mean[ambiguous] - self.thresholds[ambiguous])
        closest = ambiguous[np.argsort(distance / std[ambiguous], kind="stable")]
        return [
            ReviewReason(
                rule="ambiguous_label",
                label=self.label_names[j],
                value=_round(mean[j]),
                cut=_round(self.thresholds[j]),
                message=(
                    f"{self.label_names[j]}: mean {mean[j]:.3f} is within {band:g} std "
                    f"({std[j]:.3f}) of its threshold {self.thresholds[j]:.3f}"
                ),
            )
            for j in closest[:MAX_LABEL_REASONS]
        ]

    def _watch_clauses(
        self, mean: np.ndarray, std: np.ndarray, sampled: np.ndarray, chosen: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The watch rule, once for the batch check and the per-post reasons: for (B, W) float64
        means and stds of the watch-listed labels, (B, 1) ``sampled`` and (B, W) ``chosen`` (the
        label is predicted), the (B, W) masks of its three clauses in the order they are named:
        predicted, within ``watch_band_sigmas`` std of the threshold, reaching
        ``watch_min_probability``."""
        c = self.config
        distance = np.abs(mean - self.thresholds[self.watch])
        band = sampled & (std > 0) & (distance < c.effective_watch_band_sigmas * std)
        if c.watch_min_probability is None:
            probable = np.zeros_like(band)
        else:
            probable = mean >= c.watch_min_probability
        return chosen, band, probable

    def _watch(
        self, mean: np.ndarray, std: np.ndarray, sampled: bool, predicted: list[int]
    ) -> list[ReviewReason]:
        if not self.watch:
            return []
        c = self.config
        band = c.effective_watch_band_sigmas
        clauses = self._watch_clauses(
            mean[self.watch][None],
            std[self.watch][None],
            np.array([[sampled]]),
            np.array([[j in predicted for j in self.watch]]),
        )
        reasons = []
        for k, j in enumerate(self.watch):
            name, m, t = self.label_names[j], float(mean[j]), float(self.thresholds[j])
            s = float(std[j])
            cut: float | None
            if clauses[0][0, k]:
                cut = t
                how = (
                    f"is predicted (mean {m:.3f} >= threshold {t:.3f})"
                    if m >= t
                    else f"is the top label (mean {m:.3f}, threshold {t:.3f})"
                )
            elif clauses[1][0, k]:
                cut = t
                how = f"at {m:.3f} is within {band:g} std ({s:.3f}) of its threshold {t:.3f}"
            elif c.watch_min_probability is not None and clauses[2][0, k]:
                cut = c.watch_min_probability
                how = f"at {m:.3f} reaches {c.watch_min_probability:g}"
            else:
                continue
            reasons.append(
                ReviewReason(
                    rule="watch_label",
                    label=name,
                    value=_round(m),
                    cut=_round(cut),
                    message=f"watch-listed {name} {how}",
                )
            )
        return reasons

    def watch_rows(self, summary: McSummary, predicted: list[list[int]]) -> list[bool]:
        """Per post, whether a watch-listed label fires: ``_watch_clauses`` for the whole batch,
        on the float64 statistics ``_watch`` gets (``_statistics``)."""
        if not self.watch or not predicted:
            return [False] * len(predicted)
        watch = self.watch
        chosen = np.zeros((len(predicted), len(self.label_names)), dtype=bool)
        rows = np.repeat(np.arange(len(predicted)), [len(labels) for labels in predicted])
        chosen[rows, list(itertools.chain.from_iterable(predicted))] = True
        clauses = self._watch_clauses(
            np.asarray(summary.mean)[:, watch].astype(np.float64),
            np.asarray(summary.std)[:, watch].astype(np.float64),
            (np.asarray(summary.n_samples) > 1)[:, None],
            chosen[:, watch],
        )
        return np.asarray(np.logical_or.reduce(clauses).any(axis=1)).tolist()

    def ambiguous_rows(self, summary: McSummary) -> np.ndarray:
        """(B,) whether a post has a label within ``band_sigmas`` std of its threshold."""
        mean = np.asarray(summary.mean, dtype=np.float64)
        std = np.asarray(summary.std, dtype=np.float64)
        return np.asarray(self._near_threshold(mean, std).any(axis=1))

    def _epistemic_fires(self, summary: McSummary, i: int) -> bool:
        cut = self.config.epistemic_cut
        return cut is not None and float(summary.mutual_information[i]) > cut

    def _neutral_fires(self, mean: np.ndarray, predicted: list[int]) -> bool:
        cut = self.config.low_confidence_neutral
        return (
            cut is not None
            and self.neutral is not None
            and predicted == [self.neutral]
            and mean[self.neutral] < cut
        )

    def rules(
        self,
        summary: McSummary,
        i: int,
        predicted: list[int],
        ambiguous: bool | None = None,
    ) -> list[ReviewReason]:
        """The reasons that apply to post ``i`` (the budget's own reason excepted).
        ``ambiguous=False`` (from ``ambiguous_rows``) skips the search for ambiguous labels."""
        c = self.config
        mean, std = _statistics(summary, i)
        sampled = bool(summary.n_samples[i] > 1)
        reasons: list[ReviewReason] = []
        if sampled:
            if ambiguous is not False:
                reasons += self._ambiguous(mean, std)
            if self._epistemic_fires(summary, i):
                mi = float(summary.mutual_information[i])
                reasons.append(
                    ReviewReason(
                        rule="epistemic",
                        value=_round(mi, 5),
                        cut=c.epistemic_cut,
                        message=f"mutual information {mi:.4f} exceeds {c.epistemic_cut:g}",
                    )
                )
        reasons += self._watch(mean, std, sampled, predicted)
        if self.neutral is not None and self._neutral_fires(mean, predicted):
            reasons.append(
                ReviewReason(
                    rule="low_confidence_neutral",
                    label=self.label_names[self.neutral],
                    value=_round(mean[self.neutral]),
                    cut=c.low_confidence_neutral,
                    message=(
                        f"only neutral predicted, at a low {mean[self.neutral]:.3f} "
                        f"(< {c.low_confidence_neutral:g})"
                    ),
                )
            )
        return reasons

    def forced(
        self,
        summary: McSummary,
        i: int,
        predicted: list[int],
        ambiguous: bool | None = None,
        watched: bool | None = None,
    ) -> bool:
        """Whether post ``i`` is routed whatever its score: a watch-listed label fires, or there
        is no budget and any rule fires. Decided without building the reasons (``rules``), which
        only a routed post needs. ``watched`` (from ``watch_rows``) skips the watch search."""
        mean, std = _statistics(summary, i)
        sampled = bool(summary.n_samples[i] > 1)
        if watched is None:
            watched = bool(self.watch) and bool(self._watch(mean, std, sampled, predicted))
        if watched:
            return True
        if self.budget.enabled:
            return False
        if sampled:
            if ambiguous is None:
                ambiguous = bool(self._near_threshold(mean, std).any())
            if ambiguous or self._epistemic_fires(summary, i):
                return True
        return self._neutral_fires(mean, predicted)

    def decide_all(
        self,
        summary: McSummary,
        predicted: list[list[int]],
        scores: np.ndarray,
        ood: OodBatch | None = None,
    ) -> list[ReviewDecision]:
        """``decide`` for every post of a batch, in order (the budget sees them in order)."""
        ambiguous = self.ambiguous_rows(summary).tolist() if len(predicted) else []
        watched = self.watch_rows(summary, predicted)
        flagged = ood.flagged.tolist() if ood is not None else [False] * len(predicted)
        return [
            self.decide(
                summary,
                i,
                labels,
                float(scores[i]),
                ambiguous=ambiguous[i],
                ood=ood_reason(ood, i) if flagged[i] and ood is not None else None,
                watched=watched[i],
            )
            for i, labels in enumerate(predicted)
        ]

    def _decide_ood(
        self,
        summary: McSummary,
        i: int,
        predicted: list[int],
        score: float,
        ambiguous: bool | None,
        reason: ReviewReason,
    ) -> ReviewDecision:
        """A flagged post under the review or topic action: outside the score budget."""
        if self.ood_settings.action == "topic":
            return ReviewDecision(score, [], routed=False, priority=0, ood="topic")
        if not self.ood_cap.take():
            return ReviewDecision(score, [], routed=False, priority=0, ood="capped")
        reasons = [reason, *self.rules(summary, i, predicted, ambiguous)]
        watched = any(r.rule == "watch_label" for r in reasons)
        priority = 100 if watched else OOD_PRIORITY
        return ReviewDecision(score, reasons, routed=True, priority=priority, ood="review")

    def decide(
        self,
        summary: McSummary,
        i: int,
        predicted: list[int],
        score: float,
        ambiguous: bool | None = None,
        ood: ReviewReason | None = None,
        watched: bool | None = None,
    ) -> ReviewDecision:
        """Route post ``i`` or not; a routed post carries every reason that applies to it.
        ``ood``: the post is flagged out of distribution, for this reason."""
        if ood is not None and self.ood_settings.action != "tag":
            return self._decide_ood(summary, i, predicted, score, ambiguous, ood)
        outcome = None if ood is None else "tag"
        forced = self.forced(summary, i, predicted, ambiguous, watched)
        verdict: BudgetDecision = self.budget.decide(score, forced=forced)
        if not verdict.routed:
            return ReviewDecision(
                score=score, reasons=[], routed=False, priority=verdict.priority, ood=outcome
            )
        reasons = self.rules(summary, i, predicted, ambiguous)
        if ood is not None:
            reasons.insert(0, ood)
        if not forced:
            warming = (
                f"; estimate from the first {self.budget.seen} posts" if verdict.warming_up else ""
            )
            reasons.append(
                ReviewReason(
                    rule="budget",
                    value=_round(score, 5),
                    cut=(
                        _round(verdict.cut, 5)
                        if verdict.cut is not None and np.isfinite(verdict.cut)
                        else None
                    ),
                    message=(
                        f"review score {score:.4f} is in the top {100 * verdict.rate:.3g}% of "
                        f"recent posts (percentile {verdict.priority}{warming})"
                    ),
                )
            )
        # watch-listed posts are the ones a team must never miss: they go to the front
        watched = any(r.rule == "watch_label" for r in reasons)
        return ReviewDecision(
            score=score,
            reasons=reasons,
            routed=True,
            priority=100 if watched else verdict.priority,
            ood=outcome,
        )


def _statistics(summary: McSummary, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Post ``i``'s means and standard deviations in float64, as the batch checks
    (``ambiguous_rows``, ``watch_rows``) compute them: a float32 band would decide a label at
    the band's edge differently from the batch and route a post with no reason."""
    return (
        np.asarray(summary.mean[i], dtype=np.float64),
        np.asarray(summary.std[i], dtype=np.float64),
    )


def ood_reason(batch: OodBatch, i: int) -> ReviewReason:
    """Why post ``i`` of ``batch`` is flagged out of distribution, naming the signal."""
    signal = batch.fired[i] or "language"
    x = float(batch.signals[signal][i])
    value, cut = _round(batch.score[i]), _round(batch.cut)
    if signal == "language":
        verdict = batch.languages[i] if batch.languages is not None else None
        language = verdict.language if verdict is not None else "?"
        how = "declared by the producer" if verdict and verdict.source == "producer" else "detected"
        message = (
            f"unsupported language: {language} ({how}); the model reads "
            f"{', '.join(batch.supported_languages)}"
        )
    elif signal == "density":
        message = (
            f"unfamiliar text: its representation lies far from the training posts' (density "
            f"{x:,.0f}; 99 % of in-distribution posts are below {batch.high(signal):,.0f})"
        )
    elif signal == "tokens_per_word":
        message = (
            f"unfamiliar text: {x:.1f} word pieces per word (99 % of in-distribution posts: "
            f"{batch.high(signal):.1f} or fewer)"
        )
    else:
        message = (
            f"unfamiliar text: {x:.0%} of its word pieces are unknown to the model's vocabulary "
            f"(99 % of in-distribution posts: {batch.high(signal):.0%} or fewer)"
        )
    return ReviewReason(
        rule="out_of_distribution", signal=signal, value=value, cut=cut, message=message
    )
