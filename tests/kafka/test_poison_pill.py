"""One message can never stop a partition: an output too large for its topic becomes a dead
letter and the offset advances (both delivery modes); an ordinary post's free-form fields are
bounded so its event always fits; a topic too small for any event stops the worker at start."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from support.harness import Topics, running, wait_until
from support.kafka_cluster import KafkaCluster, create_topics
from support.streams import committed_and_end, post_bytes, produce, read_all, values

from worker.exit_codes import EXIT_CONFIG, EXIT_DELIVERY
from worker.inference.loading import Classifier
from worker.kafka.admin import ensure_topics
from worker.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]

OUTPUT_LIMIT = 100_000  # max.message.bytes of the enriched and review topics
POST_BYTES = 1_046_069  # the size of the post that stopped a partition (issue 22)


def metadata_heavy_post(i: int) -> tuple[bytes, bytes]:
    """A valid post of exactly ``POST_BYTES`` bytes, nearly all of it in ``metadata``."""
    _, value = post_bytes(i, "a post with a lot of metadata", metadata={"blob": ""})
    padding = POST_BYTES - len(value)
    return post_bytes(i, "a post with a lot of metadata", metadata={"blob": "x" * padding})


async def committed_when(
    kafka: KafkaCluster, topics: Topics, expected: dict[int, int], timeout_s: float = 30
) -> tuple[dict[int, int | None], dict[int, int]]:
    """The group's committed offsets and the end offsets, once the former are ``expected`` (or
    as they are after ``timeout_s``)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        committed, end = await committed_and_end(
            kafka.bootstrap_servers, topics.group_id, topics.input
        )
        if committed == expected or asyncio.get_running_loop().time() > deadline:
            return committed, end
        await asyncio.sleep(0.2)


async def make_small_output_topics(kafka: KafkaCluster, topics: Topics, limit: int) -> None:
    await create_topics(kafka.bootstrap_servers, [topics.input], 1)
    await ensure_topics(
        {"bootstrap_servers": kafka.bootstrap_servers},
        [topics.enriched, topics.review],
        1,
        configs={"max.message.bytes": str(limit)},
    )
    await create_topics(kafka.bootstrap_servers, [topics.dead_letter], 1)


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at_least_once", "exactly_once"])
async def test_an_oversized_output_is_dead_lettered_and_the_partition_goes_on(
    kafka: KafkaCluster,
    topics: Topics,
    make_settings: Any,
    test_classifier: Classifier,
    exactly_once: bool,
) -> None:
    await make_small_output_topics(kafka, topics, OUTPUT_LIMIT)
    heavy_key, heavy = metadata_heavy_post(1)
    assert len(heavy) == POST_BYTES
    long_text = "\U0001f600" * 30_000  # 120,000 bytes of text: valid, but no event of it fits
    messages = [post_bytes(0), (heavy_key, heavy), post_bytes(2, long_text), post_bytes(3)]
    await produce(kafka.bootstrap_servers, topics.input, messages, max_request_size=2 << 20)
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    settings = make_settings(exactly_once=exactly_once, review={"target_rate": None})

    pipeline = Pipeline(settings, classifier=test_classifier)
    async with running(pipeline) as task:
        enriched = values(
            await read_all(
                kafka.bootstrap_servers, topics.enriched, expect=3, isolation_level=isolation
            )
        )
        letters = values(
            await read_all(
                kafka.bootstrap_servers, topics.dead_letter, expect=1, isolation_level=isolation
            )
        )
        committed, end = await committed_when(kafka, topics, {0: 4})
        assert not task.done(), "the worker keeps running"
        assert pipeline.publisher is not None
        assert pipeline.publisher.limits.max_bytes[topics.enriched] == OUTPUT_LIMIT

    # the ordinary posts and the metadata-heavy one are enriched; the latter's metadata is
    # replaced by a marker that says how big it was
    assert sorted(e["id"] for e in enriched) == ["post-0", "post-1", "post-3"]
    heavy_event = next(e for e in enriched if e["id"] == "post-1")
    blob = orjson.loads(heavy)["metadata"]
    assert heavy_event["post"]["metadata"] == {
        "_dropped": {"size_bytes": len(orjson.dumps(blob)), "limit_bytes": 65_536}
    }
    assert heavy_event["post"]["text"] == "a post with a lot of metadata"
    # the post whose event cannot fit is a dead letter of its own kind, with sizes and limit
    assert len(letters) == 1
    letter = letters[0]
    assert letter["error"]["kind"] == "output_too_large"
    assert letter["source"]["offset"] == 2
    assert f"accepts at most {OUTPUT_LIMIT:,}" in letter["error"]["message"]
    assert topics.enriched in letter["error"]["message"]
    assert letter["payload"]["size_bytes"] == len(messages[2][1])
    # committed to the end, past the oversized post
    assert committed == {0: 4} and end == {0: 4}

    # restarted, the group reads nothing again
    again = Pipeline(settings, classifier=test_classifier)
    async with running(again):
        await wait_until(lambda: again.ready()[0], 60, "the second worker is assigned")
        await asyncio.sleep(3)
        assert again.tracker.pending() == 0
    enriched_after = await read_all(
        kafka.bootstrap_servers, topics.enriched, idle_s=1, isolation_level=isolation
    )
    letters_after = await read_all(
        kafka.bootstrap_servers, topics.dead_letter, idle_s=1, isolation_level=isolation
    )
    assert len(enriched_after) == 3 and len(letters_after) == 1


