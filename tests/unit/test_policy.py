"""The review policy on hand-built MC statistics: one test per rule, the policy file, and every
review score against values computed by hand (expected risk against brute-force enumeration)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import EnrichedPost, ReviewReason, ReviewRequest, SocialPost
from worker.inference.uncertainty import STD_FLOOR, McSummary
from worker.routing.budget import ReviewBudget
from worker.routing.policy import (
    MAX_LABEL_REASONS,
    ReviewPolicy,
    expected_risk,
    load_policy,
    review_scores,
)
from worker.routing.router import Router, predicted_label_lists
from worker.settings import ReviewSettings

LABELS = ["joy", "grief", "fear", "anger", "neutral"]
THRESHOLDS = np.array([0.5, 0.3, 0.4, 0.5, 0.6])
JOY, GRIEF, FEAR, ANGER, NEUTRAL = range(5)


class Settings(ReviewSettings):
    """ReviewSettings with the fields the policy reads when they exist (``getattr``) and a free
    score name: the policy must work with and without them."""

    score: str = "threshold_distance"  # type: ignore[assignment]
    watch_min_probability: float | None = 0.2  # type: ignore[assignment]
    watch_band_sigmas: float | None = None
    watch_in_budget: bool = True
    budget_window: int = 5_000


def settings(**review: Any) -> Settings:
    return Settings.model_validate({"target_rate": None, "band_sigmas": 1.0} | review)


def summary(
    mean: list[list[float]] | np.ndarray,
    std: list[list[float]] | np.ndarray | None = None,
    n_samples: int | list[int] = 10,
    mutual_information: list[float] | None = None,
) -> McSummary:
    m = np.asarray(mean, dtype=np.float64)
    s = np.zeros_like(m) if std is None else np.asarray(std, dtype=np.float64)
    b = len(m)
    n = np.broadcast_to(np.asarray(n_samples, dtype=np.int64), (b,)).copy()
    mi = np.zeros(b) if mutual_information is None else np.asarray(mutual_information, float)
    q = np.clip(m, 1e-12, 1 - 1e-12)
    entropy = -(q * np.log(q) + (1 - q) * np.log1p(-q)).sum(axis=1)
    return McSummary(
        mean=m,
        std=s,
        n_samples=n,
        predictive_entropy=entropy,
        expected_entropy=entropy - mi,
        mutual_information=mi,
        flip_rate=np.zeros_like(m),
    )


def decide_all(policy: ReviewPolicy, stats: McSummary) -> list[Any]:
    scores = policy.scores(stats)
    predicted = predicted_label_lists(stats.mean, THRESHOLDS)
    return [policy.decide(stats, i, predicted[i], scores[i]) for i in range(len(stats))]


def rules_of(decision: Any) -> list[str]:
    return [r.rule for r in decision.reasons]


# a post far from every threshold: no rule fires
CALM = [0.9, 0.05, 0.05, 0.1, 0.1]
CALM_STD = [0.01] * 5


# -- ambiguous_label ------------------------------------------------------------------------------


def test_ambiguous_label_names_the_labels_within_the_band_closest_first() -> None:
    mean = [[0.45, 0.29, 0.42, 0.52, 0.60]]
    std = [[0.10, 0.10, 0.01, 0.05, 0.20]]
    # z = |mean - t| / std: joy 0.5, grief 0.1, fear 2.0 (outside), anger 0.4, neutral 0.0
    (decision,) = decide_all(ReviewPolicy(settings(), LABELS, THRESHOLDS), summary(mean, std))
    assert decision.routed
    ambiguous = [r for r in decision.reasons if r.rule == "ambiguous_label"]
    assert len(ambiguous) == MAX_LABEL_REASONS == 3
    assert [r.label for r in ambiguous] == ["neutral", "grief", "anger"]  # then joy: cut off
    assert [r.value for r in ambiguous] == [0.6, 0.29, 0.52]
    assert [r.cut for r in ambiguous] == [0.6, 0.3, 0.5]
    assert all("std" in r.message and r.label in r.message for r in ambiguous)


@pytest.mark.parametrize("band", [0.5, 1.0, 2.0])
def test_ambiguous_label_fires_exactly_within_the_band(band: float) -> None:
    rng = np.random.default_rng(0)
    mean = rng.uniform(0, 1, (300, 5))
    std = rng.uniform(0, 0.2, (300, 5))
    std[::7] = 0.0  # identical samples: never ambiguous
    stats = summary(mean, std)
    policy = ReviewPolicy(settings(band_sigmas=band), LABELS, THRESHOLDS)
    fired = 0
    for i, decision in enumerate(decide_all(policy, stats)):
        distance = np.abs(mean[i] - THRESHOLDS)
        inside = [j for j in range(5) if std[i, j] > 0 and distance[j] < band * std[i, j]]
        inside.sort(key=lambda j: distance[j] / std[i, j])
        named = [r.label for r in decision.reasons if r.rule == "ambiguous_label"]
        assert named == [LABELS[j] for j in inside[:MAX_LABEL_REASONS]]
        assert decision.routed is bool(inside)
        fired += bool(inside)
    assert 0 < fired < 300


def test_ambiguous_label_is_strict_and_needs_samples() -> None:
    mean = [[0.75, 0.05, 0.05, 0.1, 0.1], CALM]
    std = [[0.25, 0.01, 0.01, 0.01, 0.01], CALM_STD]
    policy = ReviewPolicy(settings(), LABELS, THRESHOLDS)
    on_the_edge, _ = decide_all(policy, summary(mean, std))  # |0.75 - 0.5| == 1 x 0.25
    assert not on_the_edge.routed
    one_pass = decide_all(policy, summary([[0.5, 0.05, 0.05, 0.1, 0.1]], [[0.1] * 5], 1))
    assert not one_pass[0].routed, "one deterministic pass: no spread, no ambiguity"


# -- epistemic ------------------------------------------------------------------------------------


def test_epistemic_fires_iff_mutual_information_exceeds_the_cut() -> None:
    mi = [0.0, 0.1, 0.2, 0.2000001, 0.7]
    stats = summary([CALM] * 5, [CALM_STD] * 5, mutual_information=mi)
    decisions = decide_all(ReviewPolicy(settings(epistemic_cut=0.2), LABELS, THRESHOLDS), stats)
    assert [d.routed for d in decisions] == [False, False, False, True, True]
    reason = decisions[4].reasons[0]
    assert (reason.rule, reason.label, reason.value, reason.cut) == ("epistemic", None, 0.7, 0.2)
    assert "0.7" in reason.message and "0.2" in reason.message
    off = decide_all(ReviewPolicy(settings(), LABELS, THRESHOLDS), stats)
    assert not any(d.routed for d in off), "no cut: the rule is off"
    one_pass = summary([CALM], [CALM_STD], 1, mutual_information=[0.7])
    assert not decide_all(ReviewPolicy(settings(epistemic_cut=0.2), LABELS, THRESHOLDS), one_pass)[
        0
    ].routed


# -- watch_label ----------------------------------------------------------------------------------


WATCH_POSTS = [
    # grief predicted (0.35 >= threshold 0.3)
    ([0.9, 0.35, 0.05, 0.1, 0.1], [0.01, 0.01, 0.01, 0.01, 0.01], "predicted", 0.3),
    # grief below its threshold but within 2 std (0.08 < 2 x 0.05), outside 1 std: not ambiguous
    ([0.9, 0.22, 0.05, 0.1, 0.1], [0.01, 0.05, 0.01, 0.01, 0.01], "within", 0.3),
    # grief at the watch probability (0.26 >= 0.25), no spread
    ([0.9, 0.26, 0.05, 0.1, 0.1], [0.01, 0.0, 0.01, 0.01, 0.01], "reaches", 0.25),
    # nothing predicted: grief is the top label, hence the predicted one
    ([0.1, 0.2, 0.05, 0.1, 0.1], [0.01, 0.01, 0.01, 0.01, 0.01], "top label", 0.3),
    # grief far below: nothing
    ([0.9, 0.10, 0.05, 0.1, 0.1], [0.01, 0.05, 0.01, 0.01, 0.01], None, None),
    # grief near its threshold but without a spread (the band needs one), below 0.25: nothing
    ([0.9, 0.22, 0.05, 0.1, 0.1], [0.0] * 5, None, None),
]


@pytest.mark.parametrize("target_rate", [None, 0.0])
def test_watch_label_fires_when_predicted_near_or_probable_and_forces_routing(
    target_rate: float | None,
) -> None:
    """With a target of 0 the budget routes nothing by score: the watch rule still routes."""
    policy = ReviewPolicy(
        settings(watch_labels=["grief"], watch_min_probability=0.25, target_rate=target_rate),
        LABELS,
        THRESHOLDS,
    )
    stats = summary([p[0] for p in WATCH_POSTS], [p[1] for p in WATCH_POSTS])
    for decision, (_, _, how, cut) in zip(decide_all(policy, stats), WATCH_POSTS, strict=True):
        if how is None:
            assert not decision.routed
            assert decision.reasons == []
            continue
        assert decision.routed
        assert rules_of(decision) == ["watch_label"], "forced: no budget reason"
        reason = decision.reasons[0]
        assert reason.label == "grief" and reason.cut == cut
        assert how in reason.message and "grief" in reason.message


def test_watch_band_defaults_to_twice_the_ambiguity_band_and_can_be_set() -> None:
    post = summary([[0.9, 0.15, 0.05, 0.1, 0.1]], [[0.01, 0.05, 0.01, 0.01, 0.01]])  # z = 3
    watch = {"watch_labels": ["grief"], "watch_min_probability": None}
    assert not decide_all(ReviewPolicy(settings(**watch), LABELS, THRESHOLDS), post)[0].routed
    wide = ReviewPolicy(settings(**watch, band_sigmas=1.6), LABELS, THRESHOLDS)  # 3.2 std
    assert wide.config.effective_watch_band_sigmas == pytest.approx(3.2)
    assert rules_of(decide_all(wide, post)[0]) == ["watch_label"]
    explicit = ReviewPolicy(settings(**watch, watch_band_sigmas=3.5), LABELS, THRESHOLDS)
    assert rules_of(decide_all(explicit, post)[0]) == ["watch_label"]


def test_watch_label_overrides_a_budget_that_would_not_route() -> None:
    budget = ReviewBudget(0.05, warmup=0)
    policy = ReviewPolicy(
        settings(watch_labels=["fear", "grief"], target_rate=0.05), LABELS, THRESHOLDS, budget
    )
    assert policy.budget is budget
    calm = summary([CALM] * 400, [CALM_STD] * 400)
    routed = [d.routed for d in decide_all(policy, calm)]
    assert sum(routed) <= 25, "identical calm posts: the budget routes about 5 %"
    scared = summary([[0.9, 0.05, 0.45, 0.1, 0.1]], [CALM_STD])
    (decision,) = decide_all(policy, scared)
    assert decision.routed
    assert [(r.rule, r.label) for r in decision.reasons] == [("watch_label", "fear")]


def test_unknown_watch_label_raises() -> None:
    with pytest.raises(ValueError, match="sadness"):
        ReviewPolicy(settings(watch_labels=["grief", "sadness"]), LABELS, THRESHOLDS)


# -- low_confidence_neutral -----------------------------------------------------------------------


def test_low_confidence_neutral_fires_iff_neutral_alone_and_below_the_cut() -> None:
    posts = [
        [0.1, 0.05, 0.05, 0.1, 0.65],  # neutral alone at 0.65 < 0.7: fires
        [0.1, 0.05, 0.05, 0.1, 0.75],  # neutral alone, confident: no
        [0.6, 0.05, 0.05, 0.1, 0.65],  # neutral with joy: no
        [0.1, 0.05, 0.05, 0.1, 0.45],  # nothing above threshold, neutral the top label: fires
        [0.1, 0.05, 0.05, 0.3, 0.25],  # nothing above threshold, anger the top label: no
    ]
    policy = ReviewPolicy(settings(low_confidence_neutral=0.7), LABELS, THRESHOLDS)
    decisions = decide_all(policy, summary(posts, [CALM_STD] * 5))
    assert [d.routed for d in decisions] == [True, False, False, True, False]
    reason = decisions[0].reasons[0]
    assert (reason.rule, reason.label, reason.value, reason.cut) == (
        "low_confidence_neutral",
        "neutral",
        0.65,
        0.7,
    )
    assert "neutral" in reason.message


def test_low_confidence_neutral_needs_a_neutral_label() -> None:
    with pytest.raises(ValueError, match="neutral"):
        ReviewPolicy(settings(low_confidence_neutral=0.7), LABELS[:4], THRESHOLDS[:4])
    ReviewPolicy(settings(), LABELS[:4], THRESHOLDS[:4])  # off: fine without one


# -- without a budget: routed iff a rule fired ---------------------------------------------------


def test_without_budget_a_post_is_routed_iff_a_rule_fired() -> None:
    rng = np.random.default_rng(1)
    n = 400
    mean = rng.beta(0.6, 1.6, (n, 5))
    std = rng.uniform(0, 0.08, (n, 5))
    mi = rng.exponential(0.05, n)
    stats = summary(mean, std, mutual_information=list(mi))
    policy = ReviewPolicy(
        settings(
            epistemic_cut=0.1,
            watch_labels=["fear"],
            watch_min_probability=0.3,
            low_confidence_neutral=0.8,
        ),
        LABELS,
        THRESHOLDS,
    )
    assert not policy.budget.enabled
    outcomes = set()
    for i, decision in enumerate(decide_all(policy, stats)):
        predicted = predicted_label_lists(mean[i : i + 1], THRESHOLDS)[0]
        distance = np.abs(mean[i] - THRESHOLDS)
        expected = {
            "ambiguous_label": bool((distance < std[i]).any()),
            "epistemic": bool(mi[i] > 0.1),
            "watch_label": FEAR in predicted
            or bool(distance[FEAR] < 2 * std[i, FEAR])
            or bool(mean[i, FEAR] >= 0.3),
            "low_confidence_neutral": predicted == [NEUTRAL] and mean[i, NEUTRAL] < 0.8,
        }
        fired = {rule for rule, on in expected.items() if on}
        assert set(rules_of(decision)) == fired
        assert decision.routed is bool(fired)
        assert 0 <= decision.priority <= 100
        for reason in decision.reasons:
            ReviewReason.model_validate(reason.model_dump())
            assert reason.message
            assert reason.value is not None and reason.cut is not None
            assert (reason.label is None) is (reason.rule == "epistemic")
        outcomes.add(frozenset(fired))
    assert len(outcomes) >= 6, "the stream exercises the rules alone and together"


def test_with_budget_a_routed_post_says_why_and_rules_alone_do_not_route() -> None:
    policy = ReviewPolicy(settings(target_rate=0.1, warmup_posts=0), LABELS, THRESHOLDS)
    rng = np.random.default_rng(2)
    mean = rng.uniform(0, 1, (500, 5))
    std = rng.uniform(0, 0.1, (500, 5))
    decisions = decide_all(policy, summary(mean, std))
    routed = [d for d in decisions if d.routed]
    assert 0.05 * 500 < len(routed) < 0.15 * 500
    for d in routed:
        assert d.reasons[-1].rule == "budget"
        assert d.reasons[-1].value == pytest.approx(d.score, abs=1e-5)
        assert "percentile" in d.reasons[-1].message
    assert all(d.reasons == [] for d in decisions if not d.routed), "unrouted: no reasons"


# -- the policy file ------------------------------------------------------------------------------

TOML_POLICY = """
[review]
score = "expected_risk"
target_rate = "off"
epistemic_cut = 0.15
band_sigmas = 1.5
watch_labels = ["grief", "fear"]
watch_min_probability = 0.2
watch_band_sigmas = 2.5
low_confidence_neutral = 0.7
"""

YAML_POLICY = """
score: expected_risk
target_rate: null
epistemic_cut: 0.15
band_sigmas: 1.5
watch_labels: [grief, fear]
watch_min_probability: 0.2
watch_band_sigmas: 2.5
low_confidence_neutral: 0.7
"""


@pytest.mark.parametrize(("name", "text"), [("policy.toml", TOML_POLICY), ("p.yaml", YAML_POLICY)])
def test_policy_file_overrides_the_settings(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    base = ReviewSettings.model_validate(
        {"policy_file": path, "target_rate": 0.05, "band_sigmas": 0.5, "epistemic_cut": 0.9}
    )
    policy = ReviewPolicy(base, LABELS, THRESHOLDS)
    c = policy.config
    assert c.score == "expected_risk"
    assert c.target_rate is None and not policy.budget.enabled
    assert (c.epistemic_cut, c.band_sigmas, c.watch_band_sigmas) == (0.15, 1.5, 2.5)
    assert c.watch_labels == ["grief", "fear"]
    assert c.low_confidence_neutral == 0.7
    assert c.max_per_minute is None, "what the file does not set comes from the settings"
    # the file's rules are in force
    stats = summary([CALM, CALM], [CALM_STD, CALM_STD], mutual_information=[0.1, 0.2])
    assert [d.routed for d in decide_all(policy, stats)] == [False, True]
    assert np.allclose(policy.scores(stats), expected_risk(stats.mean, THRESHOLDS))


def test_policy_file_at_top_level_and_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat.toml"
    flat.write_text('watch_labels = ["remorse"]\nmax_per_minute = 30\n')
    config = load_policy(ReviewSettings(policy_file=flat))
    assert config.watch_labels == ["remorse"] and config.max_per_minute == 30
    assert config.target_rate == 0.05

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_policy(ReviewSettings(policy_file=empty)) == load_policy(ReviewSettings())

    typo = tmp_path / "typo.toml"
    typo.write_text("epistemic_cutoff = 0.2\n")
    with pytest.raises(ValueError, match="epistemic_cutoff"):
        load_policy(ReviewSettings(policy_file=typo))
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_rate: 3\n")
    with pytest.raises(ValueError, match="target_rate"):
        load_policy(ReviewSettings(policy_file=bad))
    unknown_score = tmp_path / "score.yaml"
    unknown_score.write_text("score: vibes\n")
    with pytest.raises(ValueError, match="score"):
        load_policy(ReviewSettings(policy_file=unknown_score))
    not_a_table = tmp_path / "list.yaml"
    not_a_table.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="table"):
        load_policy(ReviewSettings(policy_file=not_a_table))
    watch = tmp_path / "watch.yaml"
    watch.write_text("watch_labels: grief, worry\n")
    with pytest.raises(ValueError, match="worry"):
        ReviewPolicy(ReviewSettings(policy_file=watch), LABELS, THRESHOLDS)


# -- review scores --------------------------------------------------------------------------------


def brute_force_risk(mean: np.ndarray, thresholds: np.ndarray) -> float:
    """1 - E[F1(P, Y)] by enumerating every label set Y."""
    predicted = set(predicted_label_lists(mean[None, :], thresholds)[0])
    expected_f1 = 0.0
    for bits in itertools.product([0, 1], repeat=len(mean)):
        probability = math.prod(p if b else 1 - p for p, b in zip(mean, bits, strict=True))
        truth = {j for j, b in enumerate(bits) if b}
        f1 = 2 * len(predicted & truth) / (len(predicted) + len(truth))
        expected_f1 += probability * f1
    return 1 - expected_f1


def test_expected_risk_matches_brute_force_on_three_labels() -> None:
    thresholds = np.array([0.5, 0.4, 0.6])
    mean = np.array(
        [
            [0.9, 0.7, 0.1],  # two predicted
            [0.1, 0.3, 0.2],  # none above: the top label (1)
            [0.5, 0.05, 0.05],  # exactly on a threshold
            [0.0, 0.0, 1.0],  # certain and right: risk 0
            [1.0, 0.0, 0.0],
            [0.3, 0.3, 0.3],
        ]
    )
    risk = expected_risk(mean, thresholds)
    expected = [brute_force_risk(row, thresholds) for row in mean]
    np.testing.assert_allclose(risk, expected, atol=1e-12)
    assert risk[3] == 0.0 and risk[4] == 0.0
    # by hand for post 1: P = {1}; F1 = 2 Y1 / (1 + |Y|)
    p0, p1, p2 = 0.1, 0.3, 0.2
    by_hand = p1 * ((1 - p0) * (1 - p2) * 1 + (p0 * (1 - p2) + (1 - p0) * p2) * 2 / 3 + p0 * p2 / 2)
    assert risk[1] == pytest.approx(1 - by_hand, abs=1e-12)


def test_expected_risk_matches_brute_force_and_sampling_on_more_labels() -> None:
    rng = np.random.default_rng(3)
    thresholds = rng.uniform(0.2, 0.6, 8)
    mean = rng.beta(0.5, 1.5, (20, 8))
    expected = [brute_force_risk(row, thresholds) for row in mean]
    np.testing.assert_allclose(expected_risk(mean, thresholds), expected, atol=1e-12)

    # 28 labels: against label sets drawn at random (what the estimate would be by sampling)
    thresholds = rng.uniform(0.1, 0.6, 28)
    mean = rng.beta(0.3, 3.0, (6, 28))
    draws = rng.random((40_000, 6, 28)) < mean
    predicted = np.zeros((6, 28), dtype=bool)
    for i, labels in enumerate(predicted_label_lists(mean, thresholds)):
        predicted[i, labels] = True
    tp = (draws & predicted).sum(axis=2)
    f1 = 2 * tp / (predicted.sum(axis=1) + draws.sum(axis=2))
    np.testing.assert_allclose(expected_risk(mean, thresholds), 1 - f1.mean(axis=0), atol=0.01)


def test_expected_risk_is_a_function_of_the_post_alone() -> None:
    rng = np.random.default_rng(4)
    mean = rng.uniform(0, 1, (50, 5))
    whole = expected_risk(mean, THRESHOLDS)
    alone = np.concatenate([expected_risk(mean[i : i + 1], THRESHOLDS) for i in range(50)])
    np.testing.assert_array_equal(whole, alone)
    assert expected_risk(np.zeros((0, 5)), THRESHOLDS).shape == (0,)


def test_review_scores_of_each_kind() -> None:
    mean = [[0.45, 0.29, 0.42, 0.52, 0.60], CALM, [0.9, 0.05, 0.05, 0.1, 0.1]]
    std = [[0.10, 0.10, 0.01, 0.05, 0.0], CALM_STD, [0.0] * 5]
    stats = summary(mean, std, n_samples=[10, 10, 1], mutual_information=[0.3, 0.1, 0.0])
    # threshold distance: 1 / (1 + min |mean - t| / max(std, floor))
    z0 = min(0.05 / 0.10, 0.01 / 0.10, 0.02 / 0.01, 0.02 / 0.05, 0.0 / STD_FLOOR)
    z1 = min(abs(m - t) / 0.01 for m, t in zip(CALM, THRESHOLDS, strict=True))
    z2 = min(abs(m - t) / STD_FLOOR for m, t in zip(mean[2], THRESHOLDS, strict=True))
    np.testing.assert_allclose(
        review_scores("threshold_distance", stats, THRESHOLDS),
        [1 / (1 + z0), 1 / (1 + z1), 1 / (1 + z2)],
    )
    np.testing.assert_array_equal(
        review_scores("mutual_information", stats, THRESHOLDS), [0.3, 0.1, 0]
    )
    np.testing.assert_array_equal(
        review_scores("predictive_entropy", stats, THRESHOLDS), stats.predictive_entropy
    )
    risk = review_scores("expected_risk", stats, THRESHOLDS)
    np.testing.assert_allclose(risk, [brute_force_risk(np.array(m), THRESHOLDS) for m in mean])
    assert risk[0] > risk[2], "the ambiguous post is riskier than the calm one"
    with pytest.raises(ValueError, match="unknown review score"):
        review_scores("vibes", stats, THRESHOLDS)


@pytest.mark.parametrize(
    ("score", "published"),
    [
        ("threshold_distance", False),
        ("mutual_information", False),
        ("expected_risk", True),
        ("predictive_entropy", True),
    ],
)
def test_deterministic_posts_publish_the_scores_that_need_no_samples(
    score: str, published: bool
) -> None:
    policy = ReviewPolicy(
        settings(score=score, target_rate=0.5, warmup_posts=0), LABELS, THRESHOLDS
    )
    info = {"name": "hand", "revision": None, "n_samples": 1, "mc_mode": "off"}
    router = Router(policy, LABELS, THRESHOLDS, info, "w1")
    posts = [SocialPost(id=f"d{i}", text="x") for i in range(30)]
    rng = np.random.default_rng(5)
    stats = summary(rng.uniform(0, 1, (30, 5)), np.zeros((30, 5)), 1)
    routed = router.route(posts, [None] * 30, stats)
    for r in routed:
        event = EnrichedPost.model_validate(r.enriched_event())
        assert (event.uncertainty.review_score is not None) is published
        if r.review is not None:
            request = ReviewRequest.model_validate(r.review_event())
            if published:
                assert request.review_score == event.uncertainty.review_score
    assert any(r.review is not None for r in routed)
