"""The bench's overhead rounds: the rate it reports belongs to the round of the median overhead."""

from __future__ import annotations

import statistics

import pytest

from worker.bench.run import median_round


@pytest.mark.parametrize(
    "overheads",
    [[0.084, 0.030, 0.024], [0.054, 0.025, 0.028], [0.01, 0.02, 0.03], [0.05], [0.3, 0.1, 0.2]],
)
def test_the_median_round_is_the_round_of_the_median(overheads: list[float]) -> None:
    i = median_round(overheads)
    assert overheads[i] == statistics.median(overheads)


def test_an_even_count_takes_the_lower_middle() -> None:
    assert median_round([0.4, 0.1, 0.3, 0.2]) == 3  # sorted 0.1, 0.2, 0.3, 0.4: 0.2
