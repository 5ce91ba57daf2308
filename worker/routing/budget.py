"""The review budget: route the most uncertain share of posts, at a rate the team can staff.

The controller keeps a sliding window of the last ``window`` review scores: a streaming estimate of
their distribution. A post is routed when its score lies in the top ``rate`` share of that window:

* scores above the window's (1 - rate) quantile are routed;
* scores *equal* to it (ties: many posts with the same score) are routed for the fraction of them
  that keeps the expected share at ``rate``, spread evenly over the stream by a deterministic
  credit counter, so a tied mass at the cut never overshoots the target;
* below it, nothing.

On a steady stream the routed share converges to ``rate``; after a shift of the score distribution
it converges again once the window has filled with the new scores (within ``window`` posts).

Warm-up: there is no distribution at start-up. Once ``min(warmup, 20)`` scores have been seen the
controller routes by the quantile of what it has seen so far (with 20 scores and a 5 % target that
is "the highest score so far"), so a fresh worker starts routing within its first batch; decisions
are flagged ``warming_up`` until ``warmup`` scores have been seen.

Forced posts (a watch-listed label) are always routed. With ``count_forced`` (the default) they
count toward the target: the scores route ``(rate - forced share) / (1 - forced share)`` of the
other posts, so the total share stays at ``rate`` (unless forced posts alone exceed it).

A cap per minute lowers the effective rate when traffic rises: rate = min(target, cap / posts per
minute), the posts per minute counted over the last minute (or over the last ten seconds when
that is more: a burst lowers the rate within seconds). Two more mechanisms keep the routed
count at the cap without ever exceeding it:

* pacing: a token bucket refilled at cap / 60 per second and spent by every routed post, holding at
  most 3 seconds of allowance ahead or behind. Routing behind pace (tokens left over: too few
  posts scored above the cut) raises the capped rate up to 5x; routing ahead of pace lowers it down
  to 0. Without it the routed count per minute scatters like a Poisson count (30 +- 5.5 at a cap of
  30) and the hard limit below would only cut the high side;
* a hard limit: a post is routed by score only while fewer than ``cap`` posts were routed in the
  last 60 seconds, so no 60-second window (and no clock minute) exceeds the cap, however bursty the
  traffic. Forced posts are never held back, but they count.

Each worker of a consumer group runs its own controller over its own partitions' posts; see the
README for how that adds up.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

MIN_WARMUP = 20  # scores needed before the quantile of what was seen is used
PACE_SECONDS = 3.0  # the pacing bucket holds this many seconds of the cap, ahead or behind
SHORT_SECONDS = 10  # traffic is also measured over this many seconds, to see bursts early
MAX_GAIN = 5.0  # a full bucket (routing behind the cap) raises the capped rate up to 5x


class BudgetDecision(NamedTuple):
    """One post's verdict (a named tuple: one per post, and half the cost of a frozen
    dataclass's construction)."""

    routed: bool
    priority: int  # 0-100: percentile of the score among recent posts
    cut: float | None  # the score a post needed to be routed (None before any estimate)
    rate: float  # the effective target share at this moment
    warming_up: bool = False  # fewer than ``warmup`` scores seen: the estimate is still rough


