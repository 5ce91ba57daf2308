"""Fewer bytes on a real broker: posts produced with each codec Kafka has are read (a producer
upstream may compress with any of them), compressed outputs are read back, and the compact event
layout is what the worker publishes when set."""

from __future__ import annotations

from typing import Any

import pytest
from support.harness import Topics, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.streams import post_bytes, produce, read_all, values

from schemas import CompactEnrichedPost, ReviewRequest
from worker.inference.loading import Classifier
from worker.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]

CODECS = ("gzip", "snappy", "lz4", "zstd")


@pytest.mark.parametrize("output_codec", ["zstd", "lz4"])
async def test_posts_in_every_codec_are_enriched_and_compressed_outputs_read_back(
    kafka: KafkaCluster,
    topics: Topics,
    make_settings: Any,
    test_classifier: Classifier,
    output_codec: str,
) -> None:
    await make_topics(kafka, topics, partitions=2)
    expected = set()
    for c, codec in enumerate(CODECS):
        batch = [post_bytes(c * 10 + i) for i in range(5)]
        expected |= {key.decode() for key, _ in batch}
        await produce(kafka.bootstrap_servers, topics.input, batch, compression_type=codec)
    settings = make_settings(kafka={"producer_compression": output_codec})
    async with running(Pipeline(settings, classifier=test_classifier)):
        enriched = await read_all(kafka.bootstrap_servers, topics.enriched, expect=20, idle_s=1)
        letters = await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=0, idle_s=1)
    assert sorted(e["id"] for e in values(enriched)) == sorted(expected)
    assert letters == []


async def test_compact_layout_enriched_events_and_full_review_requests(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    """``event_layout=compact`` with zstd outputs: every enriched event is compact, every review
    request (all posts, through a watch label) keeps the full layout, with the same values."""
    await make_topics(kafka, topics, partitions=2)
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(30)])
    label = test_classifier.label_names[0]
    settings = make_settings(
        event_layout="compact",
        kafka={"producer_compression": "zstd"},
        review={"target_rate": None, "watch_labels": [label], "watch_min_probability": 0.0},
    )
    async with running(Pipeline(settings, classifier=test_classifier)):
        enriched = values(await read_all(kafka.bootstrap_servers, topics.enriched, expect=30))
        requests = values(await read_all(kafka.bootstrap_servers, topics.review, expect=30))
    assert all("emotions" not in e and e["layout"] == "compact" for e in enriched)
    events = {e["id"]: CompactEnrichedPost.model_validate(e) for e in enriched}
    reviews = {r["id"]: ReviewRequest.model_validate(r) for r in requests}
    assert sorted(events) == sorted(reviews) == sorted(f"post-{i}" for i in range(30))
    for post_id, event in events.items():
        assert event.scores.labels == test_classifier.label_names
        full = reviews[post_id].emotions
        assert [e.label for e in full] == event.scores.labels
        for e, probability in zip(full, event.scores.probability, strict=True):
            assert abs(e.probability - probability) <= 1e-4  # rounded to 6 and to 4 digits
        assert event.needs_review and event.predicted_labels == reviews[post_id].predicted_labels
