"""From MC statistics to events: schema-valid enriched events and review requests, predicted
labels, and routing exactly when a policy rule fires (no budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import BaseModel
from support.texts import EXAMPLE_TEXTS

from schemas import (
    CompactEnrichedPost,
    EmotionScore,
    EnrichedPost,
    ModelInfo,
    ReviewRequest,
    SocialPost,
    UncertaintySummary,
)
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary, summarise_samples
from worker.processing import BatchProcessor
from worker.routing.policy import ReviewPolicy, expected_risk
from worker.routing.router import (
    EmotionsEncoder,
    Router,
    ScoreColumnsEncoder,
    predicted_label_lists,
)
from worker.settings import ReviewSettings, WorkerSettings

TEXTS = [
    *EXAMPLE_TEXTS,
    "قلبي مكسور",
    "c'est génial, merci beaucoup",
]
BAND_SIGMAS = 1.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_settings(model_dir: Path, **review: Any) -> WorkerSettings:
    return WorkerSettings.model_validate(
        {
            "model": {"path": str(model_dir), "n_samples": 4, "seed": 3, "device": "cpu"},
            "review": {"target_rate": None, "band_sigmas": BAND_SIGMAS, **review},
            "worker_id": "test-worker",
        }
    )


def make_posts() -> list[SocialPost]:
    posts = []
    for i, text in enumerate(TEXTS):
        document: dict[str, Any] = {"id": f"post-{i}", "text": text}
        if i % 3 == 0:
            document |= {"created_at": "2024-01-02T03:04:05Z", "metadata": {"n": i}}
        if i % 4 == 1:
            document |= {"subreddit": "r/test", "score": i}  # unknown fields pass through
        posts.append(SocialPost.model_validate(document))
    return posts


def make_sources(n: int) -> list[dict[str, Any] | None]:
    sources: list[dict[str, Any] | None] = []
    for i in range(n):
        if i % 3 == 0:
            sources.append({"path": "posts.jsonl", "line": i + 1})
        elif i % 3 == 1:
            sources.append({"topic": "posts", "partition": 1, "offset": 100 + i})
        else:
            sources.append(None)
    return sources


def expected_ambiguous(summary: McSummary, i: int, thresholds: np.ndarray) -> bool:
    """The ambiguous_label rule, by hand: some label within band_sigmas std of its threshold."""
    if summary.n_samples[i] <= 1:
        return False
    distance = np.abs(summary.mean[i] - thresholds)
    std = summary.std[i]
    return bool(((std > 0) & (distance < BAND_SIGMAS * std)).any())


@pytest.fixture(scope="module")
def routed_run(
    test_classifier: Classifier, test_model_dir: Path
) -> tuple[list[SocialPost], McSummary, np.ndarray, list[Any]]:
    """One batch through BatchProcessor, with thresholds chosen so that some posts are ambiguous
    and others are not (and most have no label above its threshold)."""
    settings = make_settings(test_model_dir)
    posts = make_posts()
    probe = BatchProcessor(test_classifier, settings)
    probe_mean = probe.infer(probe.tokenize(posts)).mean
    # one label at post 0's mean (post 0 sits exactly on it), all others far above every mean
    spread = probe_mean.max(axis=0) - probe_mean.min(axis=0)
    label = int(np.argmax(spread))
    thresholds = np.full(len(test_classifier.label_names), 0.95)
    thresholds[label] = probe_mean[0, label]
    original = test_classifier.thresholds
    test_classifier.thresholds = thresholds
    try:
        processor = BatchProcessor(test_classifier, settings)
        # same seed, same batch: the same samples (flip rates now against the new thresholds)
        summary = processor.infer(processor.tokenize(posts))
        np.testing.assert_array_equal(summary.mean, probe_mean)
        routed = processor.process(posts, make_sources(len(posts)))
    finally:
        test_classifier.thresholds = original
    return posts, summary, thresholds, routed


def test_one_event_per_post_in_input_order(routed_run: Any) -> None:
    posts, _, _, routed = routed_run
    assert [r.post_id for r in routed] == [p.id for p in posts]
    assert [r.enriched_event()["id"] for r in routed] == [p.id for p in posts]


def test_enriched_events_are_schema_valid(routed_run: Any, test_classifier: Classifier) -> None:
    posts, _, _, routed = routed_run
    sources = make_sources(len(posts))
    for post, source, r in zip(posts, sources, routed, strict=True):
        event = EnrichedPost.model_validate(r.enriched_event())
        assert EnrichedPost.model_validate_json(r.enriched_bytes()) == event
        assert event.post == post, "the input post, unknown fields included"
        assert event.post.model_extra == post.model_extra
        assert event.worker_id == "test-worker"
        assert event.model.n_samples == 4 and event.model.mc_mode == "full"
        assert event.uncertainty.n_samples == 4
        if source is None:
            assert event.source is None
        else:
            assert event.source is not None
            assert event.source.model_dump(exclude_none=True) == source


def test_review_requests_are_schema_valid_and_match_needs_review(routed_run: Any) -> None:
    _, _, _, routed = routed_run
    reviewed = 0
    for r in routed:
        assert r.enriched_event()["needs_review"] is (r.review is not None)
        assert (r.review_bytes() is None) == (r.review is None)
        if r.review is None:
            assert r.enriched_event()["review_reasons"] == []
            continue
        reviewed += 1
        request = ReviewRequest.model_validate(r.review_event())
        assert ReviewRequest.model_validate_json(r.review_bytes() or b"") == request
        assert request.id == r.post_id
        assert 0 <= request.priority <= 100
        assert request.reasons, "a review request always says why"
        assert r.review_event()["reasons"] == r.enriched_event()["review_reasons"]
        assert r.review_event()["emotions"] == r.enriched_event()["emotions"]
        assert r.review_event()["predicted_labels"] == r.enriched_event()["predicted_labels"]
        assert request.review_score == r.enriched_event()["uncertainty"]["review_score"]
    assert reviewed > 0


def test_event_shapes_written_by_hand_match_the_schemas(routed_run: Any) -> None:
    """The router writes events as dicts and EmotionsEncoder the emotions as JSON text, both by
    hand: their keys must be exactly the models' fields (a field added to or renamed in
    schemas/events.py, or only in the router, fails here; validation alone ignores a key the
    model lacks and fills an optional field the router forgot)."""

    def keys(model: type[BaseModel]) -> set[str]:
        return set(model.model_fields)

    _, _, _, routed = routed_run
    reviews = [r.review for r in routed if r.review is not None]
    assert reviews, "the batch must route some posts"
    events: list[tuple[dict[str, Any], type[BaseModel]]] = [
        *((r.enriched, EnrichedPost) for r in routed),
        *((review, ReviewRequest) for review in reviews),
    ]
    for event, model in events:
        assert set(event) == keys(model), model.__name__
        assert set(event["uncertainty"]) == keys(UncertaintySummary), model.__name__
        assert set(event["model"]) == keys(ModelInfo), model.__name__
        assert isinstance(event["emotions"], orjson.Fragment), "written by EmotionsEncoder"
        emotions = orjson.loads(orjson.dumps(event["emotions"]))
        assert emotions, "one entry per label"
        for entry in emotions:
            assert set(entry) == keys(EmotionScore), model.__name__


def test_emotions_have_one_entry_per_label_in_label_order(
    routed_run: Any, test_classifier: Classifier
) -> None:
    _, summary, thresholds, routed = routed_run
    names = test_classifier.label_names
    for i, r in enumerate(routed):
        emotions = r.enriched_event()["emotions"]
        assert [e["label"] for e in emotions] == names
        for j, e in enumerate(emotions):
            assert e["probability"] == pytest.approx(summary.mean[i, j], abs=1e-6)
            assert e["uncertainty"] == pytest.approx(summary.std[i, j], abs=1e-6)
            assert e["threshold"] == pytest.approx(thresholds[j], abs=1e-4)
            assert e["flip_rate"] == pytest.approx(summary.flip_rate[i, j], abs=1e-4)


def test_compact_layout_carries_the_same_values_in_under_half_the_bytes(
    routed_run: Any, test_classifier: Classifier, test_model_dir: Path
) -> None:
    """``event_layout=compact``: the same batch, seed and thresholds as ``routed_run`` give
    events equal to the full layout's but for the score columns, whose values are the full
    layout's to 4 digits; review requests keep the full layout."""
    posts, summary, thresholds, full = routed_run
    settings = make_settings(test_model_dir)
    settings.event_layout = "compact"
    original = test_classifier.thresholds
    test_classifier.thresholds = thresholds
    try:
        compact = BatchProcessor(test_classifier, settings).process(posts, make_sources(len(posts)))
    finally:
        test_classifier.thresholds = original

    def without(event: dict[str, Any], *names: str) -> dict[str, Any]:
        return {k: v for k, v in event.items() if k not in names}

    names = test_classifier.label_names
    reviewed = 0
    for i, (f, c) in enumerate(zip(full, compact, strict=True)):
        raw = c.enriched_event()
        assert set(raw) == set(CompactEnrichedPost.model_fields)
        event = CompactEnrichedPost.model_validate_json(c.enriched_bytes())
        assert event.layout == "compact" and event.scores.labels == names
        assert event.scores.uncertainty is not None and event.scores.flip_rate is not None
        np.testing.assert_allclose(event.scores.probability, summary.mean[i], rtol=0, atol=5.01e-5)
        np.testing.assert_allclose(event.scores.uncertainty, summary.std[i], rtol=0, atol=5.01e-5)
        np.testing.assert_allclose(
            event.scores.flip_rate, summary.flip_rate[i], rtol=0, atol=5.01e-5
        )
        assert without(raw, "layout", "scores", "processed_at") == without(
            f.enriched_event(), "emotions", "processed_at"
        )
        assert len(c.enriched_bytes()) < 0.5 * len(f.enriched_bytes())
        assert (c.review is None) == (f.review is None)
        if c.review is not None:
            reviewed += 1
            request = c.review_event()
            assert request is not None
            ReviewRequest.model_validate(request)
            timed = ("requested_at", "request_id")  # the id holds the time without a source
            assert without(request, *timed) == without(f.review_event() or {}, *timed)
    assert reviewed > 0, "some requests, built in the compact layout's routed-only pass"