class ReviewBudget:
    def __init__(
        self,
        target_rate: float | None,
        max_per_minute: float | None = None,
        window: int = 5_000,
        warmup: int = 200,
        clock: Callable[[], float] = time.monotonic,
        *,
        count_forced: bool = True,
    ) -> None:
        if target_rate is not None and not 0.0 <= target_rate <= 1.0:
            raise ValueError(f"target_rate must lie in [0, 1], not {target_rate}")
        if max_per_minute is not None and max_per_minute <= 0:
            raise ValueError(f"max_per_minute must be positive, not {max_per_minute}")
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.target_rate = target_rate
        self.max_per_minute = max_per_minute
        self.window = window
        self.warmup = warmup
        self.count_forced = count_forced
        self._clock = clock
        self._recent: deque[tuple[float, bool]] = deque()  # (score, forced), oldest first
        self._sorted: list[float] = []  # every score of the window (priorities)
        # scores of the window's posts that were not forced (the cut); None while no forced post
        # is in the window: then they are ``_sorted`` (one sorted list to keep, not two)
        self._free: list[float] | None = None
        self._tie_credit = 0.5
        # per-minute cap: arrivals per whole second, routed timestamps, the token bucket
        self._arrivals: deque[list[int]] = deque()  # [second, count]
        self._arrival_count = 0
        self._routed_times: deque[float] = deque()
        self._bucket_size = (
            None if max_per_minute is None else max(1.0, max_per_minute * PACE_SECONDS / 60)
        )
        self._tokens = 0.0  # in [-bucket, +bucket]: routed posts behind (+) or ahead (-) of pace
        self._last_refill = clock()
        self.seen = 0
        self.routed = 0
        self.routed_forced = 0

    @property
    def enabled(self) -> bool:
        return self.target_rate is not None or self.max_per_minute is not None

    @property
    def routed_share(self) -> float:
        return self.routed / self.seen if self.seen else 0.0

    # -- the score distribution -------------------------------------------------------------------

    def _remember(self, score: float, forced: bool) -> None:
        self._recent.append((score, forced))
        if forced and self._free is None:
            self._free = list(self._sorted)  # the window's scores, all free until this one
        bisect.insort(self._sorted, score)
        if not forced and self._free is not None:
            bisect.insort(self._free, score)
        if len(self._recent) > self.window:
            old, old_forced = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            if self._free is not None and not old_forced:
                del self._free[bisect.bisect_left(self._free, old)]
        if self._free is not None and len(self._free) == len(self._recent):
            self._free = None  # no forced post left in the window: every score is free

    @property
    def _free_scores(self) -> list[float]:
        return self._sorted if self._free is None else self._free

    def percentile(self, score: float) -> int:
        """Share of recent posts with a lower score, 0-100 (non-decreasing in ``score``)."""
        if not self._sorted:
            return 50
        below = bisect.bisect_left(self._sorted, score)
        return min(100, round(100 * below / len(self._sorted)))

    # -- the rate ---------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        """Expire what is older than a minute and refill the bucket."""
        second = math.floor(now)
        while self._arrivals and self._arrivals[0][0] < second - 59:
            self._arrival_count -= self._arrivals.popleft()[1]
        while self._routed_times and now - self._routed_times[0] >= 60.0:
            self._routed_times.popleft()
        if self.max_per_minute is not None and self._bucket_size is not None:
            elapsed = max(0.0, now - self._last_refill)
            self._tokens = min(
                self._bucket_size, self._tokens + elapsed * self.max_per_minute / 60.0
            )
        self._last_refill = now

    def _arrive(self, now: float) -> None:
        second = math.floor(now)
        if self._arrivals and self._arrivals[-1][0] == second:
            self._arrivals[-1][1] += 1
        else:
            self._arrivals.append([second, 1])
        self._arrival_count += 1

    def posts_per_minute(self) -> float:
        """Posts per minute: the larger of the last minute's rate and the last ten seconds' (so a
        burst is seen within seconds), each over the time it covers since the first arrival."""
        if not self._arrivals:
            return 0.0
        now = self._clock()
        second = math.floor(now)
        recent, recent_start = 0, second
        for bin_second, count in reversed(self._arrivals):
            if bin_second < second - SHORT_SECONDS + 1:
                break
            recent, recent_start = recent + count, bin_second
        long_span = min(60.0, max(1.0, now - self._arrivals[0][0]))
        short_span = min(SHORT_SECONDS, max(1.0, now - recent_start))
        return max(self._arrival_count * 60.0 / long_span, recent * 60.0 / short_span)

    def effective_rate(self) -> float:
        """The share of all posts to route now: the target, lowered by the per-minute cap."""
        rate = 1.0 if self.target_rate is None else self.target_rate
        if self.max_per_minute is not None and self._bucket_size is not None:
            per_minute = max(self.posts_per_minute(), 1.0)
            level = self._tokens / self._bucket_size  # in [-1, 1]
            gain = 1.0 + level * (MAX_GAIN - 1.0 if level > 0 else 1.0)
            rate = min(rate, self.max_per_minute / per_minute * gain)
        return rate

    def _score_rate(self, rate: float) -> float:
        """Share of the non-forced posts the scores route, so that the total share is ``rate``."""
        if not self.count_forced or not self._recent:
            return rate
        forced = 1.0 - len(self._free_scores) / len(self._recent)
        if forced >= 1.0:
            return rate
        return min(1.0, max(0.0, (rate - forced) / (1.0 - forced)))

    def _cut(self, rate: float) -> tuple[float, float] | None:
        """(cut score, share of the scores equal to it to route); None before an estimate."""
        if len(self._sorted) < max(1, min(self.warmup, MIN_WARMUP, self.window)):
            return None
        scores = self._free_scores
        n = len(scores)
        if n == 0:
            return None
        wanted = self._score_rate(rate) * n  # posts of the window above the cut (expected)
        if wanted >= n:
            return float("-inf"), 1.0
        if wanted <= 0:
            return float("inf"), 0.0
        cut = scores[min(n - 1, int(n - wanted))]
        above = n - bisect.bisect_right(scores, cut)
        ties = bisect.bisect_right(scores, cut) - bisect.bisect_left(scores, cut)
        return cut, min(1.0, max(0.0, (wanted - above) / ties))

    def cut(self) -> float | None:
        """The score at the (1 - rate) quantile of the window; None before an estimate."""
        found = self._cut(self.effective_rate())
        return None if found is None else found[0]

    # -- decisions --------------------------------------------------------------------------------

    def _passes(self, score: float, cut: float, tie_share: float) -> bool:
        if score > cut:
            return True
        if score < cut or tie_share <= 0.0:
            return False
        self._tie_credit += tie_share
        if self._tie_credit >= 1.0:
            self._tie_credit -= 1.0
            return True
        return False

    def _under_cap(self) -> bool:
        return self.max_per_minute is None or len(self._routed_times) < self.max_per_minute

    def decide(self, score: float, forced: bool = False) -> BudgetDecision:
        """Record one post's score; route it when it is in the top share (or ``forced``)."""
        now = self._clock()
        self._tick(now)
        self.seen += 1
        self._arrive(now)
        rate = self.effective_rate()
        found = self._cut(rate)
        priority = self.percentile(score)
        warming_up = self.seen <= self.warmup
        if forced:
            routed = True
        elif not self.enabled or found is None:
            routed = False
        else:
            routed = self._passes(score, *found) and self._under_cap()
        self._remember(score, forced)
        if routed:
            self.routed += 1
            self.routed_forced += forced
            if self.max_per_minute is not None and self._bucket_size is not None:
                self._routed_times.append(now)
                self._tokens = max(-self._bucket_size, self._tokens - 1.0)
        return BudgetDecision(
            routed=routed,
            priority=priority,
            cut=None if found is None else found[0],
            rate=rate,
            warming_up=warming_up,
        )
