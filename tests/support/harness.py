"""Helpers the Kafka tests import: topic names, a pipeline run in the background, a worker in a
child process. The fixtures that build them are in ``conftest.py``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.kafka_cluster import KafkaCluster, create_topics
from worker.pipeline import Pipeline
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Topics:
    input: str
    enriched: str
    review: str
    dead_letter: str
    group_id: str
    unsupported: str = ""  # empty: "<enriched>-unsupported"
    control: str = ""  # empty: "<enriched>-control"

    def __post_init__(self) -> None:
        if not self.unsupported:
            self.unsupported = f"{self.enriched}-unsupported"
        if not self.control:
            self.control = f"{self.enriched}-control"

    def settings_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "enriched": self.enriched,
            "review": self.review,
            "dead_letter": self.dead_letter,
            "unsupported": self.unsupported,
            "control": self.control,
        }


async def make_topics(kafka: KafkaCluster, topics: Topics, partitions: int = 4) -> None:
    await create_topics(kafka.bootstrap_servers, [topics.input], partitions)
    await create_topics(
        kafka.bootstrap_servers,
        [topics.enriched, topics.review, topics.dead_letter, topics.unsupported],
        2,
    )


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``predicate`` every 0.1 s until it holds; returns the seconds that took, fails with
    ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not predicate():
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise AssertionError(f"{what}: not the case after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _stopped(task: asyncio.Task[int], timeout_s: float) -> bool:
    """Whether ``task`` ended within ``timeout_s``; one that did not is cancelled."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        return True
    task.cancel()
    await asyncio.wait({task}, timeout=10)
    return False


@contextlib.asynccontextmanager
async def running(
    pipeline: Pipeline, expect_exit: int | None = 0, stop_timeout_s: float = 60
) -> AsyncIterator[asyncio.Task[int]]:
    """Run a pipeline in the background; stop it gracefully on exit.

    When the block ends without an error, the test fails if the pipeline does not stop within
    ``stop_timeout_s`` of the stop request, if ``run()`` raised (re-raised here), or if it
    returned another exit code than ``expect_exit`` (None: any code; for a test that reads the
    task's result itself). When the block raises, the pipeline is stopped all the same and
    that error is the one reported.
    """
    task = asyncio.create_task(pipeline.run())
    try:
        yield task
    except BaseException:
        pipeline.request_stop()
        if await _stopped(task, stop_timeout_s) and not task.cancelled():
            task.exception()  # retrieved: the block's error is the one reported
        raise
    pipeline.request_stop()
    if not await _stopped(task, stop_timeout_s):
        raise AssertionError(f"the pipeline did not stop within {stop_timeout_s:g}s of the stop")
    if task.cancelled():
        if expect_exit is None:
            return
        raise AssertionError("the pipeline's task was cancelled instead of stopping")
    code = task.result()  # re-raises what run() raised
    if expect_exit is not None and code != expect_exit:
        raise AssertionError(f"the pipeline exited with {code}, expected {expect_exit}")


def settings_env(settings: WorkerSettings) -> dict[str, str]:
    """EMOWORKER_* environment variables equivalent to ``settings`` (for worker processes)."""
    env: dict[str, str] = {}

    def walk(prefix: str, data: dict[str, Any]) -> None:
        for key, value in data.items():
            name = f"{prefix}{key.upper()}"
            if isinstance(value, dict):
                walk(name + "__", value)
            elif value is not None:
                env[name] = value if isinstance(value, str) else json.dumps(value)

    walk("EMOWORKER_", settings.model_dump(mode="json"))
    env.pop("EMOWORKER_WORKER_ID", None)
    return env


class WorkerProcess:
    """``emoworker run`` (or another long-running command: ``resolve``) in a child process, with
    its log captured."""

    def __init__(
        self, settings: WorkerSettings, log_path: Path, name: str = "worker", command: str = "run"
    ) -> None:
        env = {**os.environ, **settings_env(settings), "EMOWORKER_WORKER_ID": name}
        env["EMOWORKER_LOG_FORMAT"] = "json"
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", command],
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
