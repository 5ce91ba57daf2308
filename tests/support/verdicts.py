"""Review requests and verdicts as the resolver's tests feed them."""

from __future__ import annotations

from typing import Any

import orjson

LABELS = ["admiration", "anger", "joy", "neutral"]


def review_request(post_id: str, offset: int = 5, predicted: tuple[str, ...] = ("joy",)) -> bytes:
    """A review request in the worker's shape (4 labels), for the input record at ``offset``."""
    emotion = {"probability": 0.5, "uncertainty": 0.1, "threshold": 0.4, "predicted": False}
    doc: dict[str, Any] = {
        "schema_version": "1.4",
        "id": post_id,
        "priority": 90,
        "review_score": 0.7,
        "reasons": [{"rule": "uncertain", "message": "uncertain"}],
        "post": {"id": post_id, "text": "what a day"},
        "predicted_labels": list(predicted),
        "emotions": [{"label": name, **emotion} for name in LABELS],
        "uncertainty": {
            "predictive_entropy": 1.0,
            "expected_entropy": 0.8,
            "mutual_information": 0.2,
            "review_score": 0.7,
            "n_samples": 10,
        },
        "model": {"name": "test", "revision": "abc", "n_samples": 10, "mc_mode": "fast"},
        "requested_at": "2026-12-03T10:00:00Z",
        "worker_id": "w1",
        "source": {"topic": "posts", "partition": 0, "offset": offset},
        "request_id": f"posts:0:{offset}",
    }
    return orjson.dumps(doc)


def verdict(post_id: str, labels: list[str] | None = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "post_id": post_id,
        "reviewer_id": "alice",
        "labels": ["joy"] if labels is None else labels,
        "decided_at": "2026-12-03T10:05:00Z",
        **extra,
    }
    return orjson.dumps(doc)
