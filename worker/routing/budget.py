"""The review budget: route the most uncertain share of posts, at a rate the team can staff.

The controller keeps a sliding window of recent review scores (a streaming estimate of their
distribution). A post is routed when its score is at or above the window's (1 - rate) quantile, so
on a steady stream the routed share converges to ``rate``. A cap per minute lowers the effective
rate when traffic rises (rate = min(target, cap / posts per minute)), and a token bucket stops
bursts from exceeding the cap. Each worker of a group runs its own controller over its own
partitions; see the README for how that adds up.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetDecision:
    routed: bool
    priority: int  # 0-100: percentile of the score among recent posts
    cut: float | None  # the score a post needed to be routed (None during warm-up)
    rate: float  # the effective target share at this moment


class ReviewBudget:
    def __init__(
        self,
        target_rate: float | None,
        max_per_minute: float | None = None,
        window: int = 5_000,
        warmup: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_rate = target_rate
        self.max_per_minute = max_per_minute
        self.window = window
        self.warmup = warmup
        self._clock = clock
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self._arrivals: deque[float] = deque()  # post timestamps of the last minute
        self._tokens = float(max_per_minute or 0.0)
        self._last_refill = clock()
        self.seen = 0
        self.routed = 0

    @property
    def enabled(self) -> bool:
        return self.target_rate is not None or self.max_per_minute is not None

    def _remember(self, score: float) -> None:
        self._recent.append(score)
        bisect.insort(self._sorted, score)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def percentile(self, score: float) -> int:
        if not self._sorted:
            return 50
        below = bisect.bisect_left(self._sorted, score)
        return min(100, round(100 * below / len(self._sorted)))

    def effective_rate(self) -> float:
        rate = 1.0 if self.target_rate is None else self.target_rate
        if self.max_per_minute is not None:
            now = self._clock()
            while self._arrivals and now - self._arrivals[0] > 60.0:
                self._arrivals.popleft()
            per_minute = max(len(self._arrivals), 1)
            rate = min(rate, self.max_per_minute / per_minute)
        return rate

    def cut(self) -> float | None:
        """Score at the (1 - rate) quantile of the window; None until warmed up."""
        if len(self._sorted) < max(1, min(self.warmup, self.window)):
            return None
        rate = self.effective_rate()
        if rate >= 1.0:
            return float("-inf")
        k = min(len(self._sorted) - 1, int((1.0 - rate) * len(self._sorted)))
        return self._sorted[k]

    def _take_token(self) -> bool:
        if self.max_per_minute is None:
            return True
        now = self._clock()
        self._tokens = min(
            self.max_per_minute,
            self._tokens + (now - self._last_refill) * self.max_per_minute / 60.0,
        )
        self._last_refill = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def decide(self, score: float, forced: bool = False) -> BudgetDecision:
        """Record one post's score; route it when it is in the top share (or ``forced``)."""
        self.seen += 1
        if self.max_per_minute is not None:
            self._arrivals.append(self._clock())
        cut = self.cut()
        priority = self.percentile(score)
        self._remember(score)
        if not self.enabled:
            routed = forced
        elif cut is None:
            # warm-up: no distribution yet; route nothing by score, so start-up never floods review
            routed = forced
        else:
            routed = forced or score >= cut
        if routed and not forced and not self._take_token():
            routed = False
        if routed:
            self.routed += 1
        return BudgetDecision(routed=routed, priority=priority, cut=cut, rate=self.effective_rate())

    @property
    def routed_share(self) -> float:
        return self.routed / self.seen if self.seen else 0.0
