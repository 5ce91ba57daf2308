"""Feed a topic from a file: JSON lines of posts, or GoEmotions TSV rows turned into posts."""

from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from worker.kafka.clients import build_producer
from worker.settings import KafkaSettings


@dataclass
class FeedResult:
    count: int
    seconds: float


def read_feed(path: Path) -> list[tuple[bytes | None, bytes]]:
    """(key, value) pairs. JSON lines are sent as they are (bad lines too: that is a test feed's
    point), keyed by their ``id`` (posts) or ``post_id`` (verdicts); TSV rows become
    ``SocialPost`` JSON with the comment id as id and key."""
    if not path.is_file():
        raise FileNotFoundError(f"feed file {path} does not exist")
    if path.suffix.lower() == ".tsv":
        out: list[tuple[bytes | None, bytes]] = []
        with path.open(encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row:
                    continue
                post_id = row[2] if len(row) > 2 else f"{path.stem}-{n}"
                value = orjson.dumps({"id": post_id, "text": row[0], "platform": "reddit"})
                out.append((post_id.encode(), value))
        return out
    pairs: list[tuple[bytes | None, bytes]] = []
    for line in path.read_bytes().splitlines():
        key: bytes | None = None
        try:
            doc: Any = orjson.loads(line)
            # a post's key is its id; a verdict's its post's id
            key_id = doc.get("id", doc.get("post_id")) if isinstance(doc, dict) else None
            if isinstance(key_id, str):
                key = key_id.encode()
        except orjson.JSONDecodeError:
            pass
        pairs.append((key, line))
    return pairs


async def feed_topic(
    kafka: KafkaSettings,
    topic: str,
    messages: list[tuple[bytes | None, bytes]],
    rate: float = 0.0,
    limit: int = 0,
    repeat: int = 1,
    progress: Any = None,
) -> FeedResult:
    """Send ``messages`` (``repeat`` times, at most ``limit``) at ``rate`` per second."""
    producer = build_producer(kafka)
    await producer.start()
    started = time.monotonic()
    sent = 0
    try:
        pending = []
        for _ in range(max(1, repeat)):
            for key, value in messages:
                if limit and sent >= limit:
                    break
                if rate > 0:
                    due = started + sent / rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                pending.append(await producer.send(topic, value, key=key))
                sent += 1
                if len(pending) >= 1000:
                    await asyncio.gather(*pending)
                    pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return FeedResult(count=sent, seconds=time.monotonic() - started)
