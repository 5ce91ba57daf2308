"""``emoworker replay``: dead letters back to the input topic, byte for byte, against Kafka."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest
from support.harness import Topics, make_topics
from support.kafka_cluster import KafkaCluster
from support.streams import post_bytes, produce, read_all
from typer.testing import CliRunner

from worker.cli import app
from worker.decoding import DecodeFailure
from worker.kafka.replay import ReplayError, replay_dead_letters, restore_message
from worker.processing import dead_letter_event
from worker.settings import WorkerSettings

KEEP_BYTES = 65_536
SOURCE = {"topic": "posts", "partition": 0, "offset": 0}


def letter(
    kind: Any, value: bytes | None, key: bytes | None, keep_bytes: int = KEEP_BYTES
) -> dict[str, Any]:
    failure = DecodeFailure(kind, f"test failure: {kind}")
    return dead_letter_event(failure, value, SOURCE, key, "test-worker", keep_bytes)


# originals that come back exactly: (key, value)
JSON_CUT = (b"k1", b'{"id": "j1", "text": "cut sho')
JSON_NO_KEY = (None, b"{not json at all")
LATIN1 = (b"k2", b'{"id": "u1", "text": "caf\xe9 cr\xe8me"}')
EMPTY = (b"k5", b"")
FAILED_POST = post_bytes(7)
REPLAYABLE = [JSON_CUT, JSON_NO_KEY, LATIN1, EMPTY, FAILED_POST]


def dead_letters() -> list[tuple[bytes | None, bytes | None]]:
    """Dead-letter records as the worker writes them (key = the original key)."""
    truncated = letter("invalid_json", b'{"id": "t1", "text": "' + b"x" * 200, b"k3", 16)
    tampered = letter("blank_text", b'{"id": "s1", "text": "hello"}', b"k6")
    tampered["payload"]["data"] = tampered["payload"]["data"].replace("hello", "jello")
    base64_letter = letter("invalid_utf8", LATIN1[1], LATIN1[0])
    assert base64_letter["payload"]["encoding"] == "base64"  # the premise of that case
    assert truncated["payload"]["truncated"] is True
    events = [
        (JSON_CUT[0], letter("invalid_json", JSON_CUT[1], JSON_CUT[0])),
        (JSON_NO_KEY[0], letter("invalid_json", JSON_NO_KEY[1], None)),
        (LATIN1[0], base64_letter),
        (b"k3", truncated),
        (b"k4", letter("tombstone", None, b"k4")),
        (EMPTY[0], letter("empty_message", EMPTY[1], EMPTY[0])),
        (FAILED_POST[0], letter("processing_error", FAILED_POST[1], FAILED_POST[0])),
        (b"k6", tampered),
    ]
    records: list[tuple[bytes | None, bytes | None]] = [(k, orjson.dumps(e)) for k, e in events]
    records.append((b"k7", b"this is not a dead letter"))
    return records


def settings_for(kafka: KafkaCluster, topics: Topics) -> WorkerSettings:
    return WorkerSettings.from_layers(
        {
            "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
            "topics": topics.settings_dict(),
        },
        {},
    )


async def prepare(kafka: KafkaCluster, topics: Topics) -> None:
    await make_topics(kafka, topics)
    await produce(kafka.bootstrap_servers, topics.dead_letter, dead_letters())


async def pairs(kafka: KafkaCluster, topic: str, expect: int) -> list[tuple[Any, Any]]:
    records = await read_all(kafka.bootstrap_servers, topic, expect=expect, idle_s=2)
    return sorted(((r.key, r.value) for r in records), key=repr)


def expected(*originals: tuple[bytes | None, bytes]) -> list[tuple[Any, Any]]:
    return sorted(originals, key=repr)


def cli_env(topics: Topics) -> dict[str, str]:
    return {
        "EMOWORKER_TOPICS__INPUT": topics.input,
        "EMOWORKER_TOPICS__DEAD_LETTER": topics.dead_letter,
    }


@pytest.mark.kafka
async def test_replay_publishes_the_original_bytes_and_keys(
    kafka: KafkaCluster, topics: Topics
) -> None:
    await prepare(kafka, topics)
    report = await replay_dead_letters(settings_for(kafka, topics))

    assert (report.source_topic, report.target_topic) == (topics.dead_letter, topics.input)
    assert report.partitions == 2
    assert report.read == 9
    assert report.replayed == 5
    assert report.not_selected == 0
    assert report.skipped == {
        "truncated": 1,
        "no_payload": 1,
        "sha256_mismatch": 1,
        "unreadable_letter": 1,
    }
    kinds = {k: (c.read, c.replayed, c.skipped, c.not_selected) for k, c in report.by_kind.items()}
    assert kinds == {
        "invalid_json": (3, 2, 1, 0),
        "invalid_utf8": (1, 1, 0, 0),
        "tombstone": (1, 0, 1, 0),
        "empty_message": (1, 1, 0, 0),
        "processing_error": (1, 1, 0, 0),
        "blank_text": (1, 0, 1, 0),
        "unknown": (1, 0, 1, 0),
    }
    assert await pairs(kafka, topics.input, 5) == expected(*REPLAYABLE)
    # the dead-letter topic is only read
    assert len(await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=9)) == 9


@pytest.mark.kafka
async def test_replay_kind_filter_to_another_topic_and_limit(
    kafka: KafkaCluster, topics: Topics
) -> None:
    await prepare(kafka, topics)
    settings = settings_for(kafka, topics)
    report = await replay_dead_letters(
        settings, kinds={"invalid_utf8", "processing_error"}, to_topic=topics.review
    )
    assert report.target_topic == topics.review
    assert report.read == 9
    assert report.replayed == 2
    assert report.skipped == {"unreadable_letter": 1}  # its kind is unknown: always reported
    assert report.not_selected == 6
    assert report.by_kind["invalid_json"].not_selected == 3
    assert await pairs(kafka, topics.review, 2) == expected(LATIN1, FAILED_POST)
    assert await read_all(kafka.bootstrap_servers, topics.input, idle_s=2) == []

    limited = await replay_dead_letters(settings, limit=2)
    assert limited.replayed == 2
    assert limited.limit_reached is True
    assert limited.read < 9
    replayed = await pairs(kafka, topics.input, 2)
    assert len(replayed) == 2
    assert set(replayed) <= set(REPLAYABLE)


@pytest.mark.kafka
async def test_replay_of_a_missing_topic_is_a_clear_error(
    kafka: KafkaCluster, topics: Topics
) -> None:
    settings = settings_for(kafka, topics)  # topics not created
    with pytest.raises(ReplayError, match=f"dead-letter topic '{topics.dead_letter}' does not"):
        await replay_dead_letters(settings)
    await make_topics(kafka, topics)
    with pytest.raises(ReplayError, match="target topic 'no-such-topic-here' does not exist"):
        await replay_dead_letters(settings, to_topic="no-such-topic-here")


@pytest.mark.kafka
def test_cli_dry_run_counts_and_publishes_nothing(kafka: KafkaCluster, topics: Topics) -> None:
    asyncio.run(prepare(kafka, topics))
    result = CliRunner().invoke(
        app,
        ["replay", "--dry-run", "--bootstrap-servers", kafka.bootstrap_servers],
        env=cli_env(topics),
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"read: 9 dead letters from {topics.dead_letter}" in lines
    assert f"would replay: 5 to {topics.input}" in lines
    assert "dry run: nothing was published" in lines
    assert "skipped: 4" in lines
    for reason in ("truncated", "no_payload", "sha256_mismatch", "unreadable_letter"):
        assert f"  skipped {reason}: 1" in lines
    assert asyncio.run(read_all(kafka.bootstrap_servers, topics.input, idle_s=2)) == []


@pytest.mark.kafka
def test_cli_kind_filter_replays_only_those_kinds(kafka: KafkaCluster, topics: Topics) -> None:
    asyncio.run(prepare(kafka, topics))
    result = CliRunner().invoke(
        app,
        ["replay", "--kind", "invalid_json", "--kind", "tombstone"],
        env=cli_env(topics) | {"EMOWORKER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers},
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"replayed: 2 to {topics.input}" in lines
    assert "not selected: 4" in lines
    assert "skipped: 3" in lines
    assert "  skipped truncated: 1" in lines
    assert "  skipped no_payload: 1" in lines
    assert "  skipped unreadable_letter: 1" in lines
    assert asyncio.run(pairs(kafka, topics.input, 2)) == expected(JSON_CUT, JSON_NO_KEY)


@pytest.mark.kafka
def test_cli_errors_are_one_line(kafka: KafkaCluster, topics: Topics) -> None:
    runner = CliRunner()
    bad_kind = runner.invoke(app, ["replay", "--kind", "nonsense"], env=cli_env(topics))
    assert bad_kind.exit_code == 1
    assert bad_kind.stderr.startswith("error: unknown dead-letter kind 'nonsense'")
    assert bad_kind.stderr.count("\n") == 1
    missing = runner.invoke(
        app,
        ["replay", "--bootstrap-servers", kafka.bootstrap_servers],
        env=cli_env(topics),  # topics not created
    )
    assert missing.exit_code == 1
    assert missing.stderr == f"error: dead-letter topic '{topics.dead_letter}' does not exist\n"
    assert missing.stdout == ""


# -- restoring one letter, no broker ------------------------------------------------------------


def test_restore_rejects_anything_but_the_exact_original() -> None:
    good = letter("invalid_json", b"{oops", b"key")
    assert restore_message(orjson.dumps(good)).value == b"{oops"
    assert restore_message(orjson.dumps(good)).key == b"key"

    bad_base64 = letter("invalid_utf8", b"\xff\xfe", None)
    bad_base64["payload"]["data"] = "***"
    assert restore_message(orjson.dumps(bad_base64)).skip_reason == "bad_payload"

    wrong_size = letter("invalid_json", b"{oops", None)
    wrong_size["payload"]["data"] = "{oop"
    assert restore_message(orjson.dumps(wrong_size)).skip_reason == "size_mismatch"

    bad_key = dict(good, key_base64="not base64!")
    assert restore_message(orjson.dumps(bad_key)).skip_reason == "bad_key"

    no_hash = letter("invalid_json", b"{oops", None)
    no_hash["payload"]["sha256"] = None  # an older writer: size still checked, bytes replayed
    assert restore_message(orjson.dumps(no_hash)).value == b"{oops"

    assert restore_message(None).skip_reason == "unreadable_letter"
    assert restore_message(b'{"error": {}}').skip_reason == "unreadable_letter"
    assert base64.b64decode(good["key_base64"]) == b"key"
