"""An ensemble's members sampled at once on the CPU, each group of members on a thread of its own
with one torch thread, instead of one member after another with every op split over
all the threads.

Why: most of an MC pass is small ops (softmax over ~20 keys, layer norms, masks, casts, dropout,
attention's small matmuls) that take microseconds, and with two OpenMP threads each ends at a
barrier where one thread waits for the other. Two single-threaded streams of passes never wait on
each other. Measured (2026-12-04, 2 cores, Intel Xeon with AMX, the default four-member
ensemble in bfloat16, 512 dev posts, N = 30, three interleaved rounds, one process): full MC
25.3-27.4 posts/s one member after another in batches of 64, 31.3-33.4 with two member threads
(1.18-1.26x), 31.1-34.3 against 37.3-39.1 in batches of 256; fast MC 38.2-42.5 against 45.9-47.0
in batches of 64, 49.2-53.2 against 57.6-63.6 in 256. Splitting the batch instead (two engines
on its two halves) made smaller, more padded passes and gained little (docs/performance.md);
splitting the members keeps every pass as it was: the same posts, widths and token budget, and
no second copy of any model.

The members' samples go into one accumulator under a lock (a sample's sums are added in one
step). Used by unseeded engines only: the dropout masks come from torch's one generator, which
the threads would draw from in an order that changes from run to run.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from worker.inference.uncertainty import McAccumulator

STARTUP_TIMEOUT_S = 60.0  # the pool's threads must all start within this


class SampleSink(Protocol):
    """Where ``McDropoutEngine._sample`` puts its samples."""

    def add(self, rows: torch.Tensor, probs: torch.Tensor) -> None: ...

    def add_features(self, rows: torch.Tensor, features: torch.Tensor) -> None: ...


class LockedAccumulator:
    """An ``McAccumulator`` that several threads add samples to."""

    def __init__(self, acc: McAccumulator) -> None:
        self.acc = acc
        self.lock = threading.Lock()

    def add(self, rows: torch.Tensor, probs: torch.Tensor) -> None:
        with self.lock:
            self.acc.add(rows, probs)

    def add_features(self, rows: torch.Tensor, features: torch.Tensor) -> None:
        with self.lock:
            self.acc.add_features(rows, features)


def member_groups(shares: list[int], groups: int) -> list[list[int]]:
    """The members (indices of ``shares``, the samples each draws) split into at most ``groups``
    non-empty groups of about equal samples: the largest share first to the lightest group.
    Members with no samples are left out."""
    loads = [0] * groups
    out: list[list[int]] = [[] for _ in range(groups)]
    for member in sorted(range(len(shares)), key=lambda i: (-shares[i], i)):
        if shares[member] <= 0:
            continue
        lightest = min(range(groups), key=lambda g: (loads[g], g))
        out[lightest].append(member)
        loads[lightest] += shares[member]
    return [sorted(g) for g in out if g]


def member_thread_count(threads: int, members: int) -> int:
    """Threads to sample an ensemble of ``members`` on, given ``threads`` torch threads: one per
    torch thread, each single-threaded, when there are 2 to ``members`` threads; else 1 (no member
    threads). With more threads than members each group would run an OpenMP team of its own
    beside the calling thread's, more OpenMP threads than CPUs, which GNU OpenMP runs throttled
    (``model_thread.py``); that arrangement was not measured."""
    return threads if 2 <= threads <= members else 1


def _one_torch_thread() -> None:
    """A pool thread's initializer: torch's per-thread setup first (it would otherwise copy the
    process default over the count at the thread's first op), then one thread."""
    torch.get_num_threads()
    torch.set_num_threads(1)


class MemberThreads:
    """The pool the member groups run on: ``count`` threads of one torch thread each (set once
    per thread: setting it clears oneDNN's compiled kernels). The threads start here, and the
    process default that ``torch.set_num_threads`` also sets (what threads started later take)
    is given back afterwards."""

    def __init__(self, count: int) -> None:
        self.count = count
        before = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(
            count, thread_name_prefix="emoworker-members", initializer=_one_torch_thread
        )
        started = threading.Barrier(count, timeout=STARTUP_TIMEOUT_S)  # one task per thread
        try:
            list(self.pool.map(lambda _: started.wait(), range(count)))
        except BaseException:
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            torch.set_num_threads(before)
