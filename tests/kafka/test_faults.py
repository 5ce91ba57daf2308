"""Faults that must neither lose posts nor crash the worker: the quick cases (``make test``).

Hostile input end to end, output topics that reject or never acknowledge what the worker
publishes, and a cluster that is down when the worker starts. The long cases (kills, scaling,
broker restarts, slow inference, overload) are in ``test_chaos.py`` (``make chaos``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import RecordTooLargeError
from support.faults import (
    MB,
    OutputWatcher,
    create_topic,
    free_port,
    http_get,
    log_events,
    own_broker,
    report,
)
from support.harness import Topics, WorkerProcess, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.processors import NAN_MARKER, NanProcessor
from support.streams import committed_and_end, post_bytes, produce, read_all, values

from schemas import DeadLetter
from worker.exit_codes import EXIT_CONFIG, EXIT_DELIVERY, EXIT_MODEL
from worker.isolation import SYSTEMIC_FAILURES
from worker.pipeline import Pipeline
from worker.processing import BatchProcessor

pytestmark = pytest.mark.kafka


class _RawHeaderKey(str):
    """A header key that aiokafka's (pure Python) record builder writes as arbitrary bytes:
    real producers (librdkafka, hand-made clients) can send header keys that are not UTF-8."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawHeaderKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


async def produce_with_raw_header_key(
    bootstrap: str, topic: str, key: bytes, value: bytes, header_key: bytes
) -> None:
    """One record (in a record batch of its own) whose header key is ``header_key`` bytes."""
    import aiokafka.producer.message_accumulator as accumulator
    import aiokafka.producer.producer as producer_module
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    saved = accumulator.DefaultRecordBatchBuilder, producer_module.DefaultRecordBatchBuilder
    accumulator.DefaultRecordBatchBuilder = _DefaultRecordBatchBuilderPy  # type: ignore[misc]
    producer_module.DefaultRecordBatchBuilder = _DefaultRecordBatchBuilderPy  # type: ignore[misc]
    try:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            headers = [(_RawHeaderKey(header_key), os.urandom(16))]
            await (await producer.send(topic, value, key=key, headers=headers))
        finally:
            await producer.stop()
    finally:
        accumulator.DefaultRecordBatchBuilder, producer_module.DefaultRecordBatchBuilder = saved


