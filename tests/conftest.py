"""Shared fixtures: the Kafka cluster, a small real model, settings and topics per test.

The helpers tests import (``Topics``, ``make_topics``, ``running``, ``WorkerProcess``, ...) are in
``support/harness.py``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.harness import Topics
from support.kafka_cluster import KafkaCluster, kafka_cluster
from support.model_fixtures import build_test_model

from worker.inference.loading import Classifier, load_classifier
from worker.settings import ModelSettings, WorkerSettings


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaCluster]:
    """The session's Kafka: $KAFKA_BOOTSTRAP_SERVERS, else testcontainers, else a local JVM."""
    with kafka_cluster() as cluster:
        yield cluster


def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The test machine's cores are shared: one torch thread avoids OpenMP spinning on the
    small ops of these tests (measured 20x faster than two threads under load)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """Two torch threads for one test (what the engine's member threads need)."""
    yield from _torch_threads(2)


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("test-model"))


@pytest.fixture(scope="session")
def test_classifier(test_model_dir: Path) -> Classifier:
    return load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))


@pytest.fixture
def topics() -> Topics:
    tag = uuid.uuid4().hex[:10]
    return Topics(
        input=f"posts-{tag}",
        enriched=f"enriched-{tag}",
        review=f"review-{tag}",
        dead_letter=f"dlq-{tag}",
        group_id=f"group-{tag}",
    )


@pytest.fixture
def make_settings(
    kafka: KafkaCluster, topics: Topics, test_model_dir: Path
) -> Callable[..., WorkerSettings]:
    """Settings for a worker on this test's topics; keyword arguments override (nested dicts)."""

    def factory(**overrides: Any) -> WorkerSettings:
        base: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": kafka.bootstrap_servers,
                "session_timeout_ms": 10_000,
                "heartbeat_interval_ms": 1_000,
            },
            "topics": topics.settings_dict(),
            "group_id": topics.group_id,
            "model": {"path": str(test_model_dir), "n_samples": 3, "seed": 7, "device": "cpu"},
            "review": {"target_rate": 0.1, "warmup_posts": 20},
            "http_port": 0,
            "batch_size": 32,
            "batch_max_wait_ms": 50,
            "commit_interval_ms": 200,
            "log_format": "console",
        }
        return WorkerSettings.from_layers(base, overrides)

    return factory
