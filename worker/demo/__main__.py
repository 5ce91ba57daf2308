"""``make demo``: a local Kafka, the worker with the default model, and a live view of the outputs.

1. fetch the Kafka jars (once) and start a single-node KRaft broker on a free loopback port;
2. create the input, enriched, review and dead-letter topics;
3. start the worker (the real pipeline, in this process) with the default model bundle;
4. feed the sample posts (GoEmotions dev comments, see ATTRIBUTION.md) plus a few malformed
   messages at a steady rate;
5. read the three output topics and show throughput, emotion counts, review and dead-letter
   counts and example events as they arrive;
6. stop the worker (drain, commit) and the broker, and exit 0.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from rich.console import Console, Group
from rich.json import JSON
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from worker.exit_codes import EXIT_CONFIG
from worker.extras import missing_extra
from worker.kafka.admin import ensure_topics
from worker.kafka.connection import output_topics
from worker.kafka.feed import feed_topic, read_feed
from worker.logs import configure_logging
from worker.pipeline import Pipeline
from worker.settings import WorkerSettings

SAMPLES = Path(__file__).resolve().parent / "sample_posts.jsonl"
MALFORMED: list[tuple[bytes | None, bytes]] = [
    (b"bad-json", b'{"id": "broken-1", "text": "this JSON never ends'),
    (b"bad-utf8", b'{"id": "latin1-1", "text": "caf\xe9 au lait"}'),
    (b"no-text", b'{"id": "no-text-1", "author": "someone"}'),
    (b"blank", b'{"id": "blank-1", "text": "\\u200b\\u200b   "}'),
    (b"array", b'["not", "a", "post"]'),
]
console = Console()


class Tally:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.started = time.monotonic()
        self.enriched = 0
        self.reviewed = 0
        self.dead = 0
        self.emotions: collections.Counter[str] = collections.Counter()
        self.dead_kinds: collections.Counter[str] = collections.Counter()
        self.example_enriched: dict[str, Any] | None = None
        self.example_review: dict[str, Any] | None = None
        self.example_dead: dict[str, Any] | None = None
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=6)

    @property
    def done(self) -> bool:
        return self.enriched + self.dead >= self.expected

    def add(self, topic_kind: str, event: dict[str, Any]) -> None:
        if topic_kind == "enriched":
            self.enriched += 1
            self.emotions.update(event["predicted_labels"])
            self.recent.append(event)
            if self.example_enriched is None or (
                len(event["predicted_labels"]) > 1
                and len(self.example_enriched["predicted_labels"]) == 1
            ):
                self.example_enriched = event
        elif topic_kind == "review":
            self.reviewed += 1
            if self.example_review is None or event["priority"] > self.example_review["priority"]:
                self.example_review = event
        else:
            self.dead += 1
            self.dead_kinds[event["error"]["kind"]] += 1
            self.example_dead = self.example_dead or event

    def render(self) -> Group:
        elapsed = time.monotonic() - self.started
        head = Table.grid(padding=(0, 3))
        head.add_row(
            f"[bold]{self.enriched + self.dead}/{self.expected}[/] messages",
            f"[green]{self.enriched}[/] enriched",
            f"[yellow]{self.reviewed}[/] to review",
            f"[red]{self.dead}[/] dead-lettered",
            f"{self.enriched / max(elapsed, 1e-9):.1f} posts/s",
        )
        emotions = Table("emotion", "posts", title="predicted emotions", min_width=30)
        for label, count in self.emotions.most_common(10):
            emotions.add_row(label, str(count))
        recent = Table("post", "emotions", "MI", "review", title="latest", min_width=70)
        for e in list(self.recent)[::-1]:
            recent.add_row(
                e["post"]["text"][:48],
                ", ".join(e["predicted_labels"][:3]),
                f"{e['uncertainty']['mutual_information'] or 0:.4f}",
                "yes" if e["needs_review"] else "",
            )
        row = Table.grid(padding=(0, 2))
        row.add_row(emotions, recent)
        return Group(head, row)


async def collect(
    bootstrap: str, settings: WorkerSettings, tally: Tally, stop: asyncio.Event
) -> None:
    t = settings.topics
    kinds = {t.enriched: "enriched", t.review: "review", t.dead_letter: "dead"}
    consumer = AIOKafkaConsumer(
        *kinds, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id="demo-viewer"
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=300)
            for tp, records in batch.items():
                for record in records:
                    tally.add(kinds[tp.topic], orjson.loads(record.value))
    finally:
        await consumer.stop()


async def run_demo(bootstrap: str, rate: float) -> int:
    settings = WorkerSettings.model_validate(
        {
            "kafka": {"bootstrap_servers": bootstrap, "session_timeout_ms": 10_000},
            "http_port": int(os.environ.get("EMOWORKER_HTTP_PORT", "0")),
            "log_format": "console",
            "batch_max_wait_ms": 200,
        }
    )
    t = settings.topics
    await ensure_topics(settings.kafka, [t.input], partitions=3)
    await ensure_topics(settings.kafka, output_topics(settings), partitions=1)
    posts = read_feed(SAMPLES)
    feed = posts[:150] + MALFORMED + posts[150:]
    console.print(
        f"[bold]worker[/]: model [cyan]{settings.model.path}[/], MC mode "
        f"[cyan]{settings.model.mc_mode}[/], {settings.model.n_samples} samples, "
        f"review budget {100 * (settings.review.target_rate or 0):g}% of posts"
    )
    pipeline = Pipeline(settings)
    worker = asyncio.create_task(pipeline.run())
    tally = Tally(len(feed))
    stop = asyncio.Event()
    reader = asyncio.create_task(collect(bootstrap, settings, tally, stop))
    console.print(
        f"[bold]feeding[/] {len(posts)} sample posts and {len(MALFORMED)} malformed "
        f"messages to [cyan]{t.input}[/] at {rate:g}/s"
    )
    feeder = asyncio.create_task(feed_topic(settings.kafka, t.input, feed, rate=rate))
    deadline = time.monotonic() + float(os.environ.get("DEMO_TIMEOUT_S", "600"))
    with Live(tally.render(), console=console, refresh_per_second=4, transient=False) as live:
        while not tally.done and time.monotonic() < deadline and not worker.done():
            await asyncio.sleep(0.25)
            live.update(tally.render())
    await feeder
    pipeline.request_stop()
    code = await worker
    stop.set()
    await reader
    show_examples(tally)
    ok = tally.done and code == 0
    console.print(
        f"\n[bold]{'done' if ok else 'incomplete'}[/]: {tally.enriched} enriched, "
        f"{tally.reviewed} review requests, {tally.dead} dead letters "
        f"({dict(tally.dead_kinds)}) in {time.monotonic() - tally.started:.0f}s"
    )
    return 0 if ok else 1


def show_examples(tally: Tally) -> None:
    for title, event in (
        ("example enriched event", shortened(tally.example_enriched)),
        ("example review request (highest priority)", shortened(tally.example_review)),
        ("example dead letter", tally.example_dead),
    ):
        if event is not None:
            console.print(Panel(JSON(orjson.dumps(event).decode()), title=title, expand=False))


def shortened(event: dict[str, Any] | None, keep: int = 3) -> dict[str, Any] | None:
    """``event`` with only its ``keep`` most probable labels, to keep the printout short: of the
    full layout's ``emotions``, or of each of the compact layout's ``scores`` arrays."""
    if event is None:
        return None
    event = dict(event)
    if "emotions" in event:
        top = sorted(event["emotions"], key=lambda e: -e["probability"])[:keep]
        event["emotions"] = [*top, f"... {len(event['emotions']) - len(top)} more labels"]
    if isinstance(scores := event.get("scores"), dict) and "probability" in scores:
        probability = scores["probability"]
        order = sorted(range(len(probability)), key=lambda i: -probability[i])[:keep]
        more = f"... {len(probability) - len(order)} more labels"
        event["scores"] = {
            name: [values[i] for i in order] + [more] for name, values in scores.items()
        }
    return event


def main() -> int:
    missing = missing_extra("demo", "make demo")
    if missing is not None:
        print(f"error: {missing}", file=sys.stderr)
        return EXIT_CONFIG
    from worker.devtools.local_broker import LocalKafka

    configure_logging("console", os.environ.get("EMOWORKER_LOG_LEVEL", "WARNING"))
    rate = float(os.environ.get("DEMO_RATE", "40"))
    console.rule("[bold]emotion-stream demo")
    console.print("starting a local Apache Kafka (KRaft; jars fetched from Maven Central once)")
    with LocalKafka() as broker:
        console.print(f"broker up at [cyan]{broker.bootstrap_servers}[/]")
        code = asyncio.run(run_demo(broker.bootstrap_servers, rate))
    console.print("broker stopped" + ("" if code == 0 else f"; exit code {code}"))
    return code


if __name__ == "__main__":
    sys.exit(main())