async def test_hostile_input_end_to_end(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier, capsys
) -> None:
    """The kinds test_pipeline_kafka's bad-input test does not cover, through a real broker:
    a 10 MB message, garbage headers, duplicated ids and unusual but valid texts."""
    bootstrap = kafka.bootstrap_servers
    await create_topic(kafka.client_config(), topics.input, 1, **{"max.message.bytes": 12 * MB})
    await make_topics(kafka, topics, partitions=1)
    huge_text = ("all work and no play " * (10 * MB // 21 + 1))[: 10 * MB]
    valid: list[tuple[str, str]] = [  # (what, text): each must come out enriched
        ("emoji only", "😀😂🔥💯🙏"),
        ("control characters", "tab\there\x07bell\x1bescape \x00nul and text"),
        ("right-to-left override", "abc\u202edcba\u202c is it reversed?"),
        ("mixed scripts", "Hello Привет مرحبا 你好 こんにちは שלום नमस्ते"),
        ("combining marks", "Z̷̢̛a̶̡͝l̸̨̛g̵̢̛o̴̢͝ text"),
    ]
    messages: list[tuple[bytes | None, bytes | None]] = [post_bytes(0)]
    for i, (_, text) in enumerate(valid, 1):
        messages.append((f"v{i}".encode(), orjson.dumps({"id": f"valid-{i}", "text": text})))
    messages.append((b"dup", orjson.dumps({"id": "dup-1", "text": "first copy"})))
    messages.append((b"dup", orjson.dumps({"id": "dup-1", "text": "second copy, other text"})))
    messages.append((b"zw", orjson.dumps({"id": "zw-1", "text": "\u200b\u200c\u200d\ufeff\u2060"})))
    await produce(bootstrap, topics.input, messages)
    # 10 MB: more than the worker's max_message_bytes (1 MiB) and its max_partition_fetch_bytes
    big = orjson.dumps({"id": "big-1", "text": huge_text})
    await produce(bootstrap, topics.input, [(b"big", big)], max_request_size=12 * MB)
    # garbage headers: random bytes as values and odd (valid UTF-8) keys are ignored...
    headers = [("\x00\ufffd🔥", os.urandom(64)), ("", b""), ("k" * 300, None), ("x", os.urandom(1))]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(3):
            key, value = post_bytes(100 + i)
            await (await producer.send(topics.input, value, key=key, headers=headers))
    finally:
        await producer.stop()
    # ... a header key that is not UTF-8 makes the record unreadable to aiokafka
    await produce_with_raw_header_key(
        bootstrap, topics.input, b"badhdr", post_bytes(200)[1], b"\xff\xfe\xc3(" + os.urandom(8)
    )
    await produce(bootstrap, topics.input, [post_bytes(999)])  # the partition goes on after it
    total = len(messages) + 1 + 3 + 1 + 1

    settings = make_settings(model={"n_samples": 2})
    expected_ids = {"post-0", "post-100", "post-101", "post-102", "post-999", "dup-1"}
    expected_ids |= {f"valid-{i}" for i in range(1, len(valid) + 1)}
    pipeline = Pipeline(settings, classifier=test_classifier)
    async with running(pipeline) as task:
        enriched = values(await read_all(bootstrap, topics.enriched, expect=len(expected_ids) + 1))
        letters = values(await read_all(bootstrap, topics.dead_letter, expect=3))
        await asyncio.sleep(1)
        assert not task.done(), "the worker must survive hostile input"
    assert await task == 0

    ids = collections.Counter(e["id"] for e in enriched)
    assert set(ids) == expected_ids
    assert ids["dup-1"] == 2, "both messages with the same id are processed"
    assert {e["post"]["text"] for e in enriched if e["id"] == "dup-1"} == {
        "first copy",
        "second copy, other text",
    }
    by_id = {e["id"]: e for e in enriched}
    for i, (what, text) in enumerate(valid, 1):  # texts come back unchanged
        assert by_id[f"valid-{i}"]["post"]["text"] == text, what
    kinds = {letter["error"]["kind"]: letter for letter in letters}
    assert sorted(kinds) == ["blank_text", "invalid_utf8", "message_too_large"], letters
    for letter in letters:
        DeadLetter.model_validate(letter)
    too_large = kinds["message_too_large"]
    assert too_large["payload"]["size_bytes"] == len(big)
    assert too_large["payload"]["truncated"] is True
    assert len(too_large["payload"]["data"]) <= settings.dead_letter_payload_bytes
    unreadable = kinds["invalid_utf8"]
    assert "cannot be parsed" in unreadable["error"]["message"]
    assert unreadable["source"]["offset"] == total - 2  # the record with the bad header key
    assert kinds["blank_text"]["source"]["offset"] == len(messages) - 1
    committed, ends = await committed_and_end(bootstrap, topics.group_id, topics.input)
    assert committed == ends == {0: total}
    report(
        capsys,
        f"hostile input: {total} in, {len(enriched)} enriched (dup-1 twice), "
        f"{len(letters)} dead-lettered ({', '.join(sorted(kinds))}), committed {total}, "
        "worker kept running",
    )


async def test_record_larger_than_a_fetch_is_refetched_then_dead_lettered(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier, monkeypatch
) -> None:
    """aiokafka skips a record it got only part of and raises RecordTooLargeError (a broker
    before 0.10.1, or a big record served after other partitions in one response). Kafka 4
    always serves it whole when it comes first, so the fault is simulated: the record at
    offset 5 never fits. The worker must not crash, nor lose it silently."""
    await make_topics(kafka, topics, partitions=1)
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(20)])
    real_getmany = AIOKafkaConsumer.getmany
    raised: list[int] = []

    async def getmany(self: AIOKafkaConsumer, *partitions: Any, **kw: Any) -> Any:
        if getattr(self, "_skipped", None) is not None:  # like aiokafka: raise, position moved on
            tp, self._skipped = self._skipped, None
            raised.append(5)
            raise RecordTooLargeError("record at %s=%s too large for %s", tp, 5, 1024)
        result = await real_getmany(self, *partitions, **kw)
        for tp, records in list(result.items()):
            if tp.topic == topics.input and any(r.offset == 5 for r in records):
                result[tp] = [r for r in records if r.offset < 5]
                self.seek(tp, 6)
                self._skipped = tp
        return result

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
    pipeline = Pipeline(make_settings(model={"n_samples": 2}), classifier=test_classifier)
    async with running(pipeline) as task:
        letters = values(await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=1))
        enriched = values(await read_all(kafka.bootstrap_servers, topics.enriched, expect=19))
        await asyncio.sleep(1)
        assert not task.done()
    assert await task == 0
    assert len(raised) == 4, "three fetches again, then a dead letter"
    assert {e["id"] for e in enriched} == {f"post-{i}" for i in range(20) if i != 5}
    assert [(d["error"]["kind"], d["source"]["offset"]) for d in letters] == [
        ("message_too_large", 5)
    ]
    assert "MAX_PARTITION_FETCH_BYTES" in letters[0]["error"]["message"]
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends == {0: 20}


