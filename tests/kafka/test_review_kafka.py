"""Review routing end to end on a real broker: the review topic holds exactly the posts flagged
``needs_review``, every request explains itself, and without a budget the routed posts are exactly
those the policy picks offline from the same MC statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from support.harness import Topics, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.streams import SAMPLE_TEXTS, post_bytes, produce, read_all, values
from support.texts import EXAMPLE_TEXTS

from schemas import EnrichedPost, ReviewRequest, SocialPost
from worker.inference.loading import Classifier
from worker.pipeline import Pipeline
from worker.processing import BatchProcessor

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]

N_POSTS = 200
TEXTS = [*SAMPLE_TEXTS, *EXAMPLE_TEXTS]


def messages() -> list[tuple[bytes | None, bytes | None]]:
    out: list[tuple[bytes | None, bytes | None]] = []
    for i in range(N_POSTS):
        text = TEXTS[i % len(TEXTS)]
        out.append(post_bytes(i, text if i < len(TEXTS) else f"{text} ({i})"))
    return out


def as_posts(batch: list[tuple[bytes | None, bytes | None]]) -> list[SocialPost]:
    return [SocialPost.model_validate(orjson.loads(value or b"")) for _, value in batch]


async def run_pipeline(
    kafka: KafkaCluster, topics: Topics, settings: Any, classifier: Classifier
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pipeline = Pipeline(settings, classifier=classifier)
    async with running(pipeline) as task:
        enriched = values(await read_all(kafka.bootstrap_servers, topics.enriched, expect=N_POSTS))
        reviews = values(await read_all(kafka.bootstrap_servers, topics.review, idle_s=2))
        assert not task.done()
    assert await task == 0
    assert sorted(e["id"] for e in enriched) == sorted(f"post-{i}" for i in range(N_POSTS))
    return enriched, reviews


async def test_review_topic_holds_exactly_the_flagged_posts_with_reasons(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    await make_topics(kafka, topics, partitions=2)
    await produce(kafka.bootstrap_servers, topics.input, messages())
    review = {
        "target_rate": 0.1,
        "warmup_posts": 20,
        "epistemic_cut": 0.08,
        "watch_labels": ["fear", "remorse"],
        "watch_min_probability": 0.45,
        "low_confidence_neutral": 0.6,
    }
    configured = {"ambiguous_label", "epistemic", "watch_label", "low_confidence_neutral", "budget"}
    settings = make_settings(review=review)
    enriched, reviews = await run_pipeline(kafka, topics, settings, test_classifier)

    by_id = {e["id"]: e for e in enriched}
    flagged = {e["id"] for e in enriched if e["needs_review"]}
    assert 0 < len(flagged) < N_POSTS
    assert len(reviews) == len(flagged), "one review request per flagged post"
    assert {r["id"] for r in reviews} == flagged
    for event in enriched:
        EnrichedPost.model_validate(event)
        assert event["uncertainty"]["review_score"] is not None
        assert bool(event["review_reasons"]) is event["needs_review"]
    budget_routed = 0
    for raw in reviews:
        request = ReviewRequest.model_validate(raw)
        event = by_id[request.id]
        assert request.reasons, "a review request always says why"
        assert {r.rule for r in request.reasons} <= configured
        assert all(r.message for r in request.reasons)
        assert 0 <= request.priority <= 100
        assert request.review_score == event["uncertainty"]["review_score"]
        assert raw["reasons"] == event["review_reasons"]
        budget_routed += any(r.rule == "budget" for r in request.reasons)
    assert budget_routed > 0, "the budget routes from the first batches on"
    assert budget_routed <= 0.2 * N_POSTS, "and keeps near its 10 % target"


async def test_without_budget_routing_equals_the_offline_policy(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    """One partition, one batch (batch size > posts), a fixed seed: the worker sees the same MC
    statistics as an offline BatchProcessor on the same posts, so it must route the same posts
    for the same reasons."""
    await make_topics(kafka, topics, partitions=1)
    batch = messages()
    await produce(kafka.bootstrap_servers, topics.input, batch)
    posts = as_posts(batch)
    model = {"n_samples": 4, "seed": 11}
    common = {"model": model, "batch_size": 512, "batch_max_wait_ms": 2000}

    # cuts that split the posts: between two observed values, so float noise cannot flip a post
    probe = BatchProcessor(test_classifier, make_settings(**common))
    stats = probe.infer(probe.tokenize(posts))
    mi = np.sort(stats.mutual_information)
    grief = test_classifier.label_names.index("grief")
    grief_mean = np.sort(stats.mean[:, grief])
    review = {
        "target_rate": None,
        "max_per_minute": None,
        "band_sigmas": 0.0,  # the ambiguity rule off: the watch label and epistemic cut decide
        "epistemic_cut": float((mi[-31] + mi[-30]) / 2),  # the top 30 posts
        "watch_labels": ["grief"],
        "watch_min_probability": float((grief_mean[-21] + grief_mean[-20]) / 2),  # the top 20
    }
    settings = make_settings(**common, review=review)
    enriched, reviews = await run_pipeline(kafka, topics, settings, test_classifier)
    assert len({e["processed_at"] for e in enriched}) == 1, "all posts in one batch"

    offline = BatchProcessor(test_classifier, settings).process(posts, [None] * N_POSTS)
    expected = {r.post_id for r in offline if r.review is not None}
    rules = {
        r.post_id: {x["rule"] for x in r.enriched_event()["review_reasons"]}
        for r in offline
        if r.review
    }
    assert {"epistemic"} in rules.values() and {"watch_label"} in rules.values()
    assert 30 <= len(expected) < N_POSTS

    assert {r["id"] for r in reviews} == expected
    assert {e["id"] for e in enriched if e["needs_review"]} == expected
    by_id = {e["id"]: e for e in enriched}
    for r in offline:
        online = by_id[r.post_id]
        assert online["review_reasons"] == r.enriched_event()["review_reasons"]
        assert online["uncertainty"] == r.enriched_event()["uncertainty"]
    for raw in reviews:
        request = ReviewRequest.model_validate(raw)
        assert {x.rule for x in request.reasons} <= {"epistemic", "watch_label"}
        assert request.review_score == by_id[request.id]["uncertainty"]["review_score"]