def test_predicted_labels_are_the_labels_at_or_above_threshold(
    routed_run: Any, test_classifier: Classifier
) -> None:
    _, summary, thresholds, routed = routed_run
    names = test_classifier.label_names
    fallbacks = 0
    for i, r in enumerate(routed):
        mean = summary.mean[i]
        above = [j for j in range(len(names)) if mean[j] >= thresholds[j]]
        if above:
            expected = [names[j] for j in sorted(above, key=lambda j: -mean[j])]
        else:
            expected = [names[int(np.argmax(mean))]]
            fallbacks += 1
        assert r.enriched_event()["predicted_labels"] == expected
        assert r.enriched_event()["top_label"] == names[int(np.argmax(mean))]
        flagged = [e["label"] for e in r.enriched_event()["emotions"] if e["predicted"]]
        assert sorted(flagged) == sorted(expected)
    assert fallbacks > 0, "the thresholds leave some posts with no label above them"
    assert routed[0].enriched_event()["predicted_labels"] != [], (
        "post 0 sits exactly on a threshold"
    )


def test_without_budget_a_post_is_routed_iff_a_rule_fired(routed_run: Any) -> None:
    _, summary, thresholds, routed = routed_run
    decisions = []
    for i, r in enumerate(routed):
        fired = expected_ambiguous(summary, i, thresholds)
        decisions.append(fired)
        # the French post is flagged out of distribution, which routes it too (ood.action)
        foreign = TEXTS[i].startswith("c'est")
        assert r.enriched_event()["uncertainty"]["ood"]["flagged"] is foreign
        assert r.enriched_event()["needs_review"] is (fired or foreign)
        rules = {reason["rule"] for reason in r.enriched_event()["review_reasons"]}
        expected = ({"ambiguous_label"} if fired else set()) | (
            {"out_of_distribution"} if foreign else set()
        )
        assert rules == expected
    assert decisions[0], "post 0 is exactly on a threshold"
    assert True in decisions and False in decisions, "the batch should have both outcomes"


