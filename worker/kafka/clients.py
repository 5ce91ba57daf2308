"""aiokafka clients built from the settings: connection, security and tuning in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from worker.kafka.delivery import is_auth_error
from worker.settings import KafkaSettings


class _RetriedErrorsAsWarnings(logging.Filter):
    """aiokafka logs at ERROR some failures it then retries by itself (a broker restarting, a
    coordinator not loaded yet) or that it raises to the worker, which retries or stops with one
    clear error of its own: those lines become warnings, so ERROR means the worker gave up."""

    RETRIED = (
        "Unable connect to",
        "Unable to update metadata from",
        "Group Coordinator Request failed",
        "Heartbeat send request failed",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith(self.RETRIED):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


for _name in ("aiokafka", "aiokafka.consumer.group_coordinator"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _RetriedErrorsAsWarnings) for f in _logger.filters):
        _logger.addFilter(_RetriedErrorsAsWarnings())


def connection_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """bootstrap servers, client id, TLS and SASL options for any aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
        "retry_backoff_ms": kafka.retry_backoff_ms,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = create_ssl_context(
            cafile=kafka.ssl_cafile,
            certfile=kafka.ssl_certfile,
            keyfile=kafka.ssl_keyfile,
            password=kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None,
        )
        context.check_hostname = kafka.ssl_check_hostname
        kwargs["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
        )
    return kwargs


def build_consumer(
    kafka: KafkaSettings, group_id: str, max_poll_records: int, **overrides: Any
) -> AIOKafkaConsumer:
    """A group consumer with manual commits, reading only committed upstream transactions."""
    kwargs = connection_kwargs(kafka) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": max_poll_records,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "fetch_max_bytes": kafka.fetch_max_bytes,
        "max_partition_fetch_bytes": kafka.max_partition_fetch_bytes,
    }
    return AIOKafkaConsumer(**(kwargs | overrides))


def build_producer(
    kafka: KafkaSettings,
    transactional_id: str | None = None,
    transaction_timeout_ms: int = 60_000,
    **overrides: Any,
) -> AIOKafkaProducer:
    """Idempotent, acks=all; transactional when ``transactional_id`` is given."""
    kwargs = connection_kwargs(kafka) | {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": kafka.producer_linger_ms,
        "max_batch_size": 256 * 1024,
        "max_request_size": kafka.producer_max_request_bytes,
        "compression_type": None
        if kafka.producer_compression == "none"
        else kafka.producer_compression,
    }
    if transactional_id:
        kwargs["transactional_id"] = transactional_id
        kwargs["transaction_timeout_ms"] = transaction_timeout_ms
    return AIOKafkaProducer(**(kwargs | overrides))


async def probe_credentials(kafka: KafkaSettings, timeout_s: float = 10.0) -> BaseException | None:
    """Connect once to each bootstrap server and log in; the first login error, else None.

    aiokafka's ``start()`` reports a rejected SASL login as ``KafkaConnectionError("Unable to
    bootstrap ...")``, like an unreachable host; this finds out which it was. Connection errors
    (host down, refused) are not login errors and give None.
    """
    kwargs = connection_kwargs(kafka)
    for host, port, _ in collect_hosts(kafka.bootstrap_servers):
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host,
                    port,
                    client_id=kafka.client_id,
                    request_timeout_ms=kafka.request_timeout_ms,
                    ssl_context=kwargs.get("ssl_context"),
                    security_protocol=kafka.security_protocol,
                    sasl_mechanism=kwargs.get("sasl_mechanism") or "PLAIN",
                    sasl_plain_username=kwargs.get("sasl_plain_username"),
                    sasl_plain_password=kwargs.get("sasl_plain_password"),
                ),
                timeout_s,
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            if is_auth_error(exc):
                return exc
            continue
        with contextlib.suppress(Exception):
            conn.close()
        return None  # logged in: whatever failed was not the credentials
    return None
