"""Batch processors that fail in controlled ways, for the fault tests of both modes."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.inference.uncertainty import McSummary
from worker.processing import BatchProcessor

NAN_MARKER = "zebra"  # a post holding this word gets NaN scores from NanProcessor


class NanProcessor(BatchProcessor):
    """The engine's means turn NaN (label 3) for any post holding ``NAN_MARKER``, as a broken
    checkpoint or a 16-bit overflow would give them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inferred: list[int] = []  # the posts of each inference, in order

    def infer(self, token_ids: list[list[int]]) -> McSummary:
        self.inferred.append(len(token_ids))
        marker = set(self.classifier.tokenize([NAN_MARKER])[0][1:-1])
        summary = super().infer(token_ids)
        for row, ids in enumerate(token_ids):
            if marker <= set(ids):
                summary.mean[row, 3] = np.nan
        return summary
