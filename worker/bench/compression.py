"""What producer compression costs and saves on the worker's real output events.

The events are packed as the producer packs them (Kafka record batches of at most
``BATCH_BYTES``, built by aiokafka's own record-batch builder with each codec), so the bytes are
those on the wire and in the broker's log, and the time is what the worker's event loop spends
building them (compression included; the codecs are cramjam's, as in aiokafka).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.routing.router import ScoreColumnsEncoder

BATCH_BYTES = 256 * 1024  # the worker's producer max_batch_size (worker/kafka/clients.py)
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
ROUNDS = 3  # the build is timed this many times; the fastest counts


def compression_table(events: list[bytes]) -> dict[str, dict[str, Any]]:
    """Per codec: bytes per event on the wire, the ratio to uncompressed, and µs per event to
    build its batches (the fastest of ``ROUNDS``)."""
    if not events:
        return {}
    table: dict[str, dict[str, Any]] = {}
    for name, codec in CODECS.items():
        best = float("inf")
        total = 0
        for _ in range(ROUNDS):
            started = time.perf_counter()
            total = sum(len(batch) for batch in _batches(events, codec))
            best = min(best, time.perf_counter() - started)
        table[name] = {"bytes_per_event": round(total / len(events), 1), "build_us": best}
    plain = table["none"]["bytes_per_event"]
    for row in table.values():
        row["ratio"] = round(plain / row["bytes_per_event"], 2)
        row["build_us"] = round(row["build_us"] / len(events) * 1e6, 2)
    return table


def compact_event(event: bytes) -> bytes:
    """A full-layout enriched event in the compact layout (``event_layout=compact``), as the
    worker would write it for the same post (its columns by the router's own encoder): the bench
    measures both layouts on the same real events without running the pipeline twice."""
    full = orjson.loads(event)
    emotions = full.pop("emotions")
    sampled = any(e["uncertainty"] is not None for e in emotions)  # null for all: one pass

    def column(name: str) -> np.ndarray:  # (1, L); null (NaN, or no spread) back to NaN
        return np.array([[np.nan if e[name] is None else e[name] for e in emotions]])

    (scores,) = ScoreColumnsEncoder([e["label"] for e in emotions]).encode(
        column("probability"), column("uncertainty"), column("flip_rate"), np.array([sampled])
    )
    head = {k: full.pop(k) for k in ("schema_version", "id", "post")}
    return orjson.dumps(head | {"layout": "compact", "scores": scores} | full)


def _batches(events: list[bytes], codec: int) -> list[bytearray]:
    batches: list[bytearray] = []
    builder = _builder(codec)
    offset = 0
    for value in events:
        if builder.append(offset, timestamp=None, key=None, value=value, headers=[]) is None:
            batches.append(builder.build())
            builder, offset = _builder(codec), 0
            builder.append(offset, timestamp=None, key=None, value=value, headers=[])
        offset += 1
    batches.append(builder.build())
    return batches


def _builder(codec: int) -> Any:
    return DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=BATCH_BYTES,
    )
