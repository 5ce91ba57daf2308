"""What one message becomes on the wire, without a broker: free-form fields bounded at decoding,
headers kept or dropped as configured, an event too large for its topic or not serialisable
turned into a dead letter of its own kind, and the start-up check of the topics' limits."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from schemas import SCHEMA_VERSION, DeadLetter, SocialPost
from worker.decoding import DecodeFailure, DecodeLimits, decode_post
from worker.inbound import Inbound
from worker.kafka.headers import (
    MAX_REMEMBERED,
    OWN_HEADERS,
    HeaderPolicy,
    decode_headers,
    encode_headers,
)
from worker.kafka.topic_limits import (
    LimitsTooSmall,
    TopicLimits,
    check_limits,
    largest_post_bytes,
)
from worker.outputs import OutputBuilder
from worker.routing.router import RoutedPost
from worker.settings import HeaderSettings, WorkerSettings

SETTINGS = WorkerSettings(worker_id="w1")
TOPICS = SETTINGS.topics


def message(post: SocialPost | None, headers: list[tuple[str, bytes | None]]) -> Inbound:
    value = b"{}" if post is None else post.model_dump_json().encode()
    failure = DecodeFailure("invalid_json", "bad") if post is None else None
    return Inbound(TopicPartition("posts", 0), 7, 1, None, b"key", value, post, failure, headers)


def routed(post: SocialPost, size: int = 10, review: bool = True) -> RoutedPost:
    enriched = {"id": post.id, "blob": "e" * size}
    return RoutedPost(post.id, enriched, {"id": post.id, "blob": "r" * size} if review else None)


def builder(limits: dict[str, int] | None = None, **headers: Any) -> OutputBuilder:
    policy = HeaderPolicy(HeaderSettings(**headers), SETTINGS.max_passthrough_bytes)
    return OutputBuilder(SETTINGS, TopicLimits(limits or {}), policy)


POST = SocialPost(id="p1", text="hello")


# ── free-form fields ─────────────────────────────────────────────────────────────────────────


def test_free_form_fields_over_the_limit_are_replaced_largest_first() -> None:
    doc = {
        "id": "p",
        "text": "hi",
        "metadata": {"blob": "m" * 50_000},
        "extra_small": "s" * 100,
        "extra_big": ["b" * 30_000],
    }
    post = decode_post(orjson.dumps(doc), DecodeLimits(max_passthrough_bytes=40_000))
    assert isinstance(post, SocialPost)
    metadata_size = len(orjson.dumps(doc["metadata"]))
    assert post.metadata == {"_dropped": {"size_bytes": metadata_size, "limit_bytes": 40_000}}
    # what is left fits: the next largest stays
    assert post.model_extra == {"extra_small": "s" * 100, "extra_big": ["b" * 30_000]}
    assert post.text == "hi"


def test_all_free_form_fields_go_when_even_the_next_ones_do_not_fit() -> None:
    doc = {"id": "p", "text": "hi", "metadata": {"a": "m" * 3_000}, "extra": "e" * 3_000}
    post = decode_post(orjson.dumps(doc), DecodeLimits(max_passthrough_bytes=1_000))
    assert isinstance(post, SocialPost)
    assert post.metadata == {"_dropped": {"size_bytes": 3_008, "limit_bytes": 1_000}}
    assert post.model_extra == {"extra": {"_dropped": {"size_bytes": 3_002, "limit_bytes": 1_000}}}


def test_a_message_under_the_limit_is_never_measured() -> None:
    doc = {"id": "p", "text": "hi", "metadata": {"a": "x" * 500}}
    post = decode_post(orjson.dumps(doc), DecodeLimits(max_passthrough_bytes=600))
    assert isinstance(post, SocialPost) and post.metadata == {"a": "x" * 500}


def test_named_fields_are_bounded_by_the_schema() -> None:
    failure = decode_post(
        orjson.dumps({"id": "p", "text": "hi", "author": "a" * 513}), DecodeLimits()
    )
    assert isinstance(failure, DecodeFailure)
    assert (failure.kind, failure.field) == ("invalid_field", "author")


# ── headers ──────────────────────────────────────────────────────────────────────────────────


def test_headers_propagate_by_pattern_and_the_worker_sets_its_own() -> None:
    policy = HeaderPolicy(HeaderSettings(propagate=["x-*", "tenant"], drop=["x-secret*"]), 1_000)
    incoming = [
        ("tenant", b"acme"),
        ("X-Request-Id", b"r1"),
        ("x-secret-token", b"hush"),
        ("other", b"o"),
        ("Content-Type", b"text/plain"),
        ("traceparent", b"00-a-b-01"),
    ]
    assert policy.outgoing(incoming) == [("tenant", b"acme"), ("X-Request-Id", b"r1"), *OWN_HEADERS]
    assert [
        ("content-type", b"application/json"),
        ("schema-version", SCHEMA_VERSION.encode()),
    ] == OWN_HEADERS


def test_by_default_every_header_propagates_except_a_replaced_trace() -> None:
    incoming = [("traceparent", b"00-a-b-01"), ("tenant", b"acme")]
    assert HeaderPolicy(HeaderSettings(), 1_000).outgoing(incoming) == [*incoming, *OWN_HEADERS]
    traced = HeaderPolicy(HeaderSettings(), 1_000, replace_trace=True)
    added = [("traceparent", b"00-c-d-01")]
    assert traced.outgoing(incoming, added) == [("tenant", b"acme"), *added, *OWN_HEADERS]


def test_the_remembered_decisions_stay_bounded() -> None:
    policy = HeaderPolicy(HeaderSettings(drop=["x-*"]), 1_000)
    for i in range(3 * MAX_REMEMBERED):
        assert policy.keeps(f"name-{i}") and not policy.keeps(f"x-{i}")
    assert len(policy._kept) <= MAX_REMEMBERED


def test_headers_larger_than_the_limit_are_left_out_whole() -> None:
    policy = HeaderPolicy(HeaderSettings(), max_bytes=100)
    assert policy.outgoing([("a", b"x" * 60), ("b", b"y" * 60)]) == OWN_HEADERS


def test_settings_take_comma_separated_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOWORKER_HEADERS__PROPAGATE", "tenant, x-*")
    monkeypatch.setenv("EMOWORKER_HEADERS__DROP", "")
    settings = WorkerSettings()
    assert settings.headers.propagate == ["tenant", "x-*"] and settings.headers.drop == []


def test_header_values_round_trip_through_base64() -> None:
    headers: list[tuple[str, bytes | None]] = [("b", b"\xff\x00"), ("n", None), ("b", b"2")]
    encoded = encode_headers(headers)
    assert encoded[0].value_base64 == base64.b64encode(b"\xff\x00").decode()
    assert decode_headers(encoded) == headers


# ── outputs ──────────────────────────────────────────────────────────────────────────────────


def test_a_post_gives_its_events_with_the_propagated_headers() -> None:
    records = builder().records(message(POST, [("tenant", b"acme")]), routed(POST))
    assert [(r.topic, r.kind, r.key) for r in records] == [
        (TOPICS.enriched, "enriched", b"p1"),
        (TOPICS.review, "review", b"p1"),
    ]
    assert all(r.headers == [("tenant", b"acme"), *OWN_HEADERS] for r in records)


def test_an_event_larger_than_its_topic_accepts_becomes_one_dead_letter() -> None:
    limits = {TOPICS.enriched: 5_000, TOPICS.review: 1_000_000}
    item = message(POST, [("tenant", b"acme")])
    [record] = builder(limits).records(item, routed(POST, size=6_000))
    assert (record.topic, record.kind, record.key) == (
        TOPICS.dead_letter,
        "output_too_large",
        b"key",
    )
    assert record.headers == [("tenant", b"acme"), *OWN_HEADERS]
    letter = DeadLetter.model_validate_json(record.value)
    assert letter.error.kind == "output_too_large"
    size = (
        96
        + len(orjson.dumps(routed(POST, size=6_000).enriched))
        + 2
        + sum(len(k) + len(v) + 2 for k, v in record.headers)
    )
    assert letter.error.message == (
        f"its enriched event would be a record of {size:,} bytes; topic "
        f"'{TOPICS.enriched}' accepts at most 5,000 (max.message.bytes)"
    )
    assert letter.source.offset == 7  # type: ignore[union-attr]
    assert letter.headers is not None and decode_headers(letter.headers) == [("tenant", b"acme")]


def test_an_event_that_fits_is_published_at_the_limit() -> None:
    records = builder({TOPICS.enriched: 1_000, TOPICS.review: 1_000}).records(
        message(POST, []), routed(POST, size=500)
    )
    assert [r.kind for r in records] == ["enriched", "review"]


def test_an_unserialisable_event_becomes_a_dead_letter() -> None:
    event = routed(POST)
    event.enriched["bad"] = {1: object()}
    [record] = builder().records(message(POST, []), event)
    letter = DeadLetter.model_validate_json(record.value)
    assert (record.kind, letter.error.kind) == ("output_unserialisable", "output_unserialisable")
    assert letter.error.message.startswith("the post's event cannot be written as JSON")


def test_a_bad_message_becomes_a_dead_letter_keeping_every_header() -> None:
    headers: list[tuple[str, bytes | None]] = [("x-secret", b"s"), ("tenant", b"t")]
    [record] = builder(drop=["x-secret"]).records(message(None, headers), None)
    assert record.headers == [("tenant", b"t"), *OWN_HEADERS]
    letter = DeadLetter.model_validate_json(record.value)
    assert letter.error.kind == "invalid_json"
    assert letter.headers is not None and decode_headers(letter.headers) == headers


# ── the topics' limits at start-up ───────────────────────────────────────────────────────────


def test_limits_too_small_for_an_ordinary_post_refuse_to_start() -> None:
    limits = TopicLimits({TOPICS.enriched: 8_000, TOPICS.review: 1_048_588})
    with pytest.raises(LimitsTooSmall, match="accepts records of at most 8,000 bytes"):
        check_limits(limits, SETTINGS, 28)


def test_limits_below_the_largest_event_warn_per_topic() -> None:
    largest = largest_post_bytes(SETTINGS)
    assert largest == 40_000 * 6 + 4 * 512 * 6 + 65_536 + 256
    limits = TopicLimits({TOPICS.enriched: 100_000, TOPICS.review: 1_048_588})
    [warning] = check_limits(limits, SETTINGS, 28)
    assert f"topic '{TOPICS.enriched}' accepts records of at most 100,000 bytes" in warning
    assert check_limits(TopicLimits({TOPICS.enriched: 1_048_588}), SETTINGS, 28) == []
    assert check_limits(TopicLimits(), SETTINGS, 28) == []  # unknown limits: nothing to say


def test_the_default_limits_fit_the_broker_default() -> None:
    """With the default settings the largest event fits Kafka's default max.message.bytes."""
    broker_default = 1_048_588
    assert check_limits(TopicLimits({TOPICS.enriched: broker_default}), SETTINGS, 28) == []