def test_review_score_is_the_default_expected_risk_score(routed_run: Any) -> None:
    """The default ``auto`` is the expected risk for a model without a selector (the test
    model has none; a bundle's learned score: test_selector.py)."""
    _, summary, thresholds, routed = routed_run
    assert ReviewSettings().score == "auto"
    risk = expected_risk(summary.mean, thresholds)
    for i, r in enumerate(routed):
        assert r.enriched_event()["uncertainty"]["review_score"] == pytest.approx(risk[i], abs=1e-4)
        assert r.enriched_event()["uncertainty"]["mutual_information"] == pytest.approx(
            summary.mutual_information[i], abs=1e-6
        )


def test_off_mode_events_have_no_sampling_statistics(
    test_classifier: Classifier, test_model_dir: Path
) -> None:
    settings = make_settings(test_model_dir)
    settings.model.mc_mode = "off"
    processor = BatchProcessor(test_classifier, settings)
    routed = processor.process(make_posts()[:4], [None] * 4)
    for r in routed:
        event = EnrichedPost.model_validate(r.enriched_event())
        assert event.model.mc_mode == "off" and event.model.n_samples == 1
        assert event.uncertainty.n_samples == 1
        assert event.uncertainty.mutual_information is None
        # the default score, expected risk, needs no spread: defined for one pass too
        probabilities = np.array([[e.probability for e in event.emotions]])
        risk = expected_risk(probabilities, test_classifier.thresholds)[0]
        assert event.uncertainty.review_score == pytest.approx(risk, abs=1e-3)
        assert all(e.uncertainty is None and e.flip_rate is None for e in event.emotions)
        assert event.uncertainty.predictive_entropy is not None
        assert not event.needs_review, "no samples: the ambiguity rule cannot fire"


