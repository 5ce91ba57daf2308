"""Record headers on a real broker: the input's headers reach the enriched event, the review
request and the dead letter (as configured), every output says its content type and schema
version, dead letters keep all input headers and replay restores them; with tracing on, an
incoming traceparent is continued (in-memory span exporter)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from support.harness import Topics, make_topics, running
from support.kafka_cluster import KafkaCluster, create_topics
from support.streams import headers_of, post_bytes, produce_with_headers, read_all, values

from schemas import SCHEMA_VERSION
from worker.inference.loading import Classifier
from worker.kafka.replay import replay_dead_letters
from worker.pipeline import Pipeline
from worker.tracing import Tracing

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01".encode()
OWN = [("content-type", b"application/json"), ("schema-version", SCHEMA_VERSION.encode())]


def routed_always(classifier: Classifier) -> dict[str, Any]:
    """A policy that sends every post to review: every label watched from probability 0."""
    return {
        "target_rate": None,
        "watch_labels": list(classifier.label_names),
        "watch_min_probability": 0.0,
    }


async def test_headers_reach_every_output_and_replay_restores_them(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    await make_topics(kafka, topics, partitions=1)
    post_headers = [
        ("traceparent", TRACEPARENT),
        ("tenant", b"acme"),
        ("X-Secret", b"hush"),
        ("content-type", b"text/plain"),  # replaced by the worker's own
    ]
    bad_headers = [("tenant", b"acme"), ("binary", b"\xff\x00\x01"), ("x-secret", b"hush")]
    key, value = post_bytes(0)
    await produce_with_headers(
        kafka.bootstrap_servers,
        topics.input,
        [(key, value, post_headers), (b"bad", b"{not json", bad_headers)],
    )
    settings = make_settings(headers={"drop": ["x-secret"]}, review=routed_always(test_classifier))
    async with running(Pipeline(settings, classifier=test_classifier)):
        enriched = await read_all(kafka.bootstrap_servers, topics.enriched, expect=1, idle_s=1)
        reviews = await read_all(kafka.bootstrap_servers, topics.review, expect=1, idle_s=1)
        letters = await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=1, idle_s=1)

    expected = [("traceparent", TRACEPARENT), ("tenant", b"acme"), *OWN]
    assert [headers_of(r) for r in enriched] == [expected]
    assert [headers_of(r) for r in reviews] == [expected]
    assert [headers_of(r) for r in letters] == [
        [("tenant", b"acme"), ("binary", b"\xff\x00\x01"), *OWN]
    ]
    letter = values(letters)[0]
    assert letter["error"]["kind"] == "invalid_json"
    assert letter["headers"] == [  # all of them, for replay
        {"key": name, "value_base64": base64.b64encode(v).decode()} for name, v in bad_headers
    ]

    target = f"replayed-{topics.group_id}"
    await create_topics(kafka.bootstrap_servers, [target], 1)
    report = await replay_dead_letters(settings, to_topic=target)
    assert report.replayed == 1
    [replayed] = await read_all(kafka.bootstrap_servers, target, expect=1, idle_s=1)
    assert replayed.key == b"bad" and replayed.value == b"{not json"
    assert headers_of(replayed) == bad_headers


async def test_tracing_continues_the_incoming_traceparent(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    await make_topics(kafka, topics, partitions=1)
    messages = [(*post_bytes(0), [("traceparent", TRACEPARENT)]), (*post_bytes(1), [])]
    await produce_with_headers(kafka.bootstrap_servers, topics.input, messages)
    settings = make_settings(batch_max_wait_ms=1_000)  # both posts in one batch
    pipeline = Pipeline(
        settings, classifier=test_classifier, tracing=Tracing.with_provider(provider)
    )
    async with running(pipeline):
        enriched = await read_all(kafka.bootstrap_servers, topics.enriched, expect=2, idle_s=1)

    spans = exporter.get_finished_spans()
    posts = [s for s in spans if s.name == "emoworker.process"]
    assert len(posts) == 2
    by_offset = {s.attributes["messaging.kafka.offset"]: s for s in posts}  # type: ignore[index]
    continued, started = by_offset[0], by_offset[1]
    # the first post's span is a child of the producer's span, in the producer's trace
    assert continued.parent is not None
    assert format(continued.context.trace_id, "032x") == TRACE_ID
    assert format(continued.parent.span_id, "016x") == PARENT_SPAN
    # the second had no traceparent: a trace of its own
    assert started.parent is None and started.context.trace_id != continued.context.trace_id
    # each enriched event carries its post span as the next parent
    outgoing = {values([r])[0]["id"]: dict(headers_of(r))["traceparent"].decode() for r in enriched}
    for post_id, span in (("post-0", continued), ("post-1", started)):
        trace_id, span_id = outgoing[post_id].split("-")[1:3]
        assert trace_id == format(span.context.trace_id, "032x")
        assert span_id == format(span.context.span_id, "016x")
    outcomes = {s.attributes["emoworker.outcome"] for s in posts}  # type: ignore[index]
    assert outcomes <= {"enriched", "enriched,review"}
    # the batch span, its stages as children, and the post spans linked to it
    [batch] = [s for s in spans if s.name == "emoworker.batch"]
    stages = {
        s.name for s in spans if s.parent is not None and s.parent.span_id == batch.context.span_id
    }
    assert stages == {"consume", "tokenize", "infer", "publish"}
    assert all([link.context.span_id for link in s.links] == [batch.context.span_id] for s in posts)
