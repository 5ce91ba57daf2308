"""A hard cap per minute: at most ``per_minute`` events in any 60-second window."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RateCap:
    def __init__(
        self, per_minute: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute is not None and per_minute <= 0:
            raise ValueError(f"per_minute must be positive, not {per_minute}")
        self.per_minute = per_minute
        self._clock = clock
        self._times: deque[float] = deque()

    def take(self) -> bool:
        """Whether one more event fits now (it is then counted)."""
        if self.per_minute is None:
            return True
        now = self._clock()
        while self._times and self._times[0] <= now - 60.0:
            self._times.popleft()
        if len(self._times) >= self.per_minute:
            return False
        self._times.append(now)
        return True
