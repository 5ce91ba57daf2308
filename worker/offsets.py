"""Which offsets may be committed: per partition, the first offset whose outputs are not all
acknowledged yet. Offsets are tracked in the order they were consumed and finish in any order.

Each assignment of a partition gets a new epoch: a message consumed before a rebalance that
finishes after it (the partition revoked, perhaps assigned back) cannot mark the re-consumed copy
of the same offset as done.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")  # a partition key, e.g. aiokafka's TopicPartition

_epochs = itertools.count(1)


@dataclass
class _PartitionState:
    epoch: int = field(default_factory=lambda: next(_epochs))
    in_flight: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    next_to_commit: int | None = None
    last_tracked: int | None = None
    committed: int | None = None


class OffsetTracker(Generic[P]):
    """At-least-once bookkeeping: commit only past messages whose every output is acknowledged."""

    def __init__(self) -> None:
        self._partitions: dict[P, _PartitionState] = {}

    def track(self, partition: P, offset: int) -> int:
        """A message was consumed (call in consumption order); returns the partition's epoch."""
        state = self._partitions.setdefault(partition, _PartitionState())
        if state.last_tracked is not None and offset <= state.last_tracked:
            raise ValueError(f"{partition}: offset {offset} tracked out of order")
        state.last_tracked = offset
        state.in_flight.append(offset)
        return state.epoch

    def done(self, partition: P, offset: int, epoch: int) -> None:
        """Every output of this message is acknowledged (or it needs none)."""
        state = self._partitions.get(partition)
        if state is None or state.epoch != epoch:
            return  # revoked meanwhile: the message will be consumed again
        state.done.add(offset)
        while state.in_flight and state.in_flight[0] in state.done:
            finished = state.in_flight.popleft()
            state.done.discard(finished)
            state.next_to_commit = finished + 1

    def is_current(self, partition: P, epoch: int) -> bool:
        state = self._partitions.get(partition)
        return state is not None and state.epoch == epoch

    def committable(self, partitions: set[P] | None = None) -> dict[P, int]:
        """Partitions whose commit position moved since the last ``mark_committed``."""
        return {
            p: s.next_to_commit
            for p, s in self._partitions.items()
            if s.next_to_commit is not None
            and s.next_to_commit != s.committed
            and (partitions is None or p in partitions)
        }

    def mark_committed(self, offsets: dict[P, int]) -> None:
        for p, offset in offsets.items():
            if p in self._partitions:
                self._partitions[p].committed = offset

    def pending(self, partitions: set[P] | None = None) -> int:
        """Messages consumed but not finished (in the given partitions, or all)."""
        return sum(
            len(s.in_flight)
            for p, s in self._partitions.items()
            if partitions is None or p in partitions
        )

    def forget(self, partitions: set[P]) -> None:
        """Stop tracking revoked partitions; their unfinished messages will be consumed again."""
        for p in partitions:
            self._partitions.pop(p, None)
