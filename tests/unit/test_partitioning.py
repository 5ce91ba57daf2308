"""The batch partitioner computes exactly what aiokafka's (the Java client's) would."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference_murmur2

from worker.kafka.partitioning import murmur2, partitions_for


def test_murmur2_equals_the_reference_for_every_key_length() -> None:
    rng = random.Random(3)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(41))) for _ in range(2000)]
    keys += [b"", b"a", b"ab", b"abc", b"abcd", b"\xff" * 9, "é😀-post".encode()]
    assert murmur2(keys).tolist() == [reference_murmur2(k) for k in keys]
    assert murmur2([]).tolist() == []


def test_partitions_are_the_default_partitioners() -> None:
    rng = random.Random(4)
    keys: list[bytes | None] = [f"t3_{rng.randrange(10**9)}".encode() for _ in range(500)]
    for partitions in ([0], [0, 1, 2], list(range(12))):
        expected = [DefaultPartitioner()(k, partitions, partitions) for k in keys]
        assert partitions_for(keys, partitions, partitions) == expected


def test_records_without_a_key_go_to_an_available_partition() -> None:
    keys: list[bytes | None] = [None, b"k1", None, b"k2"] * 50
    chosen = partitions_for(keys, [0, 1, 2, 3], available=[2, 3])
    assert {chosen[i] for i in range(0, 200, 2)} <= {2, 3}
    assert len({chosen[i] for i in range(0, 200, 2)}) == 2  # random, not one fixed partition
    assert chosen[1::2] == [DefaultPartitioner()(k, [0, 1, 2, 3], [2, 3]) for k in keys[1::2]]
    assert set(partitions_for([None] * 50, [0, 1], available=[])) == {0, 1}  # none available
