"""One consumed Kafka message, and a micro-batch of them, on their way through the worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition

from schemas import SocialPost
from worker.decoding import DecodeFailure
from worker.kafka.headers import Headers

if TYPE_CHECKING:
    from worker.kafka.delivery import OutputRecord
    from worker.tracing import BatchTrace, PostTrace, StageSpan


@dataclass
class Inbound:
    """One consumed message, decoded: ``post`` when valid, else ``failure``."""

    tp: TopicPartition
    offset: int
    epoch: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    post: SocialPost | None
    failure: DecodeFailure | None
    headers: Headers = ()
    consumed_ns: int = 0  # time.time_ns() when it was received (the start of its trace span)
    trace: PostTrace | None = None  # with tracing on
    ood: str | None = None  # flagged out of distribution: review, capped, tag or topic

    def source(self) -> dict[str, Any]:
        return {
            "topic": self.tp.topic,
            "partition": self.tp.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
        }


@dataclass
class Batch:
    """A micro-batch on its way through the stages."""

    number: int
    items: list[Inbound]
    token_ids: list[list[int]] | None = None  # None: not tokenised yet (or it failed)
    outputs: list[list[OutputRecord]] = field(default_factory=list)  # per item
    trace: BatchTrace | None = None  # with tracing on: the stages' spans are its children
    publish_span: StageSpan | None = None
    model: Any = None  # the Model that tokenises and infers it (models swap between batches)