# ── inference failing for some posts, or for all ─────────────────────────────────────────────


class PoisonProcessor(BatchProcessor):
    """Inference that fails for any batch holding a post whose text contains POISON."""

    def process(self, posts, sources, token_ids=None, timing=None):  # type: ignore[no-untyped-def]
        if any("POISON" in p.text for p in posts):
            raise RuntimeError("the model cannot handle this post")
        return super().process(posts, sources, token_ids, timing)


class BrokenProcessor(BatchProcessor):
    def process(self, posts, sources, token_ids=None, timing=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: device-side assert triggered")


async def test_posts_that_fail_inference_are_dead_lettered_the_rest_enriched(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier, capsys
) -> None:
    """A batch that fails is retried post by post: only the posts that fail alone become
    ``processing_error`` dead letters (with their offsets); their batch-mates are enriched."""
    await make_topics(kafka, topics, partitions=1)
    poisoned = {5, 17, 33}
    n = 40
    messages = [post_bytes(i, "POISON pill" if i in poisoned else None) for i in range(n)]
    await produce(kafka.bootstrap_servers, topics.input, messages)
    settings = make_settings(model={"n_samples": 2}, batch_size=16)
    pipeline = Pipeline(settings, classifier=test_classifier, processor_factory=PoisonProcessor)
    async with running(pipeline), OutputWatcher(kafka.client_config(), topics) as out:
        await out.wait_for(n, timeout_s=120)
        await out.settle(2)
    assert set(out.ids) == {f"post-{i}" for i in range(n) if i not in poisoned}
    assert out.duplicates() == 0
    assert sorted(d["source"]["offset"] for d in out.letters) == sorted(poisoned)
    for letter in out.letters:
        DeadLetter.model_validate(letter)
        assert letter["error"]["kind"] == "processing_error"
        assert "RuntimeError: the model cannot handle this post" in letter["error"]["message"]
        assert "POISON pill" in letter["payload"]["data"]
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends == {0: n}
    report(
        capsys,
        f"inference failing for 3 of {n} posts: {len(out.ids)} enriched, "
        f"{len(out.letters)} dead-lettered (processing_error), committed {n}",
    )


async def test_posts_with_nan_scores_are_dead_lettered_not_published(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    """A post the model gives NaN scores would have been published with null probabilities (a
    schema violation): it is retried alone and dead-lettered; its batch-mates are enriched and
    every offset is committed."""
    await make_topics(kafka, topics, partitions=1)
    nan_posts = {3, 20, 21}
    n = 32
    messages = [post_bytes(i, f"a {NAN_MARKER} here" if i in nan_posts else None) for i in range(n)]
    await produce(kafka.bootstrap_servers, topics.input, messages)
    settings = make_settings(model={"n_samples": 2}, batch_size=16)
    pipeline = Pipeline(settings, classifier=test_classifier, processor_factory=NanProcessor)
    async with running(pipeline), OutputWatcher(kafka.client_config(), topics) as out:
        await out.wait_for(n, timeout_s=120)
        await out.settle(2)
    assert set(out.ids) == {f"post-{i}" for i in range(n) if i not in nan_posts}
    assert sorted(d["source"]["offset"] for d in out.letters) == sorted(nan_posts)
    for letter in out.letters:
        assert letter["error"]["kind"] == "processing_error"
        assert "NonFiniteScores: the model's scores are not finite" in letter["error"]["message"]
    committed, ends = await committed_and_end(
        kafka.bootstrap_servers, topics.group_id, topics.input
    )
    assert committed == ends == {0: n}


async def test_a_model_failing_on_every_post_stops_the_worker_with_code_4(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    """Not a bad post but a broken model: after SYSTEMIC_FAILURES posts in a row fail alone,
    the worker stops (exit 4) instead of dead-lettering the stream; nothing is committed past
    the dead letters already published."""
    await make_topics(kafka, topics, partitions=1)
    n = 3 * SYSTEMIC_FAILURES
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n)])
    settings = make_settings(model={"n_samples": 2}, batch_size=16)
    pipeline = Pipeline(settings, classifier=test_classifier, processor_factory=BrokenProcessor)
    async with OutputWatcher(kafka.client_config(), topics) as out:
        code = await asyncio.wait_for(pipeline.run(), 120)
        await out.settle(2)
    assert code == EXIT_MODEL
    assert "CUDA error" in str(pipeline._fatal)
    assert not out.ids
    assert len(out.letters) < SYSTEMIC_FAILURES
    committed, _ = await committed_and_end(kafka.bootstrap_servers, topics.group_id, topics.input)
    assert (committed.get(0) or 0) <= len(out.letters)


