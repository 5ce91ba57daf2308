"""Which Kafka cluster the tests talk to, plus small topic helpers.

Order (first match wins):

1. ``KAFKA_BOOTSTRAP_SERVERS`` is set: use that cluster as is ("external"; the tests cannot
   restart or kill it, so chaos tests should skip);
2. a Docker engine answers ``docker info`` within ~5 s: a testcontainers ``KafkaContainer`` in
   KRaft mode ("testcontainers"; image from ``KAFKA_TEST_IMAGE``, default below);
3. otherwise: :class:`worker.devtools.local_broker.LocalKafka`, a JVM started from jars fetched
   with Maven ("local"; ``broker`` is set so chaos tests can restart or kill it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from worker.devtools.local_broker import LocalKafka

ClusterKind = Literal["external", "testcontainers", "local"]

# KafkaContainer.with_kraft() needs Confluent Platform >= 7.0.
DEFAULT_TESTCONTAINERS_IMAGE = "confluentinc/cp-kafka:7.6.0"


@dataclass
class KafkaCluster:
    bootstrap_servers: str
    kind: ClusterKind
    broker: LocalKafka | None = None

    def client_config(self) -> dict[str, Any]:
        """aiokafka keyword arguments (SASL included when the local broker uses it)."""
        if self.broker is not None:
            return self.broker.client_config()
        return {"bootstrap_servers": self.bootstrap_servers}


def docker_available(timeout: float = 5.0) -> bool:
    """True when a Docker engine answers ``docker info`` within ``timeout`` seconds."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run([docker, "info"], capture_output=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return result.returncode == 0


@contextmanager
def kafka_cluster() -> Iterator[KafkaCluster]:
    """Yield a usable cluster (see the module docstring for the order) and clean it up."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield KafkaCluster(bootstrap_servers=external, kind="external")
        return

    if docker_available():
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.10
            from testcontainers.kafka import KafkaContainer

        image = os.environ.get("KAFKA_TEST_IMAGE", DEFAULT_TESTCONTAINERS_IMAGE)
        with KafkaContainer(image).with_kraft() as container:
            yield KafkaCluster(
                bootstrap_servers=container.get_bootstrap_server(), kind="testcontainers"
            )
        return

    with LocalKafka() as broker:
        yield KafkaCluster(bootstrap_servers=broker.bootstrap_servers, kind="local", broker=broker)


def unique_topic(prefix: str = "test") -> str:
    """A topic name no other test (or earlier run against the same cluster) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
    **client_kwargs: Any,
) -> None:
    """Create topics (existing ones are fine) and wait until every partition has a leader.

    ``client_kwargs`` go to ``AIOKafkaAdminClient`` (e.g. ``security_protocol``, ``sasl_*``).
    """
    from worker.kafka.admin import ensure_topics

    await ensure_topics(
        {"bootstrap_servers": bootstrap, **client_kwargs},
        list(names),
        partitions,
        replication_factor,
        timeout_s=timeout_s,
    )