@pytest.mark.parametrize("target_rate", [None, 0.05])
def test_watch_labels_are_always_routed(
    test_classifier: Classifier, test_model_dir: Path, target_rate: float | None
) -> None:
    settings = make_settings(
        test_model_dir,
        target_rate=target_rate,
        watch_labels=["nervousness"],
        watch_min_probability=0.0,
    )
    processor = BatchProcessor(test_classifier, settings)
    routed = processor.process(make_posts()[:4], [None] * 4)
    for r in routed:
        assert r.review is not None
        request = ReviewRequest.model_validate(r.review_event())
        watch = [reason for reason in request.reasons if reason.rule == "watch_label"]
        assert len(watch) == 1 and watch[0].label == "nervousness"


# -- hand-built statistics ------------------------------------------------------------------------

LABELS = ["joy", "anger", "neutral"]
THRESHOLDS = np.array([0.5, 0.4, 0.6])


def hand_router(**review: Any) -> Router:
    settings = ReviewSettings.model_validate(
        {"target_rate": None, "band_sigmas": BAND_SIGMAS} | review
    )
    policy = ReviewPolicy(settings, LABELS, THRESHOLDS)
    model_info = {"name": "hand", "revision": None, "n_samples": 4, "mc_mode": "full"}
    return Router(policy, LABELS, THRESHOLDS, model_info, "w1")


def hand_summary() -> McSummary:
    """4 samples of 4 posts: (S, B, L)."""
    samples = np.array(
        [
            # post 0: joy and anger clearly above, joy the larger; neutral clearly below
            [[0.90, 0.70, 0.10]] * 4,
            # post 1: nothing reaches its threshold; anger is the most probable
            [[0.10, 0.30, 0.20]] * 4,
            # post 2: joy straddles its threshold (mean 0.5, std 0.08): ambiguous
            [[0.40, 0.05, 0.05], [0.60, 0.05, 0.05], [0.45, 0.05, 0.05], [0.55, 0.05, 0.05]],
            # post 3: joy above with a small spread, far from the threshold
            [[0.80, 0.05, 0.05], [0.82, 0.05, 0.05], [0.79, 0.05, 0.05], [0.81, 0.05, 0.05]],
        ]
    ).transpose(1, 0, 2)
    return summarise_samples(samples, THRESHOLDS)


def test_predicted_label_lists() -> None:
    mean = np.array(
        [
            [0.9, 0.7, 0.1],
            [0.7, 0.9, 0.1],
            [0.1, 0.3, 0.2],  # nothing above: the most probable label alone
            [0.5, 0.4, 0.6],  # ties with the threshold count: >=
            [0.49, 0.1, 0.95],
        ]
    )
    assert predicted_label_lists(mean, THRESHOLDS) == [[0, 1], [1, 0], [1], [2, 0, 1], [2]]


def test_hand_built_routing() -> None:
    summary = hand_summary()
    posts = [SocialPost(id=f"h{i}", text="x") for i in range(4)]
    routed = hand_router().route(posts, [None] * 4, summary)
    events = [EnrichedPost.model_validate(r.enriched_event()) for r in routed]

    assert events[0].predicted_labels == ["joy", "anger"]
    assert [e.predicted for e in events[0].emotions] == [True, True, False]
    assert events[1].predicted_labels == ["anger"]  # the fallback: below its threshold
    assert [e.predicted for e in events[1].emotions] == [False, True, False]
    assert events[1].top_label == "anger"
    assert events[3].predicted_labels == ["joy"]

    # identical samples: std 0, no rule can fire; post 2 straddles: routed
    assert [e.needs_review for e in events] == [False, False, True, False]
    assert routed[2].review is not None
    request = ReviewRequest.model_validate(routed[2].review_event())
    assert [(r.rule, r.label, r.cut) for r in request.reasons] == [("ambiguous_label", "joy", 0.5)]
    assert request.reasons[0].value == pytest.approx(0.5, abs=1e-4)
    assert events[2].emotions[0].flip_rate == pytest.approx(0.5)


