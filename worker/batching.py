"""Micro-batching: group items into batches of at most ``max_size``, waiting at most ``max_wait_s``
after the first item of a batch arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """A batch is released when it is full or its oldest item has waited ``max_wait_s``.

    ``weight`` lets some items count less toward the size (e.g. dead letters, which need no
    inference, weigh 0 so they never delay or split inference batches).
    """

    def __init__(
        self,
        max_size: int,
        max_wait_s: float,
        weight: Callable[[T], int] = lambda _: 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._weight = weight
        self._clock = clock
        self._items: deque[tuple[T, float]] = deque()  # (item, arrival time)
        self._size = 0
        self._closed = False
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, item: T) -> None:
        if self._closed:
            raise RuntimeError("batcher is closed")
        self._items.append((item, self._clock()))
        self._size += self._weight(item)
        self._changed.set()

    def close(self) -> None:
        """No more items; ``next_batch`` drains what is left, then returns None."""
        self._closed = True
        self._changed.set()

    def _oldest_wait(self) -> float:
        return self._clock() - self._items[0][1]

    def _ready(self) -> bool:
        if not self._items:
            return False
        if self._closed or self._size >= self.max_size:
            return True
        return self._oldest_wait() >= self.max_wait_s

    def _take(self) -> list[T]:
        batch: list[T] = []
        size = 0
        while self._items and (size < self.max_size or self._weight(self._items[0][0]) == 0):
            item, _ = self._items.popleft()
            size += self._weight(item)
            batch.append(item)
        self._size -= size
        return batch

    async def next_batch(self) -> list[T] | None:
        """The next batch; None once closed and empty."""
        while True:
            if self._ready():
                return self._take()
            if self._closed and not self._items:
                return None
            self._changed.clear()
            timeout = None
            if self._items:
                timeout = max(0.0, self.max_wait_s - self._oldest_wait())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
