"""OffsetTracker: contiguous-prefix commits, epochs across rebalances, pending counts."""

from __future__ import annotations

import random

import pytest

from worker.offsets import OffsetTracker

P0 = ("posts", 0)
P1 = ("posts", 1)
P2 = ("posts", 2)


def track_all(
    tracker: OffsetTracker[tuple[str, int]], partition: tuple[str, int], offsets: range
) -> int:
    epochs = {tracker.track(partition, o) for o in offsets}
    assert len(epochs) == 1, "one assignment of a partition has one epoch"
    return epochs.pop()


def test_nothing_is_committable_before_anything_is_done() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    track_all(tracker, P0, range(10, 14))
    assert tracker.committable() == {}
    assert tracker.pending() == 4


def test_out_of_order_completion_commits_only_the_contiguous_prefix() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    epoch = track_all(tracker, P0, range(10, 15))  # 10, 11, 12, 13, 14
    tracker.done(P0, 12, epoch)
    tracker.done(P0, 11, epoch)
    assert tracker.committable() == {}, "10 is not done: nothing may be committed"
    assert tracker.pending() == 5
    tracker.done(P0, 10, epoch)
    assert tracker.committable() == {P0: 13}, "10, 11, 12 done: the next to read is 13"
    assert tracker.pending() == 2
    tracker.done(P0, 14, epoch)
    assert tracker.committable() == {P0: 13}, "13 is still in flight"
    tracker.done(P0, 13, epoch)
    assert tracker.committable() == {P0: 15}
    assert tracker.pending() == 0


def test_gaps_between_tracked_offsets_are_fine() -> None:
    """Compacted topics and transaction markers leave holes in the offsets."""
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    epoch = tracker.track(P0, 3)
    tracker.track(P0, 7)
    tracker.track(P0, 20)
    tracker.done(P0, 7, epoch)
    assert tracker.committable() == {}
    tracker.done(P0, 3, epoch)
    assert tracker.committable() == {P0: 8}
    tracker.done(P0, 20, epoch)
    assert tracker.committable() == {P0: 21}


def test_random_completion_order_matches_a_reference_model() -> None:
    rng = random.Random(1234)
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    offsets = list(range(100, 160))
    epoch = track_all(tracker, P0, range(100, 160))
    finished: set[int] = set()
    order = offsets[:]
    rng.shuffle(order)
    for offset in order:
        tracker.done(P0, offset, epoch)
        finished.add(offset)
        prefix = 0
        while prefix < len(offsets) and offsets[prefix] in finished:
            prefix += 1
        expected = {P0: offsets[prefix - 1] + 1} if prefix else {}
        assert tracker.committable() == expected
        assert tracker.pending() == len(offsets) - prefix


def test_committable_reports_only_partitions_that_moved() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    e0 = track_all(tracker, P0, range(0, 3))
    e1 = track_all(tracker, P1, range(50, 53))
    track_all(tracker, P2, range(7, 9))
    tracker.done(P0, 0, e0)
    tracker.done(P1, 50, e1)
    tracker.done(P1, 51, e1)
    assert tracker.committable() == {P0: 1, P1: 52}

    tracker.mark_committed({P0: 1, P1: 52})
    assert tracker.committable() == {}, "nothing moved since the last commit"

    tracker.done(P1, 52, e1)
    assert tracker.committable() == {P1: 53}, "only P1 moved"
    tracker.mark_committed({P1: 53})
    assert tracker.committable() == {}


def test_committable_filters_by_partition() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    e0 = tracker.track(P0, 0)
    e1 = tracker.track(P1, 0)
    tracker.done(P0, 0, e0)
    tracker.done(P1, 0, e1)
    assert tracker.committable({P1}) == {P1: 1}
    assert tracker.committable({P2}) == {}
    assert tracker.committable(set()) == {}
    assert tracker.committable() == {P0: 1, P1: 1}


def test_mark_committed_of_an_older_position_reports_the_newer_one_again() -> None:
    """A commit that lagged behind (e.g. sent before more messages finished) is not the latest."""
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    epoch = track_all(tracker, P0, range(0, 4))
    tracker.done(P0, 0, epoch)
    snapshot = tracker.committable()
    assert snapshot == {P0: 1}
    tracker.done(P0, 1, epoch)
    tracker.mark_committed(snapshot)  # the commit of 1 completes after 1 finished
    assert tracker.committable() == {P0: 2}


