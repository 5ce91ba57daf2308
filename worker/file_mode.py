"""File mode: the same decoding, inference and routing as the Kafka worker, over JSON lines.

Each input line is one message. Valid posts become enriched events (in input order), routed posts
also review requests, posts flagged out of distribution under ``ood.action=topic`` also
"unsupported" events, and bad lines dead letters carrying their line number, as do posts that fail
inference alone (``isolation.py``, as in the Kafka worker). A bad line never stops the run; a
model that fails on every post does (``FatalError``, exit 4). Dead letters are written in input
order: a bad line read while a batch is pending waits for that batch, whose posts may fail too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from schemas import SocialPost
from worker.decoding import DecodeFailure, DecodeLimits, decode_post
from worker.exit_codes import EXIT_MODEL, FatalError
from worker.inference.blas_threads import OneBlasThread
from worker.isolation import FailureIsolation
from worker.processing import BatchProcessor, BatchTiming, dead_letter_event


@dataclass
class FileRunStats:
    lines: int = 0
    enriched: int = 0
    reviewed: int = 0
    unsupported: int = 0
    ood: dict[str, int] = field(default_factory=dict)  # flagged posts by outcome (ood.action)
    dead_lettered: int = 0
    dead_letter_kinds: dict[str, int] = field(default_factory=dict)
    timing: BatchTiming = field(default_factory=BatchTiming)


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(stream, 1):
        yield number, raw.rstrip(b"\r\n")


def classify_stream(
    source: IO[bytes],
    source_name: str,
    processor: BatchProcessor,
    limits: DecodeLimits,
    write_enriched: Callable[[bytes], Any],
    write_dead_letter: Callable[[bytes], Any],
    write_review: Callable[[bytes], Any] | None = None,
    write_unsupported: Callable[[bytes], Any] | None = None,
    batch_size: int = 64,
    on_progress: Callable[[int], Any] | None = None,
) -> FileRunStats:
    stats = FileRunStats()
    pending: list[tuple[int, SocialPost, bytes]] = []
    isolation = FailureIsolation(processor)
    batches = 0
    failed_inference = 0
    held: list[tuple[int, DecodeFailure, bytes]] = []  # bad lines read while a batch is pending

    def dead_letter(failure: DecodeFailure, raw: bytes, number: int) -> None:
        letter = dead_letter_event(
            failure,
            raw,
            {"path": source_name, "line": number},
            None,
            processor.settings.worker_id,
            processor.settings.dead_letter_payload_bytes,
        )
        write_dead_letter(orjson.dumps(letter) + b"\n")
        stats.dead_lettered += 1
        stats.dead_letter_kinds[failure.kind] = stats.dead_letter_kinds.get(failure.kind, 0) + 1

    def flush() -> None:
        nonlocal batches, failed_inference
        if not pending:
            return
        batches += 1
        sources: list[dict[str, Any] | None] = [
            {"path": source_name, "line": n} for n, _, _ in pending
        ]
        # a post that fails inference alone is dead-lettered; the rest of its batch goes on
        results = isolation.process(
            batches, [p for _, p, _ in pending], sources, timing=stats.timing
        )
        routed = []
        for (number, _, raw), result in zip(pending, results, strict=True):
            if isinstance(result, str):
                held.append((number, DecodeFailure("processing_error", result), raw))
                failed_inference += 1
            else:
                routed.append(result)
        for number, failure, raw in sorted(held, key=lambda letter: letter[0]):
            dead_letter(failure, raw, number)
        held.clear()
        for r in routed:
            enriched = r.enriched_bytes() + b"\n"
            write_enriched(enriched)
            stats.enriched += 1
            review = r.review_bytes()
            if review is not None:
                stats.reviewed += 1
                if write_review is not None:
                    write_review(review + b"\n")
            if r.unsupported:
                stats.unsupported += 1
                if write_unsupported is not None:
                    write_unsupported(enriched)
            ood = r.enriched["uncertainty"].get("ood")
            if ood is not None and ood["action"] is not None:
                stats.ood[ood["action"]] = stats.ood.get(ood["action"], 0) + 1
        if on_progress is not None:
            on_progress(len(pending))
        pending.clear()

    with OneBlasThread():  # see blas_threads.py
        for number, raw in _lines(source):
            stats.lines += 1
            decoded = decode_post(raw, limits)
            if isinstance(decoded, DecodeFailure):
                if pending:
                    held.append((number, decoded, raw))
                else:
                    dead_letter(decoded, raw, number)
                if on_progress is not None:
                    on_progress(1)
                continue
            pending.append((number, decoded, raw))
            if len(pending) >= batch_size:
                flush()
        flush()
    if failed_inference and not stats.enriched:  # fewer than SYSTEMIC_FAILURES posts, all failed
        raise FatalError(
            f"inference failed for every post of {source_name} ({failed_inference}, each alone; "
            "dead-lettered): the model cannot run",
            EXIT_MODEL,
        )
    return stats
