"""Out-of-distribution routing end to end on a real broker: a mixed English / other-language
stream lands exactly as ``ood.action`` says (counts per topic, the per-minute cap), and the
metrics count each outcome."""

from __future__ import annotations

from typing import Any

import pytest
from support.harness import Topics, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.streams import post_bytes, produce, read_all, values
from support.texts import ENGLISH_POSTS, FOREIGN_POSTS

from schemas import EnrichedPost, ReviewRequest
from worker.inference.loading import Classifier
from worker.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]

REPEAT = 2


def messages() -> tuple[list[tuple[bytes | None, bytes | None]], set[str]]:
    out: list[tuple[bytes | None, bytes | None]] = []
    foreign: set[str] = set()
    i = 0
    for _ in range(REPEAT):
        for english, (_, other) in zip(ENGLISH_POSTS, FOREIGN_POSTS, strict=True):
            out.append(post_bytes(i, english))
            out.append(post_bytes(i + 1, other))
            foreign.add(f"post-{i + 1}")
            i += 2
    return out, foreign


def counter(pipeline: Pipeline, name: str, **labels: str) -> float:
    value = pipeline.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def run(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, classifier: Classifier, ood: dict
) -> tuple[Pipeline, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    await make_topics(kafka, topics, partitions=2)
    batch, foreign = messages()
    await produce(kafka.bootstrap_servers, topics.input, batch)
    # no budget and the ambiguity band off: only the OOD rule routes
    settings = make_settings(review={"target_rate": None, "band_sigmas": 0}, ood=ood)
    pipeline = Pipeline(settings, classifier=classifier)
    async with running(pipeline) as task:
        enriched = values(
            await read_all(kafka.bootstrap_servers, topics.enriched, expect=len(batch))
        )
        reviews = values(await read_all(kafka.bootstrap_servers, topics.review, idle_s=2))
        unsupported = values(await read_all(kafka.bootstrap_servers, topics.unsupported, idle_s=1))
        assert not task.done()
    assert await task == 0
    assert len(enriched) == len(batch) == len({e["id"] for e in enriched})
    for event in enriched:
        EnrichedPost.model_validate(event)
        assert event["uncertainty"]["ood"]["flagged"] is (event["id"] in foreign)
    return pipeline, enriched, reviews, unsupported, foreign


async def test_review_action_routes_foreign_posts_up_to_the_cap(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    pipeline, enriched, reviews, unsupported, foreign = await run(
        kafka, topics, make_settings, test_classifier, {"action": "review", "max_per_minute": 10}
    )
    assert len(reviews) == 10 and {r["id"] for r in reviews} <= foreign and not unsupported
    for raw in reviews:
        request = ReviewRequest.model_validate(raw)
        assert [r.rule for r in request.reasons] == ["out_of_distribution"]
    actions = [e["uncertainty"]["ood"]["action"] for e in enriched if e["id"] in foreign]
    assert actions.count("review") == 10 and actions.count("capped") == len(foreign) - 10
    assert counter(pipeline, "emoworker_posts_out_of_distribution_total", action="review") == 10
    assert (
        counter(pipeline, "emoworker_posts_out_of_distribution_total", action="capped")
        == len(foreign) - 10
    )
    assert counter(pipeline, "emoworker_posts_reviewed_total") == 10


async def test_topic_action_sends_foreign_posts_to_the_unsupported_topic(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    pipeline, enriched, reviews, unsupported, foreign = await run(
        kafka, topics, make_settings, test_classifier, {"action": "topic"}
    )
    assert not reviews
    assert sorted(u["id"] for u in unsupported) == sorted(foreign)
    by_id = {e["id"]: e for e in enriched}
    assert all(u == by_id[u["id"]] for u in unsupported), "the enriched event, unchanged"
    assert counter(pipeline, "emoworker_posts_unsupported_total") == len(foreign)
    assert counter(pipeline, "emoworker_posts_out_of_distribution_total", action="topic") == len(
        foreign
    )