def test_the_fullest_event_beside_its_post_stays_under_the_estimate() -> None:
    """Every label watch-listed and near its threshold, every rule on, the post flagged out of
    distribution, the longest model name, topic and worker id: the enriched event and the review
    request, less the post itself, stay under ``event_overhead_bytes`` (the limits' estimate)."""
    import numpy as np

    from schemas.labels import GOEMOTIONS_LABELS
    from worker.inference.uncertainty import McSummary
    from worker.kafka.topic_limits import event_overhead_bytes
    from worker.ood.calibration import Reference
    from worker.ood.scorer import OodBatch
    from worker.routing.policy import ReviewPolicy
    from worker.routing.router import Router
    from worker.settings import OodSettings, ReviewSettings

    labels, n = list(GOEMOTIONS_LABELS), len(GOEMOTIONS_LABELS)
    thresholds = np.full(n, 0.5)
    summary = McSummary(
        mean=np.full((1, n), 0.4987654321),
        std=np.full((1, n), 0.1234567891),
        n_samples=np.array([30]),
        predictive_entropy=np.array([19.123456789]),
        expected_entropy=np.array([18.123456789]),
        mutual_information=np.array([1.123456789]),
        flip_rate=np.full((1, n), 0.4123),
    )
    signals = {k: np.array([123456.123456]) for k in ("language", "density", "tokens_per_word")}
    ood = OodBatch(
        signals=signals | {"unknown_share": np.array([0.123456])},
        z={"language": np.array([99999.0])},
        score=np.array([99999.123456]),
        flagged=np.array([True]),
        fired=["language"],
        languages=None,
        cut=1.2345678,
        references={"language": Reference(0.0, 1.0)},
        supported_languages=("en",),
    )
    review = ReviewSettings(
        target_rate=None, watch_labels=labels, epistemic_cut=0.01, low_confidence_neutral=0.9
    )
    policy = ReviewPolicy(review, labels, thresholds, ood=OodSettings(max_per_minute=None))
    model = {
        "name": "m" * 512,
        "revision": "sha256:" + "a" * 64,
        "n_samples": 30,
        "mc_mode": "full",
        "precision": "bf16",
    }
    router = Router(policy, labels, thresholds, model, "w" * 128)
    post = SocialPost(id="p", text="x")
    source = {"topic": "t" * 249, "partition": 99999, "offset": 10**18, "timestamp_ms": 10**13}
    [routed] = router.route([post], [source], summary, ood, [128])
    review_bytes = routed.review_bytes()
    assert review_bytes is not None
    post_bytes = len(orjson.dumps(post.model_dump(mode="json")))
    for value in (routed.enriched_bytes(), review_bytes):
        assert len(value) - post_bytes < event_overhead_bytes(n)
