"""The worker's Kafka clients, connected: started once the cluster answers, with the output
topics' record limits read (``topic_limits.py``). Stages get a ``Connection`` and never see a
client that is not there."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from worker.exit_codes import EXIT_CONFIG, EXIT_KAFKA, FatalError
from worker.kafka.admin import read_topic_limits
from worker.kafka.clients import build_consumer, build_producer, probe_credentials
from worker.kafka.delivery import Publisher, is_auth_error
from worker.kafka.topic_limits import LimitsTooSmall, TopicLimits, check_limits
from worker.metrics import Metrics
from worker.settings import WorkerSettings

log = structlog.get_logger("worker.pipeline")


class Rebalance(ConsumerRebalanceListener):
    """The group's rebalance callbacks, as aiokafka calls them."""

    def __init__(
        self,
        on_revoked: Callable[[set[TopicPartition]], Awaitable[None]],
        on_assigned: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._on_revoked, self._on_assigned = on_revoked, on_assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._on_assigned(set(assigned))


@dataclass
class Connection:
    consumer: AIOKafkaConsumer
    producer: AIOKafkaProducer
    publisher: Publisher
    limits: TopicLimits

    def subscribe(self, settings: WorkerSettings, listener: ConsumerRebalanceListener) -> None:
        self.consumer.subscribe([settings.topics.input], listener=listener)
        log.info(
            "connected",
            bootstrap_servers=settings.kafka.bootstrap_servers,
            group_id=settings.group_id,
            input_topic=settings.topics.input,
            exactly_once=settings.exactly_once,
        )

    async def close(self) -> None:
        await stop_quietly(self.consumer, self.producer)


async def connect(
    settings: WorkerSettings, metrics: Metrics, stop: asyncio.Event, n_labels: int
) -> Connection | None:
    """Start producer and consumer, retrying an unreachable cluster with exponential backoff
    (up to ``kafka.startup_timeout_s``; 0: forever). None when ``stop`` is set first. Raises
    ``FatalError``: a refused login (not retried), the start-up timeout, or an output topic too
    small for any event."""
    s = settings
    delay, started = 0.5, time.monotonic()
    while not stop.is_set():
        producer = build_producer(
            s.kafka,
            transactional_id=s.effective_transactional_id() if s.exactly_once else None,
            transaction_timeout_ms=s.transaction_timeout_ms,
        )
        consumer = build_consumer(s.kafka, s.group_id, max_poll_records=max(s.batch_size * 4, 256))
        try:
            await producer.start()
            await consumer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            await stop_quietly(consumer, producer)
            await _refuse_login(s, exc)
            waited = time.monotonic() - started
            if s.kafka.startup_timeout_s and waited > s.kafka.startup_timeout_s:
                raise FatalError(
                    f"Kafka at {s.kafka.bootstrap_servers} unreachable for {waited:.0f}s",
                    EXIT_KAFKA,
                ) from exc
            log.warning(
                "Kafka not reachable yet; retrying",
                bootstrap_servers=s.kafka.bootstrap_servers,
                error=f"{type(exc).__name__}: {exc}",
                retry_in_s=round(delay, 1),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 30.0)
            continue
        try:
            limits = await output_limits(s, n_labels)
        except FatalError:
            await stop_quietly(consumer, producer)
            raise
        publisher = Publisher(
            producer,
            s.kafka.delivery_timeout_s,
            on_retry=metrics.produce_retries.inc,
            limits=limits,
        )
        return Connection(consumer, producer, publisher, limits)
    return None


async def _refuse_login(settings: WorkerSettings, exc: BaseException) -> None:
    """A rejected login looks like an unreachable cluster to aiokafka: ask once, and stop."""
    login = exc if is_auth_error(exc) else None
    if login is None and settings.kafka.security_protocol.startswith("SASL"):
        login = await probe_credentials(settings.kafka)
    if login is not None:
        raise FatalError(
            f"Kafka authentication failed ({type(login).__name__}: {login}); not "
            "retrying: check EMOWORKER_KAFKA__SASL_MECHANISM, _SASL_USERNAME and "
            "_SASL_PASSWORD",
            EXIT_KAFKA,
        ) from exc


def output_topics(settings: WorkerSettings) -> list[str]:
    """The topics the worker publishes to (the unsupported one only under ``ood.action=topic``)."""
    topics = settings.topics
    names = [topics.enriched, topics.review, topics.dead_letter]
    if settings.ood.enabled and settings.ood.action == "topic":
        names.append(topics.unsupported)
    return names


async def output_limits(settings: WorkerSettings, n_labels: int) -> TopicLimits:
    """The output topics' record limits; refuses to start when an ordinary post's event cannot
    fit, warns when the largest one the input limits allow cannot."""
    limits = await read_topic_limits(settings, output_topics(settings))
    try:
        warnings = check_limits(limits, settings, n_labels)
    except LimitsTooSmall as exc:
        raise FatalError(str(exc), EXIT_CONFIG) from exc
    for warning in warnings:
        log.warning("output topic limit", problem=warning)
    log.info("output topic limits", max_message_bytes=limits.max_bytes)
    return limits


async def stop_quietly(*clients: Any) -> None:
    for client in clients:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 10)
