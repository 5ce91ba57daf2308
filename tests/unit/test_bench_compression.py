"""The bench's compression table: batches built as the producer builds them, each codec's bytes
read back to the same events."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatch

from schemas import SocialPost
from worker.bench.compression import (
    BATCH_BYTES,
    CODECS,
    _batches,
    compact_event,
    compression_table,
)
from worker.inference.uncertainty import summarise_samples
from worker.routing.policy import ReviewPolicy
from worker.routing.router import Router
from worker.settings import ReviewSettings

EVENTS = [
    orjson.dumps(
        {
            "id": f"post-{i}",
            "post": {"text": f"event number {i} " * (1 + i % 7)},
            "emotions": [
                {"label": f"l{j}", "probability": round(j * 0.0371 + i * 1e-4, 6)}
                for j in range(28)
            ],
        }
    )
    for i in range(400)
]


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_codecs_batches_read_back_to_the_events_in_order(codec: str) -> None:
    batches = _batches(EVENTS, CODECS[codec])
    assert len(batches) >= 1 and all(len(b) <= BATCH_BYTES for b in batches)
    values = [r.value for b in batches for r in DefaultRecordBatch(bytes(b))]
    assert values == EVENTS


def test_the_table_reports_bytes_per_event_against_uncompressed() -> None:
    table = compression_table(EVENTS)
    assert set(table) == set(CODECS)
    plain = table["none"]
    raw = sum(map(len, EVENTS)) / len(EVENTS)
    assert raw < plain["bytes_per_event"] < raw + 80  # each record's framing, a batch header
    assert plain["ratio"] == 1.0
    assert table["zstd"]["bytes_per_event"] < plain["bytes_per_event"] / 3  # repetitive JSON
    for row in table.values():
        expected = plain["bytes_per_event"] / row["bytes_per_event"]
        assert row["ratio"] == pytest.approx(expected, abs=0.01)
        assert row["build_us"] > 0
    assert compression_table([]) == {}


@pytest.mark.parametrize("n_samples", [1, 6])
def test_compact_event_is_what_the_worker_writes_in_the_compact_layout(n_samples: int) -> None:
    """The bench's conversion of a full-layout event equals the router's compact event for the
    same statistics (all but the processing time), deterministic posts included."""
    labels = ["joy", "anger", "neutral", 'say "hi"']
    thresholds = np.array([0.5, 0.4, 0.6, 0.3])
    samples = np.random.default_rng(3).random((n_samples, 5, len(labels)))
    summary = summarise_samples(samples, thresholds)
    posts = [SocialPost.model_validate({"id": f"p{i}", "text": f"text {i}"}) for i in range(5)]
    events = {}
    for layout in ("full", "compact"):
        policy = ReviewPolicy(ReviewSettings(), labels, thresholds)
        info = {"name": "m", "revision": None, "n_samples": n_samples, "mc_mode": "full"}
        router = Router(policy, labels, thresholds, info, "w1", layout)
        events[layout] = [r.enriched_bytes() for r in router.route(posts, [None] * 5, summary)]
    for full, compact in zip(events["full"], events["compact"], strict=True):
        converted, written = orjson.loads(compact_event(full)), orjson.loads(compact)
        assert list(converted) == list(written), "the same fields in the same order"
        del converted["processed_at"], written["processed_at"]
        assert converted == written
