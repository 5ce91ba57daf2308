"""A topic's committed records from the start to its end offsets at the moment of the call: how
the resolver rebuilds its state from the changelog, how workers and ``emoworker learn`` read the
current release, and how the final topic is read as training data."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from worker.kafka.admin import partition_counts
from worker.kafka.clients import connection_kwargs
from worker.settings import KafkaSettings

Records = dict[int, list[ConsumerRecord[bytes, bytes]]]


async def read_to_end(
    kafka: KafkaSettings, topic: str, partitions: list[int] | None = None
) -> tuple[Records, dict[int, int]]:
    """Per partition (``None``: all of the topic's; none if it does not exist), its records in
    offset order (``read_committed``: an aborted transaction's records are not seen) and the end
    offset it was read up to."""
    if partitions is None:
        partitions = list(range((await partition_counts(kafka, [topic]))[topic]))
    if not partitions:
        return {}, {}
    reader = AIOKafkaConsumer(
        **connection_kwargs(kafka), enable_auto_commit=False, isolation_level="read_committed"
    )
    await reader.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends: dict[TopicPartition, int] = await reader.end_offsets(tps)
        records: Records = {p: [] for p in partitions}
        while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
            for tp, got in (await reader.getmany(*tps, timeout_ms=500)).items():
                records[tp.partition].extend(got)
        return records, {tp.partition: end for tp, end in ends.items()}
    finally:
        await reader.stop()
