"""Shared fixtures: the Kafka cluster, a small real model, settings and topics per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka_cluster import KafkaCluster, create_topics, kafka_cluster
from model_fixtures import build_test_model

from worker.inference.loading import Classifier, load_classifier
from worker.pipeline import Pipeline
from worker.settings import ModelSettings, WorkerSettings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaCluster]:
    """The session's Kafka: $KAFKA_BOOTSTRAP_SERVERS, else testcontainers, else a local JVM."""
    with kafka_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The test machine's cores are shared: one torch thread avoids OpenMP spinning on the
    small ops of these tests (measured 20x faster than two threads under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("test-model"))


@pytest.fixture(scope="session")
def test_classifier(test_model_dir: Path) -> Classifier:
    return load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))


@dataclass
class Topics:
    input: str
    enriched: str
    review: str
    dead_letter: str
    group_id: str

    def settings_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "enriched": self.enriched,
            "review": self.review,
            "dead_letter": self.dead_letter,
        }


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


async def make_topics(kafka: KafkaCluster, topics: Topics, partitions: int = 4) -> None:
    await create_topics(kafka.bootstrap_servers, [topics.input], partitions)
    await create_topics(
        kafka.bootstrap_servers, [topics.enriched, topics.review, topics.dead_letter], 2
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


@contextlib.asynccontextmanager
async def running(pipeline: Pipeline) -> AsyncIterator[asyncio.Task[int]]:
    """Run a pipeline in the background; stop it gracefully on exit."""
    task = asyncio.create_task(pipeline.run())
    try:
        yield task
    finally:
        pipeline.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)


def settings_env(settings: WorkerSettings) -> dict[str, str]:
    """EMOWORKER_* environment variables equivalent to ``settings`` (for worker processes)."""
    env: dict[str, str] = {}

    def walk(prefix: str, data: dict[str, Any]) -> None:
        for key, value in data.items():
            name = f"{prefix}{key.upper()}"
            if isinstance(value, dict):
                walk(name + "__", value)
            elif value is not None:
                env[name] = value if isinstance(value, str) else __import__("json").dumps(value)

    walk("EMOWORKER_", settings.model_dump(mode="json"))
    env.pop("EMOWORKER_WORKER_ID", None)
    return env


class WorkerProcess:
    """``emoworker run`` in a child process, with its log captured."""

    def __init__(self, settings: WorkerSettings, log_path: Path, name: str = "worker") -> None:
        env = {**os.environ, **settings_env(settings), "EMOWORKER_WORKER_ID": name}
        env["EMOWORKER_LOG_FORMAT"] = "json"
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    async def wait_for_log(self, text: str, timeout_s: float = 120) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if text in self.log_text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log_text()}")
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"{text!r} not in the worker log after {timeout_s}s:\n{self.log_text()}"
        )
