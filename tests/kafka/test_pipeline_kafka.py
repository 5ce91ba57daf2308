"""The streaming worker end to end against a real Kafka broker."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import orjson
import pytest
from support.faults import report
from support.harness import Topics, WorkerProcess, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.streams import committed_and_end, post_bytes, produce, read_all, values

from schemas import DeadLetter, EnrichedPost, ReviewRequest
from worker.pipeline import Pipeline

pytestmark = pytest.mark.kafka


async def test_thousand_posts_in_thousand_enriched_out(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    await make_topics(kafka, topics, partitions=4)
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(1000)])
    settings = make_settings(model={"n_samples": 2})
    pipeline = Pipeline(settings, classifier=test_classifier)
    async with running(pipeline) as task:
        records = await read_all(kafka.bootstrap_servers, topics.enriched, expect=1000)
        enriched = values(records)
        reviews = values(await read_all(kafka.bootstrap_servers, topics.review, idle_s=2))
        await asyncio.sleep(1.5)  # a commit interval or more
        assert not task.done()
    assert await task == 0

    assert all(r.key == orjson.loads(r.value)["id"].encode() for r in records)
    ids = [e["id"] for e in enriched]
    assert len(ids) == 1000
    assert set(ids) == {f"post-{i}" for i in range(1000)}
    flagged = {e["id"] for e in enriched if e["needs_review"]}
    assert {r["id"] for r in reviews} == flagged
    assert len(reviews) == len(flagged)
    assert 0 < len(flagged) < 1000
    for event in enriched[:50]:
        EnrichedPost.model_validate(event)
        assert len(event["emotions"]) == 28
        assert event["predicted_labels"]
    for review in reviews[:20]:
        ReviewRequest.model_validate(review)
        assert review["reasons"]
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends
    assert sum(ends.values()) == 1000


BAD_INPUTS: list[tuple[str, bytes | None, str]] = [
    ("invalid json", b"{this is not json", "invalid_json"),
    ("truncated json", b'{"id": "t1", "text": "cut sho', "invalid_json"),
    ("non-utf8", b'{"id": "u1", "text": "caf\xe9"}', "invalid_utf8"),
    ("empty", b"", "empty_message"),
    ("tombstone", None, "tombstone"),
    ("array", b"[1, 2, 3]", "not_an_object"),
    ("number", b"42", "not_an_object"),
    ("string", b'"just a string"', "not_an_object"),
    ("null", b"null", "not_an_object"),
    ("missing text", b'{"id": "m1"}', "missing_field"),
    ("blank text", b'{"id": "b1", "text": "  \\n\\t "}', "blank_text"),
    ("non-string text", b'{"id": "n1", "text": 12}', "invalid_field"),
    ("missing id", b'{"text": "hello"}', "missing_field"),
    ("non-string id", b'{"id": 17, "text": "hello"}', "invalid_field"),
    ("text too long", orjson.dumps({"id": "l1", "text": "a" * 2001}), "text_too_long"),
    ("bad schema version", b'{"id": "v1", "text": "hi", "schema_version": "9"}',
     "unsupported_schema_version"),
    ("too deep", b'{"id": "d1", "text": "hi", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 41,
     "nesting_too_deep"),
]  # fmt: skip


async def test_bad_input_goes_to_dead_letter_and_worker_keeps_running(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    await make_topics(kafka, topics, partitions=1)  # one partition: offsets are predictable
    messages: list[tuple[bytes | None, bytes | None]] = []
    expected_kind: dict[int, str] = {}
    for i, (_, value, kind) in enumerate(BAD_INPUTS):
        messages.append(post_bytes(i))
        expected_kind[len(messages)] = kind
        messages.append((f"bad-{i}".encode(), value))
    messages.append(post_bytes(999))
    await produce(kafka.bootstrap_servers, topics.input, messages)

    settings = make_settings(max_text_chars=2000)
    pipeline = Pipeline(settings, classifier=test_classifier)
    async with running(pipeline) as task:
        letters = values(
            await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=len(BAD_INPUTS))
        )
        enriched = values(
            await read_all(kafka.bootstrap_servers, topics.enriched, expect=len(BAD_INPUTS) + 1)
        )
        assert not task.done(), "the worker must survive bad input"
        await asyncio.sleep(1)
    assert await task == 0

    assert len(letters) == len(BAD_INPUTS)
    by_offset = {letter["source"]["offset"]: letter for letter in letters}
    assert set(by_offset) == set(expected_kind)
    for offset, kind in expected_kind.items():
        letter = DeadLetter.model_validate(by_offset[offset])
        assert letter.error.kind == kind, (offset, letter.error)
        assert letter.error.message
        assert letter.source.topic == topics.input  # type: ignore[union-attr]
    tombstone = next(v for v in by_offset.values() if v["error"]["kind"] == "tombstone")
    assert tombstone["payload"]["data"] is None
    non_utf8 = next(v for v in by_offset.values() if v["error"]["kind"] == "invalid_utf8")
    assert non_utf8["payload"]["encoding"] == "base64"
    assert {e["id"] for e in enriched} == {f"post-{i}" for i in [*range(len(BAD_INPUTS)), 999]}
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends == {0: len(messages)}


async def test_two_workers_share_the_partitions(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    await make_topics(kafka, topics, partitions=4)
    n = 600
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n // 2)])
    first = Pipeline(
        make_settings(worker_id="a", model={"n_samples": 2}), classifier=test_classifier
    )
    second = Pipeline(
        make_settings(worker_id="b", model={"n_samples": 2}), classifier=test_classifier
    )
    assignments: dict[str, set[int]] = {"a": set(), "b": set()}

    def watch(name: str, pipeline: Pipeline) -> None:
        original = pipeline.on_assigned

        def on_assigned(assigned):  # type: ignore[no-untyped-def]
            assignments[name] |= {tp.partition for tp in assigned}
            original(assigned)

        pipeline.on_assigned = on_assigned  # type: ignore[method-assign]

    watch("a", first)
    watch("b", second)
    async with running(first):
        await asyncio.sleep(3)
        async with running(second):
            # the second half goes in once both workers own partitions, so both process some
            for _ in range(300):  # up to 60 s
                if second.assigned and first.assigned:
                    break
                await asyncio.sleep(0.2)
            await produce(
                kafka.bootstrap_servers,
                topics.input,
                [post_bytes(i) for i in range(n // 2, n)],
            )
            records = await read_all(kafka.bootstrap_servers, topics.enriched, expect=n, idle_s=4)
            assert second.assigned, "the second worker got no partitions"
            assert first.assigned, "the first worker lost all partitions"
            await asyncio.sleep(1)
    events = values(records)
    counts = collections.Counter(e["id"] for e in events)
    assert set(counts) == {f"post-{i}" for i in range(n)}
    duplicates = sum(c - 1 for c in counts.values())
    # duplicates only around the rebalance: at most the work in flight in one worker then
    bound = first.settings.max_in_flight_batches * first.settings.batch_size * 2
    assert duplicates <= bound, f"{duplicates} duplicates > {bound}"
    assert assignments["a"] and assignments["b"]
    assert {e["worker_id"] for e in events} == {"a", "b"}


async def _wait_enriched(
    kafka: KafkaCluster, topic: str, at_least: int, timeout_s: float, idle_s: float = 0.5
) -> int:
    """Until ``topic`` holds ``at_least`` events; returns how many it held then."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        count = len(await read_all(kafka.bootstrap_servers, topic, idle_s=idle_s, timeout_s=5))
        if count >= at_least:
            return count
        await asyncio.sleep(0.5)
    raise AssertionError(f"fewer than {at_least} enriched events after {timeout_s}s")


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path
) -> None:
    await make_topics(kafka, topics, partitions=3)
    n = 2000  # enough that the kill lands mid-stream on a fast machine too
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n)])
    settings = make_settings(model={"n_samples": 16}, batch_size=16)
    worker = WorkerProcess(settings, tmp_path / "worker1.log", name="w1")
    try:
        await _wait_enriched(kafka, topics.enriched, 100, timeout_s=180)
    finally:
        worker.kill()
    before = len(await read_all(kafka.bootstrap_servers, topics.enriched, idle_s=1))
    assert before < n, "the kill came too late to test anything"
    restarted = WorkerProcess(settings, tmp_path / "worker2.log", name="w2")
    try:
        records = await read_all(
            kafka.bootstrap_servers, topics.enriched, expect=n, idle_s=4, timeout_s=240
        )
    finally:
        restarted.terminate()
        assert restarted.wait(60) == 0
    counts = collections.Counter(e["id"] for e in values(records))
    assert set(counts) == {f"post-{i}" for i in range(n)}, "posts were lost"
    duplicates = sum(c - 1 for c in counts.values())
    bound = settings.max_in_flight_batches * settings.batch_size * 2
    assert duplicates <= bound