# ── produce errors on an output topic ───────────────────────────────────────────────────────


async def test_output_topic_too_small_for_any_event_stops_the_worker_at_start(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    """The enriched topic's max.message.bytes is smaller than any event: the worker reads it
    at start-up and refuses to start (exit 1, one clear line) instead of publishing."""
    await create_topic(kafka.client_config(), topics.enriched, 2, **{"max.message.bytes": 1000})
    await make_topics(kafka, topics, partitions=2)
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(100)])
    settings = make_settings(model={"n_samples": 2}, kafka={"delivery_timeout_s": 5})
    worker = WorkerProcess(settings, tmp_path / "worker.log", name="too-small")
    try:
        code = await asyncio.to_thread(worker.wait, 150)
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    log = worker.log_text()
    assert code == EXIT_CONFIG, log
    errors = [e for e in log_events(log) if e.get("level") in ("error", "critical")]
    assert len(errors) == 1, errors
    reason = errors[0]["reason"]
    assert f"topic '{topics.enriched}' accepts records of at most 1,000 bytes" in reason
    assert "raise the topic's max.message.bytes" in reason
    assert "Traceback" not in log
    committed, _ = await committed_and_end(kafka.bootstrap_servers, topics.group_id, topics.input)
    assert all(not c for c in committed.values()), committed
    events = log_events(log)
    ready = next(e["timestamp"] for e in events if e.get("event") == "model ready")
    took = datetime.fromisoformat(errors[0]["timestamp"]) - datetime.fromisoformat(ready)
    report(
        capsys,
        f"output topic too small for any event: 100 in, 0 enriched, committed 0, exit {code} "
        f"{took.total_seconds():.1f}s after the model was ready; error: {reason}",
    )


