"""MicroBatcher: size and time triggers, weight-0 items, order and close()."""

from __future__ import annotations

import asyncio
import time

import pytest

from worker.batching import MicroBatcher

# A real wait that must not happen: a test finishing within it proves the trigger did not wait.
LONG_WAIT_S = 60.0


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def is_dead_letter(item: str) -> int:
    """Weight function of the worker: dead letters ("dl...") weigh 0, posts 1."""
    return 0 if item.startswith("dl") else 1


async def next_within(batcher: MicroBatcher[str], seconds: float = 2.0) -> list[str] | None:
    return await asyncio.wait_for(batcher.next_batch(), seconds)


async def assert_no_batch(batcher: MicroBatcher[str], seconds: float = 0.05) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.next_batch(), seconds)


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_size"):
        MicroBatcher(0, 1.0)


# -- size trigger ----------------------------------------------------------------------------------


async def test_full_batch_is_released_without_waiting_for_max_wait() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(3, LONG_WAIT_S, clock=FakeClock())
    for item in ("a", "b", "c"):
        batcher.add(item)
    started = time.monotonic()
    assert await next_within(batcher) == ["a", "b", "c"]
    assert time.monotonic() - started < 1.0
    assert len(batcher) == 0


async def test_waiting_consumer_wakes_up_when_the_batch_fills() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(3, LONG_WAIT_S, clock=FakeClock())
    task = asyncio.create_task(batcher.next_batch())
    batcher.add("a")
    batcher.add("b")
    await asyncio.sleep(0.02)
    assert not task.done(), "two of three items must not release a batch"
    batcher.add("c")
    assert await asyncio.wait_for(task, 2.0) == ["a", "b", "c"]


async def test_more_than_max_size_items_are_split_in_order() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(2, LONG_WAIT_S, clock=clock)
    for item in "abcde":
        batcher.add(item)
    assert await next_within(batcher) == ["a", "b"]
    assert await next_within(batcher) == ["c", "d"]
    await assert_no_batch(batcher)  # "e" alone is a partial batch: it waits for max_wait
    assert len(batcher) == 1
    clock.advance(LONG_WAIT_S)
    assert await next_within(batcher) == ["e"]


# -- time trigger ----------------------------------------------------------------------------------


async def test_partial_batch_waits_until_max_wait_on_a_fake_clock() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(10, 5.0, clock=clock)
    batcher.add("a")
    clock.advance(2.0)
    batcher.add("b")
    await assert_no_batch(batcher)
    clock.advance(2.9)  # the oldest item has waited 4.9 s < 5 s
    await assert_no_batch(batcher)
    clock.advance(0.1)  # now exactly 5 s
    assert await next_within(batcher) == ["a", "b"]


async def test_partial_batch_is_released_after_max_wait_in_real_time() -> None:
    max_wait = 0.05
    batcher: MicroBatcher[str] = MicroBatcher(100, max_wait)
    started = time.monotonic()
    batcher.add("a")
    batcher.add("b")
    batch = await next_within(batcher, 5.0)
    elapsed = time.monotonic() - started
    assert batch == ["a", "b"]
    # Not before max_wait (small slack for clock granularity), and not much later either (a
    # shared CPU can delay the wake-up, hence the generous upper bound).
    assert max_wait - 0.005 <= elapsed < 1.0


async def test_waiting_consumer_is_released_by_the_time_trigger() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(100, 0.05)
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.01)
    started = time.monotonic()
    batcher.add("a")
    assert await asyncio.wait_for(task, 5.0) == ["a"]
    assert 0.045 <= time.monotonic() - started < 1.0


async def test_empty_batcher_never_releases_a_batch() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(2, 0.01)
    await assert_no_batch(batcher, 0.1)


async def test_wait_restarts_with_the_next_batch_on_a_fake_clock() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(10, 5.0, clock=clock)
    batcher.add("a")
    clock.advance(5.0)
    assert await next_within(batcher) == ["a"]
    batcher.add("b")  # a new batch: its own 5 s start now
    clock.advance(4.0)
    await assert_no_batch(batcher)
    clock.advance(1.0)
    assert await next_within(batcher) == ["b"]


async def test_leftover_items_keep_their_arrival_time() -> None:
    """Docstring: a batch is released when 'its oldest item has waited max_wait_s'."""
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(2, 10.0, clock=clock)
    batcher.add("a")  # t = 0
    clock.advance(5.0)
    batcher.add("b")  # t = 5
    batcher.add("c")  # t = 5
    clock.advance(4.0)  # the consumer comes late (busy with inference): t = 9
    assert await next_within(batcher) == ["a", "b"]
    clock.advance(6.0)  # t = 15: "c" has waited 10 s = max_wait
    assert await next_within(batcher, 0.2) == ["c"]


# -- weight-0 items (dead letters) -----------------------------------------------------------------


