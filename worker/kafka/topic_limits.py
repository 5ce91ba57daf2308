"""How large a record each output topic accepts, and whether the worker's events fit.

A topic rejects a record batch larger than its ``max.message.bytes``. The worker reads that limit
for its output topics at start-up (``admin.read_topic_limits``: describe-configs) and:

* refuses to start when an event of an ordinary post cannot fit (every post would be dead-lettered:
  a configuration error);
* warns when the largest event the input limits allow cannot fit (those rare posts become
  ``output_too_large`` dead letters, with the size and the limit in the message);
* checks every output record against it before publishing (``outputs.py``), so one oversized
  message never reaches the broker, let alone stops its partition; and never makes a producer
  batch larger than it (``delivery.py``).

The check must come first: with an idempotent producer, a batch the broker rejects as too large
breaks the partition's sequence, and every later batch to it fails (OutOfOrderSequenceNumber). The
limit is read once: a limit lowered while the worker runs makes the broker reject, and the worker
stops (exit 3) without committing past it; the next start reads the new limit and dead-letters
that output. A limit raised later takes effect at the next start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.events import MAX_ID_CHARS
from worker.kafka.headers import headers_size
from worker.settings import WorkerSettings

# a record batch's header (61 bytes) and one record's framing (varints, attributes, offsets)
RECORD_OVERHEAD_BYTES = 96
# JSON writes a control character of a text as \\u00XX: six bytes; any other character takes at
# most four bytes of UTF-8
JSON_BYTES_PER_CHAR = 6
# an event's own fields beside the post: per label its emotions entry (~130 bytes), the label in
# predicted_labels and review reasons; plus model, uncertainty, source, ids and timestamps
EVENT_BYTES_PER_LABEL = 256
EVENT_FIXED_BYTES = 4096
# an ordinary post's text, in characters: an event that cannot hold one is a configuration error
ORDINARY_TEXT_CHARS = 1_000


@dataclass
class TopicLimits:
    """The largest record (key, value and headers) each topic accepts; a topic missing from
    ``max_bytes`` is not checked here (the broker still is)."""

    max_bytes: dict[str, int] = field(default_factory=dict)

    def record_bytes(
        self, key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes | None]]
    ) -> int:
        key_bytes = len(key) if key else 0
        return RECORD_OVERHEAD_BYTES + len(value) + key_bytes + headers_size(headers)

    def limit_of(self, topic: str) -> int | None:
        return self.max_bytes.get(topic)


def event_overhead_bytes(n_labels: int) -> int:
    """An upper estimate of an event's bytes beside its post."""
    return EVENT_FIXED_BYTES + EVENT_BYTES_PER_LABEL * n_labels


def largest_post_bytes(settings: WorkerSettings) -> int:
    """The most bytes a post can take inside an event: its text (``max_text_chars``), its id and
    named fields (at most ``MAX_ID_CHARS`` each), its free-form fields (``max_passthrough_bytes``),
    and never more than the input message itself may be (``max_message_bytes``)."""
    named = 4 * MAX_ID_CHARS * JSON_BYTES_PER_CHAR  # id, author, platform, lang
    bounded = (
        settings.max_text_chars * JSON_BYTES_PER_CHAR
        + named
        + settings.max_passthrough_bytes
        + 256  # field names, created_at, schema_version
    )
    return min(bounded, settings.max_message_bytes + 256)


class LimitsTooSmall(Exception):
    """An output topic cannot hold the event of an ordinary post."""


def check_limits(limits: TopicLimits, settings: WorkerSettings, n_labels: int) -> list[str]:
    """Warnings for topics whose limit cannot hold the largest event the input limits allow;
    raises ``LimitsTooSmall`` when one cannot hold the event of an ordinary post."""
    overhead = event_overhead_bytes(n_labels)
    ordinary = overhead + ORDINARY_TEXT_CHARS * 4 + 2 * MAX_ID_CHARS + RECORD_OVERHEAD_BYTES
    largest = overhead + largest_post_bytes(settings) + RECORD_OVERHEAD_BYTES
    warnings: list[str] = []
    for topic in (settings.topics.enriched, settings.topics.review, settings.topics.unsupported):
        limit = limits.limit_of(topic)
        if limit is None:
            continue
        if limit < ordinary:
            raise LimitsTooSmall(
                f"topic {topic!r} accepts records of at most {limit:,} bytes "
                f"(max.message.bytes); the event of an ordinary post needs about {ordinary:,}: "
                "raise the topic's max.message.bytes"
            )
        if limit < largest:
            warnings.append(
                f"topic {topic!r} accepts records of at most {limit:,} bytes "
                f"(max.message.bytes), but the input limits allow events of up to {largest:,} "
                "bytes: larger events are dead-lettered as output_too_large; raise the topic's "
                "max.message.bytes or lower EMOWORKER_MAX_TEXT_CHARS / "
                "EMOWORKER_MAX_PASSTHROUGH_BYTES"
            )
    return warnings
