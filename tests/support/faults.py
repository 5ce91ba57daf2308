"""Helpers of the fault, chaos and security suites: ``own_broker`` (a broker of the test's own,
e.g. to restart it or to start it late), ``OutputWatcher`` (follows the output topics in the
background), ``report`` (a test's RESULT line), ``log_events``, ``free_port``, ``http_get``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from support.harness import Topics
from worker.devtools.local_broker import LocalKafka, default_cache_dir
from worker.kafka.admin import ensure_topics

MB = 1024 * 1024


# ── helpers (also used by test_chaos.py and test_security.py) ───────────────────────────────


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_run_local_broker() -> bool:
    if shutil.which("java") is None:
        return False
    cached = (default_cache_dir() / "kafka-4.1.1" / ".complete").is_file()
    return cached or shutil.which("mvn") is not None


@contextlib.contextmanager
def own_broker(**kwargs: Any) -> Iterator[LocalKafka]:
    """A LocalKafka of this test alone (``kwargs`` go to LocalKafka, e.g. ``port``, ``sasl``,
    ``extra_properties``); started, and stopped at the end."""
    if not can_run_local_broker():
        pytest.skip("needs java (and mvn, or cached Kafka jars) for a broker of its own")
    broker = LocalKafka(**kwargs)
    try:
        yield broker.start()
    finally:
        broker.stop()


async def create_topic(
    client: dict[str, Any], name: str, partitions: int, **configs: str | int
) -> None:
    """Create one topic with topic-level configs (e.g. ``max.message.bytes``)."""
    await ensure_topics(client, [name], partitions, configs={k: str(v) for k, v in configs.items()})


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print a ``RESULT`` line (the figures of a fault run) to the terminal, even while pytest
    captures the output."""
    with capsys.disabled():
        print(f"\nRESULT {line}")


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a worker log (other lines, e.g. a traceback, are skipped)."""
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


class OutputWatcher:
    """Follows the enriched and dead-letter topics from the start, in the background.

    ``ids`` counts enriched post ids (duplicates show as counts > 1), ``letters`` keeps the
    dead letters, ``sources`` the (partition, offset) of the input of every output, and
    ``arrivals`` the monotonic time of each record, for recovery times.
    """

    def __init__(
        self, client: dict[str, Any], topics: Topics, isolation_level: str = "read_uncommitted"
    ) -> None:
        self.client, self.topics, self.isolation_level = client, topics, isolation_level
        self.ids: collections.Counter[str] = collections.Counter()
        self.letters: list[dict[str, Any]] = []
        self.sources: set[tuple[int, int]] = set()
        self.arrivals: list[float] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def total(self) -> int:
        return sum(self.ids.values()) + len(self.letters)

    def duplicates(self) -> int:
        return sum(c - 1 for c in self.ids.values())

    def last_arrival(self) -> float:
        return self.arrivals[-1] if self.arrivals else 0.0

    def first_arrival_after(self, moment: float) -> float | None:
        return next((t for t in self.arrivals if t > moment), None)

    async def __aenter__(self) -> OutputWatcher:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topics.enriched,
            self.topics.dead_letter,
            **self.client,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level=self.isolation_level,
        )
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, records in batches.items():
                    for record in records:
                        self._add(tp, record)
        finally:
            await consumer.stop()

    def _add(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        self.arrivals.append(time.monotonic())
        doc = orjson.loads(record.value) if record.value is not None else {}
        if doc.get("source"):
            self.sources.add((doc["source"]["partition"], doc["source"]["offset"]))
        if tp.topic == self.topics.enriched:
            self.ids[doc["id"]] += 1
        else:
            self.letters.append(doc)

    async def wait_for(self, total: int, timeout_s: float, worker: Any = None) -> None:
        """Until ``total`` outputs arrived; fails early when ``worker`` (a WorkerProcess)
        exits."""
        deadline = time.monotonic() + timeout_s
        while self.total < total:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.total} outputs after {timeout_s}s, expected {total}")
            if worker is not None and worker.proc.poll() is not None:
                tail = worker.log_text()[-3000:]
                raise AssertionError(f"worker exited ({worker.proc.returncode}):\n{tail}")
            assert self._task is not None and not self._task.done(), self._task
            await asyncio.sleep(0.2)

    async def settle(self, quiet_s: float = 3.0) -> None:
        """Until nothing new arrived for ``quiet_s`` seconds."""
        count, since = self.total, time.monotonic()
        while time.monotonic() - since < quiet_s:
            await asyncio.sleep(0.2)
            if self.total != count:
                count, since = self.total, time.monotonic()

    def summary(self) -> str:
        return (
            f"{sum(self.ids.values())} enriched ({len(self.ids)} ids), {len(self.letters)} "
            f"dead-lettered, {self.duplicates()} duplicates"
        )


# ── hostile input ───────────────────────────────────────────────────────────────────────────
