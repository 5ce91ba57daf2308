"""The bench's compression table: batches built as the producer builds them, each codec's bytes
read back to the same events."""

from __future__ import annotations

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatch

from worker.bench.compression import BATCH_BYTES, CODECS, _batches, compression_table

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
