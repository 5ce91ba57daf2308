"""From one consumed message to the records the worker publishes for it.

A valid post gives its enriched event and, when routed, its review request (or, flagged out of
distribution under ``ood.action=topic``, its enriched event again on the unsupported topic); a
message that cannot be processed gives one dead letter. Every record carries the message's
propagated headers (``kafka/headers.py``). An output that fails for reasons of that message
alone becomes a dead letter instead, and the offset advances like any other:

* ``output_too_large``: an event larger than its topic accepts (``max.message.bytes``, read at
  start-up: ``kafka/topic_limits.py``); the message's other outputs are not published either;
* ``output_unserialisable``: an event that cannot be written as JSON.

Runs in the model thread, after routing.
"""

from __future__ import annotations

import orjson
import structlog

from worker.decoding import DecodeFailure
from worker.inbound import Inbound
from worker.kafka.delivery import OutputRecord
from worker.kafka.headers import HeaderPolicy, Headers, encode_headers, headers_size
from worker.kafka.topic_limits import TopicLimits
from worker.processing import dead_letter_event
from worker.routing.router import RoutedPost
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


class OutputBuilder:
    def __init__(
        self, settings: WorkerSettings, limits: TopicLimits, headers: HeaderPolicy
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.limits = limits
        self.headers = headers

    def records(
        self, item: Inbound, routed: RoutedPost | None, added_headers: Headers = ()
    ) -> list[OutputRecord]:
        """The records of one message: ``routed`` for a valid post, else its dead letter."""
        headers = self.headers.outgoing(item.headers, added_headers)
        if item.failure is not None or routed is None:
            failure = item.failure or DecodeFailure("processing_error", "the post was not routed")
            return [self.dead_letter(item, failure, headers)]
        key = routed.post_id.encode("utf-8")
        item.ood = routed.ood
        try:
            records = [
                OutputRecord(
                    self.topics.enriched, key, routed.enriched_bytes(), "enriched", headers
                )
            ]
            review = routed.review_bytes()
        except (TypeError, orjson.JSONEncodeError) as exc:
            failure = DecodeFailure(
                "output_unserialisable",
                f"the post's event cannot be written as JSON ({type(exc).__name__}: {exc})"[:500],
            )
            item.failure = failure  # the message's outcome, for its log line
            return [self.dead_letter(item, failure, headers)]
        if review is not None:
            records.append(OutputRecord(self.topics.review, key, review, "review", headers))
        if routed.unsupported:
            records.append(
                OutputRecord(self.topics.unsupported, key, records[0].value, "unsupported", headers)
            )
        too_large = self._too_large(records)
        if too_large is not None:
            item.failure = too_large
            return [self.dead_letter(item, too_large, headers)]
        return records

    def _too_large(self, records: list[OutputRecord]) -> DecodeFailure | None:
        parts = []
        for record in records:
            limit = self.limits.limit_of(record.topic)
            size = self.limits.record_bytes(record.key, record.value, record.headers)
            if limit is not None and size > limit:
                parts.append(
                    f"its {record.kind} event would be a record of {size:,} bytes; topic "
                    f"{record.topic!r} accepts at most {limit:,} (max.message.bytes)"
                )
        if not parts:
            return None
        return DecodeFailure("output_too_large", "; ".join(parts))

    def dead_letter(self, item: Inbound, failure: DecodeFailure, headers: Headers) -> OutputRecord:
        """The dead letter of ``item``, a record with ``headers``: its input headers are kept in
        the JSON when they fit in ``dead_letter_payload_bytes`` (replay restores them)."""
        s = self.settings
        kept = item.headers if headers_size(item.headers) <= s.dead_letter_payload_bytes else None
        letter = dead_letter_event(
            failure,
            item.value,
            item.source(),
            item.key,
            s.worker_id,
            s.dead_letter_payload_bytes,
            headers=None if kept is None else encode_headers(kept),
        )
        return OutputRecord(
            self.topics.dead_letter, item.key, orjson.dumps(letter), failure.kind, headers
        )