def test_mark_committed_of_an_unknown_partition_is_ignored() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.mark_committed({P2: 11})
    assert tracker.committable() == {}
    assert tracker.pending() == 0
    # no state was kept for P2: once it is tracked, its position 11 is new, not "committed"
    tracker.done(P2, 10, tracker.track(P2, 10))
    assert tracker.committable() == {P2: 11}


def test_forget_stops_tracking_and_drops_pending() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    e0 = track_all(tracker, P0, range(0, 3))
    e1 = track_all(tracker, P1, range(0, 2))
    tracker.done(P0, 0, e0)
    tracker.forget({P0})
    assert tracker.pending({P0}) == 0 and tracker.pending({P1}) == 2
    assert tracker.is_current(P1, e1)
    assert tracker.pending() == 2
    assert tracker.committable() == {}, "a revoked partition is not committed by this worker"
    assert not tracker.is_current(P0, e0)


def test_done_from_an_old_epoch_does_not_mark_the_reconsumed_offset() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    old = tracker.track(P0, 5)
    tracker.track(P0, 6)
    tracker.forget({P0})  # revoked while 5 and 6 were in flight
    new = tracker.track(P0, 5)  # assigned back: the same offsets are consumed again
    tracker.track(P0, 6)
    assert new != old
    assert tracker.is_current(P0, new)
    assert not tracker.is_current(P0, old)

    tracker.done(P0, 5, old)  # the first copy finishes late
    tracker.done(P0, 6, old)
    assert tracker.committable() == {}, "the old copy must not mark the new copy as done"
    assert tracker.pending() == 2

    tracker.done(P0, 5, new)
    assert tracker.committable() == {P0: 6}
    tracker.done(P0, 6, new)
    assert tracker.committable() == {P0: 7}
    assert tracker.pending() == 0


def test_done_after_forget_without_reassignment_is_ignored() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    epoch = tracker.track(P0, 5)
    tracker.forget({P0})
    tracker.done(P0, 5, epoch)
    assert not tracker.is_current(P0, epoch)
    assert tracker.committable() == {}
    assert tracker.pending() == 0


def test_each_assignment_gets_a_new_epoch_also_across_trackers() -> None:
    first: OffsetTracker[tuple[str, int]] = OffsetTracker()
    second: OffsetTracker[tuple[str, int]] = OffsetTracker()
    epochs = [first.track(P0, 0), second.track(P0, 0), first.track(P1, 0)]
    first.forget({P0})
    epochs.append(first.track(P0, 0))
    assert len(set(epochs)) == len(epochs)


def test_forget_resets_the_committed_position() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    epoch = tracker.track(P0, 0)
    tracker.done(P0, 0, epoch)
    tracker.mark_committed(tracker.committable())
    tracker.forget({P0})
    epoch = tracker.track(P0, 1)
    tracker.done(P0, 1, epoch)
    assert tracker.committable() == {P0: 2}


def test_pending_counts_per_partition() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    e0 = track_all(tracker, P0, range(0, 5))
    e1 = track_all(tracker, P1, range(0, 3))
    assert tracker.pending() == 8
    assert tracker.pending({P0}) == 5
    assert tracker.pending({P1}) == 3
    assert tracker.pending({P2}) == 0
    assert tracker.pending({P0, P1}) == 8
    tracker.done(P0, 0, e0)
    tracker.done(P0, 1, e0)
    tracker.done(P0, 3, e0)  # out of order: still pending until 2 is done
    tracker.done(P1, 2, e1)
    assert tracker.pending({P0}) == 3
    assert tracker.pending({P1}) == 3
    assert tracker.pending() == 6


@pytest.mark.parametrize("offset", [9, 10], ids=["lower", "same"])
def test_tracking_out_of_order_raises(offset: int) -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.track(P0, 8)
    tracker.track(P0, 10)
    with pytest.raises(ValueError, match="out of order"):
        tracker.track(P0, offset)
    assert tracker.pending() == 2
    tracker.track(P1, 0)  # other partitions are independent
    assert tracker.pending() == 3


def test_tracking_below_the_commit_position_raises() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    epoch = tracker.track(P0, 10)
    tracker.done(P0, 10, epoch)
    assert tracker.committable() == {P0: 11}
    with pytest.raises(ValueError, match="out of order"):
        tracker.track(P0, 4)
