"""Publishing outputs with bounded retries.

aiokafka already retries inside one request timeout; a broker restart or a leader move can take
longer. ``Publisher.confirm`` re-sends what failed with backoff until ``delivery_timeout_s`` has
passed, then raises ``DeliveryFailed``: the worker stops consuming rather than committing past a
result it could not publish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)

log = structlog.get_logger(__name__)

NOT_RETRIABLE: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    AuthenticationFailedError,
)


@dataclass
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes
    kind: str  # "enriched", "review" or a dead-letter kind (for metrics)


class DeliveryFailed(Exception):
    def __init__(self, topic: str, waited_s: float, cause: BaseException) -> None:
        super().__init__(f"{topic}: {type(cause).__name__}: {cause}")
        self.topic, self.waited_s, self.cause = topic, waited_s, cause


def is_auth_error(exc: BaseException) -> bool:
    auth_types = (AuthenticationFailedError, IllegalSaslStateError, UnsupportedSaslMechanismError)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, auth_types):
            return True
        text = str(current).lower()
        if "authentication" in text or "sasl" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        delivery_timeout_s: float,
        on_retry: Callable[[], Any] | None = None,
    ) -> None:
        self.producer = producer
        self.delivery_timeout_s = delivery_timeout_s
        self.on_retry = on_retry

    async def send_all(self, records: list[OutputRecord]) -> list[asyncio.Future[Any]]:
        """Hand every record to the producer; returns one delivery future per record."""
        futures: list[asyncio.Future[Any]] = []
        for record in records:
            futures.append(await self._send(record))
        return futures

    async def _send(self, record: OutputRecord) -> asyncio.Future[Any]:
        try:
            return await self.producer.send(record.topic, record.value, key=record.key)
        except KafkaError as exc:  # e.g. metadata not available yet: report through the future
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def confirm(
        self,
        records: list[OutputRecord],
        futures: list[asyncio.Future[Any]],
        retry: bool = True,
    ) -> None:
        """Wait for every acknowledgement, re-sending failures until the delivery timeout."""
        started = time.monotonic()
        delay = 0.2
        pending = list(zip(records, futures, strict=True))
        while pending:
            results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
            failed = [
                (record, result)
                for (record, _), result in zip(pending, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if not failed:
                return
            record, error = failed[0]
            waited = time.monotonic() - started
            if not retry or isinstance(error, NOT_RETRIABLE) or waited > self.delivery_timeout_s:
                raise DeliveryFailed(record.topic, waited, error)
            log.warning(
                "publish failed; retrying",
                topic=record.topic,
                failed=len(failed),
                error=f"{type(error).__name__}: {error}",
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            pending = []
            for record, _ in failed:
                if self.on_retry is not None:
                    self.on_retry()
                pending.append((record, await self._send(record)))
