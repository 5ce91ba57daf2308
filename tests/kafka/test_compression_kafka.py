"""Compressed topics on a real broker: posts produced with each codec Kafka has are read (a
producer upstream may compress with any of them), and compressed outputs are read back."""

from __future__ import annotations

from typing import Any

import pytest
from support.harness import Topics, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.streams import post_bytes, produce, read_all, values

from worker.inference.loading import Classifier
from worker.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]

CODECS = ("gzip", "snappy", "lz4", "zstd")


@pytest.mark.parametrize("output_codec", ["zstd", "lz4"])
async def test_posts_in_every_codec_are_enriched_and_compressed_outputs_read_back(
    kafka: KafkaCluster,
    topics: Topics,
    make_settings: Any,
    test_classifier: Classifier,
    output_codec: str,
) -> None:
    await make_topics(kafka, topics, partitions=2)
    expected = set()
    for c, codec in enumerate(CODECS):
        batch = [post_bytes(c * 10 + i) for i in range(5)]
        expected |= {key.decode() for key, _ in batch}
        await produce(kafka.bootstrap_servers, topics.input, batch, compression_type=codec)
    settings = make_settings(kafka={"producer_compression": output_codec})
    async with running(Pipeline(settings, classifier=test_classifier)):
        enriched = await read_all(kafka.bootstrap_servers, topics.enriched, expect=20, idle_s=1)
        letters = await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=0, idle_s=1)
    assert sorted(e["id"] for e in values(enriched)) == sorted(expected)
    assert letters == []