async def test_sigterm_drains_publishes_commits_and_exits_zero(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    await make_topics(kafka, topics, partitions=2)
    n = 3000  # the signal follows the first outputs: most of the stream is still to come
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n)])
    settings = make_settings(model={"n_samples": 2}, shutdown_grace_s=60)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    at_signal = await _wait_enriched(kafka, topics.enriched, 1, timeout_s=180, idle_s=0)
    worker.terminate()
    assert await asyncio.to_thread(worker.wait, 90) == 0
    assert "worker stopped cleanly" in worker.log_text()

    enriched = values(await read_all(kafka.bootstrap_servers, topics.enriched, idle_s=1))
    # the signal landed mid-stream: some posts were done then, and the drain did not finish all
    assert 0 < at_signal <= len(enriched) < n, (at_signal, len(enriched), n)
    committed, _ = await committed_and_end(kafka.bootstrap_servers, topics.group_id, topics.input)
    published_next: dict[int, int] = {}
    for event in enriched:
        source = event["source"]
        published_next[source["partition"]] = max(
            published_next.get(source["partition"], 0), source["offset"] + 1
        )
    # everything consumed before the signal was published, and the commit covers exactly it
    assert {p: c for p, c in committed.items() if c} == published_next
    assert len({e["id"] for e in enriched}) == sum(published_next.values())
    report(
        capsys,
        f"SIGTERM drain: {at_signal} of {n} enriched at the signal, {len(enriched)} after the "
        f"drain, committed {sum(c or 0 for c in committed.values())}, exit 0",
    )
