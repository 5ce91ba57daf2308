"""Prometheus metrics of one worker (its own registry, so several pipelines can share a process),
and the per-outcome counts and log lines of the messages it finishes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from worker.inbound import Inbound

log = structlog.get_logger("worker.pipeline")  # the outcome lines read as the pipeline's

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.consumed = Counter(
            "emoworker_posts_consumed", "Messages read from the input topic", registry=r
        )
        self.enriched = Counter(
            "emoworker_posts_enriched", "Enriched events acknowledged by Kafka", registry=r
        )
        self.reviewed = Counter(
            "emoworker_posts_reviewed", "Review requests acknowledged by Kafka", registry=r
        )
        self.dead_lettered = Counter(
            "emoworker_posts_dead_lettered",
            "Dead letters acknowledged by Kafka",
            ["kind"],
            registry=r,
        )
        self.unsupported = Counter(
            "emoworker_posts_unsupported",
            "Events on the unsupported topic acknowledged by Kafka (ood.action topic)",
            registry=r,
        )
        self.out_of_distribution = Counter(
            "emoworker_posts_out_of_distribution",
            "Posts flagged out of distribution, by what became of them (review, capped: over "
            "ood.max_per_minute, tag, topic)",
            ["action"],
            registry=r,
        )
        self.batch_size = Histogram(
            "emoworker_batch_size", "Posts per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "emoworker_inference_seconds",
            "MC Dropout time per batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "emoworker_end_to_end_latency_seconds",
            "Input record timestamp to enriched event acknowledged",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.mc_samples = Counter(
            "emoworker_mc_samples", "MC Dropout samples drawn (posts x samples)", registry=r
        )
        self.consumer_lag = Gauge(
            "emoworker_consumer_lag",
            "Messages behind the log end, per assigned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.in_flight = Gauge(
            "emoworker_in_flight_posts", "Consumed but not yet committed-ready", registry=r
        )
        self.review_rate = Gauge(
            "emoworker_review_rate", "Share of posts routed to review so far", registry=r
        )
        self.review_target = Gauge(
            "emoworker_review_target_rate", "Configured review budget (share)", registry=r
        )
        self.commits = Counter("emoworker_commits", "Offset commits", registry=r)
        self.commit_failures = Counter(
            "emoworker_commit_failures", "Offset commits that failed (retried)", registry=r
        )
        self.produce_retries = Counter(
            "emoworker_produce_retries", "Output sends retried after an error", registry=r
        )
        self.rebalances = Counter("emoworker_rebalances", "Partition revocations seen", registry=r)
        self.ready = Gauge(
            "emoworker_ready", "1 when the model is loaded and partitions are assigned", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def record_outcome(metrics: Metrics, item: Inbound, kinds: Sequence[str], batch: int) -> None:
    """Count and log what became of one message once its outputs are acknowledged: ``kinds``
    are its records' kinds (``enriched``, ``review``, ``unsupported`` or a dead-letter kind)."""
    if item.ood is not None and item.failure is None:
        metrics.out_of_distribution.labels(action=item.ood).inc()
        log.info(
            "out of distribution",
            action=item.ood,
            post_id=item.post.id if item.post else None,
            batch=batch,
            partition=item.tp.partition,
            offset=item.offset,
        )
    for kind in kinds:
        if kind == "enriched":
            metrics.enriched.inc()
            if item.timestamp_ms:
                metrics.end_to_end_seconds.observe(max(0.0, time.time() - item.timestamp_ms / 1000))
        elif kind == "unsupported":
            metrics.unsupported.inc()
        elif kind == "review":
            metrics.reviewed.inc()
            log.info(
                "routed to review",
                post_id=item.post.id if item.post else None,
                batch=batch,
                partition=item.tp.partition,
                offset=item.offset,
            )
        else:
            metrics.dead_lettered.labels(kind=kind).inc()
            log.warning(
                "dead-lettered",
                kind=kind,
                batch=batch,
                topic=item.tp.topic,
                partition=item.tp.partition,
                offset=item.offset,
                reason=item.failure.message if item.failure else None,
            )
