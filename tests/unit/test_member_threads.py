"""How an ensemble's members are split over threads (``worker/inference/member_threads.py``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from worker.inference.member_threads import MemberThreads, member_groups, member_thread_count


@pytest.mark.parametrize(
    ("shares", "groups", "expected"),
    [
        ([8, 8, 7, 7], 2, [[0, 2], [1, 3]]),  # 15 samples each
        ([3, 2], 2, [[0], [1]]),
        ([1, 0], 2, [[0]]),  # a member with no samples is left out
        ([5, 5, 5], 2, [[0, 2], [1]]),
        ([8, 8, 7, 7], 1, [[0, 1, 2, 3]]),
        ([4, 4, 4, 4], 4, [[0], [1], [2], [3]]),
    ],
)
def test_members_are_grouped_by_samples(
    shares: list[int], groups: int, expected: list[list[int]]
) -> None:
    assert member_groups(shares, groups) == expected


@pytest.mark.parametrize(
    ("threads", "members", "count"),
    [(2, 4, 2), (1, 4, 1), (2, 1, 1), (3, 4, 3), (4, 4, 4), (16, 4, 1), (6, 4, 1), (3, 2, 1)],
)
def test_member_thread_count(threads: int, members: int, count: int) -> None:
    assert member_thread_count(threads, members) == count


@pytest.mark.usefixtures("two_torch_threads")
def test_member_threads_run_one_torch_thread_each_and_leave_the_default_alone() -> None:
    """The pool's threads sample on one torch thread each; a thread started afterwards still
    gets the process's count (torch.set_num_threads also sets what new threads take)."""
    members = MemberThreads(2)
    inside = set(members.pool.map(lambda _: torch.get_num_threads(), range(8)))
    assert inside == {1}
    with ThreadPoolExecutor(1) as fresh:
        assert fresh.submit(torch.get_num_threads).result() == 2
    assert torch.get_num_threads() == 2
    members.pool.shutdown()