async def test_dead_letters_do_not_count_toward_the_size() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(3, LONG_WAIT_S, weight=is_dead_letter)
    for item in ("a", "dl1", "b", "dl2", "dl3", "c"):
        batcher.add(item)
    assert await next_within(batcher) == ["a", "dl1", "b", "dl2", "dl3", "c"]
    assert len(batcher) == 0


async def test_dead_letters_alone_never_trigger_the_size_trigger() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(2, 5.0, weight=is_dead_letter, clock=clock)
    for i in range(10):
        batcher.add(f"dl{i}")
    await assert_no_batch(batcher)
    batcher.add("a")  # size 1 of 2: still waiting
    await assert_no_batch(batcher)
    batcher.add("b")  # full: every dead letter so far travels with it, in order
    assert await next_within(batcher) == [*(f"dl{i}" for i in range(10)), "a", "b"]


async def test_dead_letters_alone_are_released_by_the_time_trigger() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(2, 5.0, weight=is_dead_letter, clock=clock)
    batcher.add("dl1")
    batcher.add("dl2")
    clock.advance(5.0)
    assert await next_within(batcher) == ["dl1", "dl2"]


async def test_dead_letter_waiting_between_batches_goes_with_the_next_batch() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(2, 5.0, weight=is_dead_letter, clock=clock)
    batcher.add("a")
    batcher.add("b")
    assert await next_within(batcher) == ["a", "b"]
    batcher.add("dl1")
    batcher.add("c")
    await assert_no_batch(batcher)
    batcher.add("dl2")
    batcher.add("d")
    batcher.add("e")
    # dead letters never split a batch: the one right after the full batch rides along with it
    assert await next_within(batcher) == ["dl1", "c", "dl2", "d"]
    clock.advance(5.0)
    assert await next_within(batcher) == ["e"]


async def test_dead_letters_after_a_full_batch_are_released_with_it() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(2, 5.0, weight=is_dead_letter, clock=clock)
    for item in ("a", "b", "dl1", "dl2", "c"):
        batcher.add(item)
    assert await next_within(batcher) == ["a", "b", "dl1", "dl2"]
    assert len(batcher) == 1
    clock.advance(5.0)
    assert await next_within(batcher) == ["c"]


# -- order -----------------------------------------------------------------------------------------


async def test_order_is_preserved_across_many_batches() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(7, 1.0, weight=is_dead_letter, clock=clock)
    items = [f"dl{i}" if i % 5 == 0 else f"p{i}" for i in range(100)]
    for item in items:
        batcher.add(item)
    batcher.close()
    batches: list[list[str]] = []
    while (batch := await next_within(batcher)) is not None:
        batches.append(batch)
    assert [item for batch in batches for item in batch] == items
    assert all(sum(is_dead_letter(i) for i in batch) <= 7 for batch in batches)
    assert all(sum(is_dead_letter(i) for i in batch) == 7 for batch in batches[:-1])


async def test_producer_and_consumer_interleaved_keep_order() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(4, 0.01)
    received: list[int] = []

    async def consume() -> None:
        while (batch := await batcher.next_batch()) is not None:
            assert 1 <= len(batch) <= 4
            received.extend(batch)

    consumer = asyncio.create_task(consume())
    for i in range(50):
        batcher.add(i)
        if i % 3 == 0:
            await asyncio.sleep(0)
        if i % 17 == 0:
            await asyncio.sleep(0.015)
    batcher.close()
    await asyncio.wait_for(consumer, 5.0)
    assert received == list(range(50))


# -- close() ---------------------------------------------------------------------------------------


async def test_close_drains_then_returns_none() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(2, LONG_WAIT_S, clock=FakeClock())
    for item in "abcde":
        batcher.add(item)
    batcher.close()
    assert batcher.closed
    assert await next_within(batcher) == ["a", "b"]
    assert await next_within(batcher) == ["c", "d"]
    assert await next_within(batcher) == ["e"]  # partial: released at once, no max_wait
    assert await next_within(batcher) is None
    assert await next_within(batcher) is None


async def test_close_wakes_a_waiting_consumer() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(5, LONG_WAIT_S, clock=FakeClock())
    task = asyncio.create_task(batcher.next_batch())
    batcher.add("a")
    await asyncio.sleep(0.01)
    assert not task.done()
    batcher.close()
    assert await asyncio.wait_for(task, 2.0) == ["a"]
    assert await next_within(batcher) is None


async def test_close_of_an_empty_batcher_returns_none_to_a_waiting_consumer() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(5, LONG_WAIT_S)
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.01)
    batcher.close()
    assert await asyncio.wait_for(task, 2.0) is None


async def test_add_after_close_raises() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(5, 1.0)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.add("a")
    assert len(batcher) == 0


async def test_len_counts_items_including_dead_letters() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(10, 1.0, weight=is_dead_letter)
    for item in ("a", "dl1", "b"):
        batcher.add(item)
    assert len(batcher) == 3
