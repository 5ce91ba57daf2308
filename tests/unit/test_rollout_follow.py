"""Following the control topic when no release was ever announced: the worker looks for the topic
again after 10, 20, then every 30 s (each look is a new connection), and after losing a topic it
had reached, after 10 s again."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from worker.feedback import rollout
from worker.feedback.rollout import follow_rollouts, retry_delay
from worker.settings import KafkaSettings


def test_retry_delay_doubles_from_the_first_wait_up_to_the_most() -> None:
    assert [retry_delay(t, 10.0, 30.0) for t in range(5)] == [10, 10, 20, 30, 30]


async def test_an_absent_control_topic_is_looked_for_less_and_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looks: list[str] = []
    waits: list[float] = []
    present = {"after": 5}  # the topic appears at the sixth look, then its reader fails once

    async def partition_counts(kafka: Any, topics: list[str]) -> dict[str, int]:
        looks.append(topics[0])
        return {topics[0]: 1 if len(looks) > present["after"] else 0}

    class FailingReader:
        def __init__(self, **kwargs: Any) -> None:
            pass

        async def start(self) -> None:
            pass

        def assign(self, partitions: Any) -> None:
            raise ConnectionError("broker gone")

        async def stop(self) -> None:
            pass

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 7:
            raise asyncio.CancelledError

    monkeypatch.setattr(rollout, "partition_counts", partition_counts)
    monkeypatch.setattr(rollout, "AIOKafkaConsumer", FailingReader)
    monkeypatch.setattr(rollout, "asyncio", SimpleNamespace(sleep=sleep))

    async def apply(release: Any) -> None:
        raise AssertionError("no release was announced")

    with pytest.raises(asyncio.CancelledError):
        await follow_rollouts(KafkaSettings(), "posts.control", 0, apply)
    assert looks == ["posts.control"] * 7
    # five looks find nothing; the sixth and the seventh reach the topic and lose it
    assert waits == [10.0, 20.0, 30.0, 30.0, 30.0, 10.0, 10.0]