def test_hand_built_low_confidence_neutral_rule() -> None:
    samples = np.array([[[0.1, 0.1, 0.65]] * 2, [[0.1, 0.1, 0.9]] * 2]).transpose(1, 0, 2)
    summary = summarise_samples(samples, THRESHOLDS)
    posts = [SocialPost(id="n0", text="x"), SocialPost(id="n1", text="y")]
    routed = hand_router(low_confidence_neutral=0.7).route(posts, [None, None], summary)
    assert [r.enriched_event()["predicted_labels"] for r in routed] == [["neutral"], ["neutral"]]
    assert [r.enriched_event()["needs_review"] for r in routed] == [True, False]
    assert [x["rule"] for x in routed[0].enriched_event()["review_reasons"]] == [
        "low_confidence_neutral"
    ]


def test_batch_predicted_sets_match_the_per_post_rule() -> None:
    rng = np.random.default_rng(4)
    mean = rng.random((300, 3))
    mean[:50] = np.round(mean[:50], 1)  # ties
    mean[50:60] = 0.05  # nothing above: the most probable label alone
    batch = predicted_label_lists(mean, THRESHOLDS)

    def by_hand(row: np.ndarray) -> list[int]:  # at or above the threshold, most probable first
        above = [j for j in range(len(row)) if row[j] >= THRESHOLDS[j]]
        return sorted(above, key=lambda j: (-row[j], j)) or [int(np.argmax(row))]

    assert batch == [by_hand(row) for row in mean]
    assert predicted_label_lists(np.zeros((0, 3)), THRESHOLDS) == []


@pytest.mark.parametrize(
    "watch",
    [
        {},
        {"watch_labels": ["anger"], "watch_min_probability": None},
        {"watch_labels": ["anger", "joy"], "watch_min_probability": 0.45},
        # below neutral's threshold (0.6): the probability clause alone fires, one-pass posts too
        {"watch_labels": ["neutral"], "watch_min_probability": 0.3, "watch_band_sigmas": 0.5},
    ],
)
def test_decide_all_matches_deciding_post_by_post(watch: dict[str, Any]) -> None:
    """Deciding a batch at once (the ambiguous-label and watch-label checks for all posts in
    numpy) changes nothing: float32 statistics, one-pass posts and fallback labels included."""
    rng = np.random.default_rng(5)
    samples = rng.beta(2, 3, size=(6, 200, 3))  # (S, B, L): wide spread, many ambiguous labels
    summary = summarise_samples(samples, THRESHOLDS)
    summary.mean = summary.mean.astype(np.float32)
    summary.std = summary.std.astype(np.float32)
    summary.n_samples = np.where(np.arange(200) % 7 == 0, 1, summary.n_samples)
    predicted = predicted_label_lists(summary.mean, THRESHOLDS)
    scores = expected_risk(summary.mean, THRESHOLDS)
    policy = hand_router(target_rate=0.2, **watch).policy
    batch = policy.decide_all(summary, predicted, scores)
    one_by_one_policy = hand_router(target_rate=0.2, **watch).policy
    one_by_one = [
        one_by_one_policy.decide(summary, i, predicted[i], float(scores[i])) for i in range(200)
    ]
    ambiguous = hand_router().policy.ambiguous_rows(summary)
    assert 0 < ambiguous.sum() < 200
    watched = policy.watch_rows(summary, predicted)
    assert (0 < sum(watched) < 200) if watch else not any(watched)

    def plain(d: Any) -> tuple[Any, ...]:
        return d.score, d.routed, d.priority, [r.model_dump() for r in d.reasons]

    assert [plain(d) for d in batch] == [plain(d) for d in one_by_one]
    assert sum(d.routed for d in batch) > 0


