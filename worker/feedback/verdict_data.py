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

from worker.kafka.snapshot import read_to_end
from worker.settings import KafkaSettings


async def read_final_events(kafka: KafkaSettings, topic: str) -> list[dict[str, Any]]:
    records, _ = await read_to_end(kafka, topic)
    return [orjson.loads(r.value) for rs in records.values() for r in rs if r.value]


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
