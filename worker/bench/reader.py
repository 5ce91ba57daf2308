"""The benches' reader of the enriched topic, run as its own process.

In the worker's process the reader would compete with the worker for the interpreter lock:
decoding tens of thousands of 4 KB events per second is real work, and the harness would slow
down what it measures. As a separate process it stands for a downstream consumer, as in a real
deployment. It prints one JSON object: how many events it saw, ``time.monotonic()`` when it saw
the last one (CLOCK_MONOTONIC: comparable across processes of one machine) and, when asked, each
event's latency (enriched record timestamp minus its input record's timestamp, in seconds), and the
CPU seconds this process used (its share of what the transport costs the machine).

    python -m worker.bench.reader BOOTSTRAP TOPIC EXPECT TIMEOUT_S [--latencies]
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer


async def read(
    bootstrap: str, topic: str, expect: int, timeout_s: float, latencies: bool
) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen, last = 0, time.monotonic()
    lags: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        while seen < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in batch.values():
                if latencies:
                    for record in records:
                        source = orjson.loads(record.value)["source"]
                        lags.append((record.timestamp - source["timestamp_ms"]) / 1000)
                seen += len(records)
                last = time.monotonic()
    finally:
        await consumer.stop()
    return {
        "seen": seen,
        "last_monotonic": last,
        "latencies": lags,
        "cpu_seconds": time.process_time(),
    }


def main(argv: list[str]) -> int:
    bootstrap, topic, expect, timeout_s = argv[:4]
    result = asyncio.run(
        read(bootstrap, topic, int(expect), float(timeout_s), "--latencies" in argv)
    )
    sys.stdout.buffer.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