@pytest.mark.parametrize("rule", ["watch", "ambiguous"])
def test_float32_statistics_at_a_band_edge_decide_as_post_by_post(rule: str) -> None:
    """A label whose distance to its threshold is just under the band in float64 but not in
    float32 (a threshold float32 cannot hold, 0.4): the batch checks and the per-post rules use
    the same float64 arithmetic, so the post is routed exactly when a reason says why."""
    # anger (threshold 0.4): the watch band 2 x 1 std, or the ambiguity band 1.5 std
    anger = (0.23361136, 0.08319432) if rule == "watch" else (0.15321797, 0.16452135)
    mean = np.array([[0.45, anger[0], 0.05]], dtype=np.float32)  # joy: the top label
    std = np.array([[0.001, anger[1], 0.001]], dtype=np.float32)
    summary = McSummary(
        mean=mean,
        std=std,
        n_samples=np.array([30]),
        predictive_entropy=np.zeros(1),
        expected_entropy=np.zeros(1),
        mutual_information=np.zeros(1),
        flip_rate=np.zeros((1, 3)),
    )
    review = (
        {"watch_labels": ["anger"], "watch_min_probability": None}
        if rule == "watch"
        else {"band_sigmas": 1.5}
    )
    predicted = predicted_label_lists(summary.mean, THRESHOLDS)
    scores = np.zeros(1)
    batch = hand_router(**review).policy.decide_all(summary, predicted, scores)
    single = hand_router(**review).policy.decide(summary, 0, predicted[0], 0.0)
    assert (batch[0].routed, batch[0].reasons) == (single.routed, single.reasons)
    assert batch[0].routed == bool(batch[0].reasons), "routed iff a reason says why"


def test_emotions_json_matches_the_values_it_encodes() -> None:
    """The batch-wide JSON text of ``emotions`` parses to exactly the per-label objects: label
    names escaped, rounding, null statistics for deterministic posts, NaN as null, float32."""
    names = ['say "hi"', "ünïcode", "plain"]
    thresholds = np.array([0.25, 0.123456, 0.5])
    encoder = EmotionsEncoder(names, thresholds)
    rng = np.random.default_rng(7)
    mean = rng.random((5, 3)).astype(np.float32)
    mean[3, 1] = np.nan
    std, flips = rng.random((5, 3)) * 0.1, rng.random((5, 3)) * 0.3
    predicted = mean >= thresholds
    sampled = np.array([True, False, True, True, False])
    fragments = encoder.encode(mean, std, flips, predicted, sampled)
    assert len(fragments) == 5
    for i, fragment in enumerate(fragments):
        parsed = orjson.loads(orjson.dumps({"emotions": fragment}))["emotions"]
        expected = [
            {
                "label": names[j],
                "probability": None if np.isnan(mean[i, j]) else round(float(mean[i, j]), 6),
                "uncertainty": round(float(std[i, j]), 6) if sampled[i] else None,
                "threshold": round(float(thresholds[j]), 4),
                "predicted": bool(predicted[i, j]),
                "flip_rate": round(float(flips[i, j]), 4) if sampled[i] else None,
            }
            for j in range(3)
        ]
        assert parsed == expected
    assert encoder.encode(mean[:0], std[:0], flips[:0], predicted[:0], sampled[:0]) == []


def test_score_columns_json_matches_the_values_it_encodes() -> None:
    """The compact layout's batch-wide JSON text parses to exactly the arrays: label names
    escaped, 4 digits, null columns for deterministic posts, NaN as null; one post and one
    label too (the text is cut at array boundaries)."""
    names = ['say "hi"', "ünïcode", "plain"]
    encoder = ScoreColumnsEncoder(names)
    rng = np.random.default_rng(7)
    mean = rng.random((5, 3)).astype(np.float32)
    mean[3, 1] = np.nan
    std, flips = rng.random((5, 3)) * 0.1, rng.random((5, 3)) * 0.3
    sampled = np.array([True, False, True, True, False])
    fragments = encoder.encode(mean, std, flips, sampled)
    assert len(fragments) == 5

    def rounded(row: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else round(float(v), 4) for v in row]

    for i, fragment in enumerate(fragments):
        parsed = orjson.loads(orjson.dumps({"scores": fragment}))["scores"]
        assert parsed == {
            "labels": names,
            "probability": rounded(mean[i]),
            "uncertainty": rounded(std[i]) if sampled[i] else None,
            "flip_rate": rounded(flips[i]) if sampled[i] else None,
        }
    assert encoder.encode(mean[:0], std[:0], flips[:0], sampled[:0]) == []
    one = ScoreColumnsEncoder(["joy"]).encode(
        np.array([[0.5]]), np.array([[0.1]]), np.array([[0.0]]), np.array([True])
    )
    assert orjson.loads(orjson.dumps(one[0])) == {
        "labels": ["joy"],
        "probability": [0.5],
        "uncertainty": [0.1],
        "flip_rate": [0.0],
    }
