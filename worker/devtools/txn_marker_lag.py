"""How often a partition's new owner would see a torn hand-over, on a local broker.

A transactional writer commits state records and its consumed offsets in one transaction, as the
resolver does. Right after each commit returns, a "new owner" reads the state partition's end as
a ``read_committed`` reader sees it, then (``--gap-ms`` later, the rest of a rebalance) the
group's committed offset. The hand-over is torn when the offset already counts the transaction
but the state end does not: the broker had not written the commit markers yet. With
``--settled`` the new owner waits as the resolver does (``SettledReader``) and no hand-over
may be torn.

    python -m worker.devtools.txn_marker_lag [--rounds 300] [--gap-ms 50] [--settled]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.devtools.local_broker import LocalKafka
from worker.kafka.snapshot import SettledReader
from worker.settings import KafkaSettings


async def count_torn(bootstrap: str, rounds: int, gap_s: float, settled: bool) -> int:
    state_topic, input_topic, group = (f"{p}-{uuid.uuid4().hex[:8]}" for p in "sig")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(state_topic, 1, 1), NewTopic(input_topic, 1, 1)])
    finally:
        await admin.close()
    writer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=group, enable_idempotence=True
    )
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    offsets = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    state, consumed = TopicPartition(state_topic, 0), TopicPartition(input_topic, 0)
    settling = SettledReader(KafkaSettings(bootstrap_servers=bootstrap), state_topic)
    torn, seen_end = 0, 0
    async with settling, contextlib.AsyncExitStack() as clients:
        for client in (writer, reader, offsets):
            await client.start()
            clients.push_async_callback(client.stop)
        for done in range(1, rounds + 1):
            async with writer.transaction():
                sends = [await writer.send(state_topic, b"x" * 100, partition=0) for _ in range(50)]
                await asyncio.gather(*sends)
                await writer.send_offsets_to_transaction({consumed: done}, group)
            if settled:
                end = (await settling.wait_until_settled([state]))[state]
            else:
                end = (await reader.end_offsets([state]))[state]
            await asyncio.sleep(gap_s)
            torn += end == seen_end and await offsets.committed(consumed) == done
            while end == seen_end:  # the next round starts once this one is visible
                await asyncio.sleep(0.01)
                end = (await reader.end_offsets([state]))[state]
            seen_end = end
    return torn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=50.0)
    parser.add_argument("--settled", action="store_true")
    args = parser.parse_args()
    with LocalKafka() as kafka:
        kafka.start()
        torn = asyncio.run(
            count_torn(kafka.bootstrap_servers, args.rounds, args.gap_ms / 1000, args.settled)
        )
    print(f"torn hand-overs: {torn} of {args.rounds}")


if __name__ == "__main__":
    main()