async def test_output_topic_deleted_stops_the_worker_without_committing_past_it(
    topics: Topics, make_settings, test_classifier, capsys
) -> None:
    """The enriched topic is deleted mid-stream on a cluster that does not auto-create topics:
    the worker retries, then stops with code 3; the committed offsets never pass a post whose
    event was not acknowledged."""
    with own_broker(extra_properties={"auto.create.topics.enable": "false"}) as broker:
        client = broker.client_config()
        cluster = KafkaCluster(broker.bootstrap_servers, "local", broker)
        await make_topics(cluster, topics, partitions=2)
        await produce(broker.bootstrap_servers, topics.input, [post_bytes(i) for i in range(60)])
        settings = make_settings(
            model={"n_samples": 2},
            kafka={"bootstrap_servers": broker.bootstrap_servers, "delivery_timeout_s": 6},
        )
        pipeline = Pipeline(settings, classifier=test_classifier)
        task = asyncio.create_task(pipeline.run())
        async with OutputWatcher(client, topics) as out:
            await out.wait_for(60, timeout_s=120)
        admin = AIOKafkaAdminClient(**client)
        await admin.start()
        try:
            await admin.delete_topics([topics.enriched])
        finally:
            await admin.close()
        deleted = time.monotonic()
        await produce(
            broker.bootstrap_servers, topics.input, [post_bytes(i) for i in range(60, 120)]
        )
        code = await asyncio.wait_for(task, 120)
        stopped_s = time.monotonic() - deleted
        assert code == EXIT_DELIVERY, pipeline._fatal
        assert topics.enriched in str(pipeline._fatal)
        assert "within 6s (kafka.delivery_timeout_s)" in str(pipeline._fatal)
        assert stopped_s < 6 + 30
        acked = pipeline.metrics.registry.get_sample_value("emoworker_posts_enriched_total")
        enriched_acked = int(acked or 0)
        assert 60 <= enriched_acked < 120
        committed, _ = await committed_and_end(
            broker.bootstrap_servers, topics.group_id, topics.input
        )
        # every input is a valid post with one enriched event: committed <= acknowledged
        assert sum(c or 0 for c in committed.values()) <= enriched_acked
        assert sum(c or 0 for c in committed.values()) >= 60
        report(
            capsys,
            f"output topic deleted: 120 in, {enriched_acked} enriched, committed "
            f"{sum(c or 0 for c in committed.values())}, exit {code} {stopped_s:.1f}s after the "
            f"deletion: {pipeline._fatal}",
        )


# ── the cluster is down when the worker starts ──────────────────────────────────────────────


async def test_broker_down_at_start_worker_waits_then_processes(
    topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    """No cluster at start: the worker keeps running (no crash loop), retries with growing
    delays, reports not ready (/readyz 503, /healthz 200), and processes once Kafka appears."""
    kafka_port, http_port = free_port(), free_port()
    settings = make_settings(
        model={"n_samples": 2},
        kafka={"bootstrap_servers": f"127.0.0.1:{kafka_port}"},
        http_host="127.0.0.1",
        http_port=http_port,
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log", name="early-bird")
    try:
        await worker.wait_for_log("Kafka not reachable yet", timeout_s=180)
        await asyncio.sleep(6)  # a few retries
        assert worker.proc.poll() is None, worker.log_text()
        base = f"http://127.0.0.1:{http_port}"
        status, body = await asyncio.to_thread(http_get, f"{base}/readyz")
        assert status == 503 and b"connecting to Kafka" in body, body
        assert (await asyncio.to_thread(http_get, f"{base}/healthz"))[0] == 200
        retries = [
            e["retry_in_s"]
            for e in log_events(worker.log_text())
            if e.get("event") == "Kafka not reachable yet; retrying"
        ]
        assert len(retries) >= 3 and retries == sorted(retries) and retries[-1] > retries[0]
        with own_broker(port=kafka_port) as broker:
            appeared = time.monotonic()
            cluster = KafkaCluster(broker.bootstrap_servers, "local", broker)
            await make_topics(cluster, topics, partitions=2)
            await produce(
                broker.bootstrap_servers, topics.input, [post_bytes(i) for i in range(100)]
            )
            async with OutputWatcher(broker.client_config(), topics) as out:
                await out.wait_for(100, timeout_s=180, worker=worker)
                await out.settle(2)
            recovered_s = out.last_arrival() - appeared
            assert set(out.ids) == {f"post-{i}" for i in range(100)}
            assert (await asyncio.to_thread(http_get, f"{base}/readyz"))[0] == 200
            worker.terminate()
            assert await asyncio.to_thread(worker.wait, 60) == 0
            report(capsys, f"broker down at start: 100 in, {out.summary()}, 0 lost, "
                  f"all out {recovered_s:.1f}s after the broker appeared")  # fmt: skip
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    # (aiokafka may log a transient "Group Coordinator Request failed" of the fresh broker)
    errors = [
        e
        for e in log_events(worker.log_text())
        if e.get("level") == "error" and not e.get("logger", "").startswith("aiokafka")
    ]
    assert errors == [], errors
