"""The reviewed posts of the final topic, as what the feedback loop learns from.

* ``read_final_events``: every committed ``FinalPost`` so far (the topic from the start);
* ``recalibration_inputs``: for the thresholds, the labelled verdicts on posts the model in use
  classified (its weights' revision: another model's probabilities say nothing about this one);
* ``training_rows``: for fine-tuning, each labelled post's text and the reviewer's labels (the
  last verdict per post).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from worker.kafka.clients import connection_kwargs
from worker.settings import KafkaSettings


async def read_final_events(kafka: KafkaSettings, topic: str) -> list[dict[str, Any]]:
    reader = AIOKafkaConsumer(
        **connection_kwargs(kafka), enable_auto_commit=False, isolation_level="read_committed"
    )
    await reader.start()
    try:
        partitions = reader.partitions_for_topic(topic) or set()
        if not partitions:
            await reader._client.force_metadata_update()
            partitions = reader.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        events: list[dict[str, Any]] = []
        while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
            for records in (await reader.getmany(*tps, timeout_ms=500)).values():
                events.extend(orjson.loads(r.value) for r in records if r.value)
        return events
    finally:
        await reader.stop()


@dataclass
class VerdictMatrix:
    probabilities: np.ndarray  # (n, L) the model's mean probabilities
    labels: np.ndarray  # (n, L) the reviewers' 0/1 labels
    reviewers: list[str]


def recalibration_inputs(
    events: list[dict[str, Any]], label_names: list[str], revision: str | None
) -> VerdictMatrix:
    index = {name: j for j, name in enumerate(label_names)}
    probabilities, labels, reviewers = [], [], []
    for event in events:
        if event.get("outcome") != "labelled" or event["model"].get("revision") != revision:
            continue
        p = np.zeros(len(label_names))
        for emotion in event["emotions"]:
            if emotion["label"] in index:
                p[index[emotion["label"]]] = emotion["probability"]
        y = np.zeros(len(label_names))
        y[[index[label] for label in event["labels"] if label in index]] = 1
        probabilities.append(p)
        labels.append(y)
        reviewers.append(event["decided_by"])
    n = len(label_names)
    return VerdictMatrix(
        np.array(probabilities).reshape(-1, n), np.array(labels).reshape(-1, n), reviewers
    )


def training_rows(events: list[dict[str, Any]]) -> list[tuple[str, list[str], str]]:
    """(text, labels, post id) per labelled post, its last verdict winning."""
    rows: dict[str, tuple[str, list[str], str]] = {}
    for event in events:
        if event.get("outcome") == "labelled":
            rows[event["id"]] = (event["post"]["text"], list(event["labels"]), event["id"])
    return list(rows.values())