async def test_a_topic_too_small_for_any_event_stops_the_worker_at_start(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    await make_small_output_topics(kafka, topics, 8_000)
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(0)])
    pipeline = Pipeline(make_settings(), classifier=test_classifier)
    code = await asyncio.wait_for(pipeline.run(), 120)
    assert code == EXIT_CONFIG
    assert pipeline._fatal is not None
    assert "accepts records of at most 8,000 bytes" in str(pipeline._fatal)
    committed, _ = await committed_and_end(kafka.bootstrap_servers, topics.group_id, topics.input)
    assert committed == {0: None}


async def test_a_limit_lowered_while_running_stops_once_then_the_output_is_dead_lettered(
    kafka: KafkaCluster, topics: Topics, make_settings: Any, test_classifier: Classifier
) -> None:
    """The enriched topic's limit is lowered under a running worker: the broker rejects the
    next oversized event, the worker stops (exit 3, nothing committed past it, the log says the
    limit was lowered); the next start reads the new limit and dead-letters that post, and the
    posts behind it go through: no crash loop."""
    await make_small_output_topics(kafka, topics, 1_048_588)
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(5)])
    settings = make_settings(review={"target_rate": None})
    first = Pipeline(settings, classifier=test_classifier)
    task = asyncio.create_task(first.run())
    try:
        await read_all(kafka.bootstrap_servers, topics.enriched, expect=5, idle_s=0.5)
        await committed_when(kafka, topics, {0: 5})
        await alter_topic(kafka, topics.enriched, {"max.message.bytes": str(OUTPUT_LIMIT)})
        big = post_bytes(5, "\U0001f600" * 30_000)  # an event of ~120 KB
        await produce(kafka.bootstrap_servers, topics.input, [big, post_bytes(6)])
        code = await asyncio.wait_for(task, 120)
    finally:
        first.request_stop()
        await asyncio.wait({task}, timeout=60)
    assert code == EXIT_DELIVERY
    assert first._fatal is not None and "lowered since start-up" in str(first._fatal)
    committed, _ = await committed_when(kafka, topics, {0: 5})
    assert committed == {0: 5}

    second = Pipeline(settings, classifier=test_classifier)
    async with running(second):
        letters = values(await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=1))
        committed, end = await committed_when(kafka, topics, {0: 7})
    assert [(d["error"]["kind"], d["source"]["offset"]) for d in letters] == [
        ("output_too_large", 5)
    ]
    enriched = values(await read_all(kafka.bootstrap_servers, topics.enriched, idle_s=1))
    assert sorted(e["id"] for e in enriched) == [f"post-{i}" for i in (0, 1, 2, 3, 4, 6)]
    assert committed == {0: 7} and end == {0: 7}


async def alter_topic(kafka: KafkaCluster, topic: str, configs: dict[str, str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
    finally:
        await admin.close()
