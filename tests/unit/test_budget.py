"""The review budget controller on synthetic score streams: the routed share converges to the
target (ties and distribution shifts included), the per-minute cap holds, priorities are
percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from worker.routing.budget import MIN_WARMUP, ReviewBudget

N = 20_000
WARMUP = 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lognormal(seed: int = 0, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(0.0, 1.0, n)


def run(budget: ReviewBudget, scores: np.ndarray, forced: np.ndarray | None = None) -> np.ndarray:
    flags = np.zeros(len(scores), dtype=bool) if forced is None else forced
    return np.array(
        [budget.decide(float(s), forced=bool(f)).routed for s, f in zip(scores, flags, strict=True)]
    )


@pytest.mark.parametrize("target", [0.05, 0.10, 0.20])
@pytest.mark.parametrize("kind", ["lognormal", "beta"])
def test_routed_share_converges_to_the_target(target: float, kind: str) -> None:
    rng = np.random.default_rng(1)
    scores = rng.lognormal(0.0, 1.0, N) if kind == "lognormal" else rng.beta(0.5, 5.0, N)
    budget = ReviewBudget(target, warmup=WARMUP)
    routed = run(budget, scores)
    assert routed[WARMUP:].mean() == pytest.approx(target, abs=0.01)
    # and it routes the high scores: almost everything routed is above the (1 - 2 target) quantile
    assert (scores[routed] >= np.quantile(scores, 1 - 2 * target)).mean() > 0.95
    assert budget.routed_share == pytest.approx(routed.mean())
    assert budget.seen == N


@pytest.mark.parametrize("target", [0.05, 0.10, 0.20])
@pytest.mark.parametrize("where", ["median", "top", "bottom"])
def test_heavy_ties_do_not_overshoot(target: float, where: str) -> None:
    """Half of the scores identical: a tied mass at (or around) the cut is routed for just the
    share that keeps the target."""
    rng = np.random.default_rng(2)
    scores = rng.lognormal(0.0, 1.0, N)
    value = {"median": np.median(scores), "top": scores.max() + 1, "bottom": 0.0}[where]
    scores[rng.random(N) < 0.5] = value
    routed = run(ReviewBudget(target, warmup=WARMUP), scores)
    assert routed[WARMUP:].mean() == pytest.approx(target, abs=0.01)


def test_all_scores_identical() -> None:
    """A score that cannot rank (e.g. mutual information of a deterministic model: all 0) still
    routes the target share, spread evenly over the stream."""
    routed = run(ReviewBudget(0.05, warmup=WARMUP), np.zeros(N))
    assert routed[WARMUP:].mean() == pytest.approx(0.05, abs=0.002)
    gaps = np.diff(np.flatnonzero(routed[WARMUP:]))
    assert gaps.min() >= 19 and gaps.max() <= 21, "ties are routed evenly, not in bursts"


def test_ties_at_the_cut_are_routed_in_proportion() -> None:
    """90 % of the posts share the lowest score and the target is 20 %: all the 10 % distinct
    posts are routed, plus 1/9 of the tied ones."""
    rng = np.random.default_rng(3)
    scores = np.where(rng.random(N) < 0.9, 0.0, 1.0 + rng.random(N))
    routed = run(ReviewBudget(0.2, warmup=WARMUP), scores)
    after = slice(5_000, None)
    assert routed[after].mean() == pytest.approx(0.2, abs=0.01)
    assert routed[after][scores[after] > 0].mean() > 0.99
    assert routed[after][scores[after] == 0].mean() == pytest.approx(1 / 9, abs=0.01)


@pytest.mark.parametrize("target", [0.05, 0.20])
def test_reconverges_after_a_distribution_shift(target: float) -> None:
    window = 5_000
    scores = lognormal(4, 2 * N)
    shift = N
    scores[shift:] *= 3.0
    routed = run(ReviewBudget(target, window=window, warmup=WARMUP), scores)
    assert routed[WARMUP:shift].mean() == pytest.approx(target, abs=0.01)
    assert routed[shift : shift + window].mean() > target + 0.01, "the shift is seen"
    assert routed[shift + window :].mean() == pytest.approx(target, abs=0.01)


def test_warm_up_routes_by_the_quantile_of_what_was_seen() -> None:
    budget = ReviewBudget(0.1, warmup=WARMUP)
    scores = lognormal(5, 1_000)
    decisions = [budget.decide(float(s)) for s in scores]
    assert not any(d.routed for d in decisions[: MIN_WARMUP - 1]), "no estimate yet"
    assert all(d.cut is None for d in decisions[: MIN_WARMUP - 1])
    assert all(d.cut is not None for d in decisions[MIN_WARMUP:])
    assert [d.warming_up for d in decisions] == [i < WARMUP for i in range(1_000)]
    early = np.array([d.routed for d in decisions[MIN_WARMUP:WARMUP]])
    assert 0.02 < early.mean() < 0.25, "a fresh worker starts routing within its first posts"
    # once warm, a score above everything seen is routed and one below the median is not
    assert budget.decide(float(scores.max()) + 1).routed
    assert not budget.decide(float(np.median(scores)) / 2).routed


def test_a_small_warmup_routes_from_the_first_posts() -> None:
    budget = ReviewBudget(0.5, warmup=2)
    decisions = [budget.decide(s) for s in [1.0, 2.0, 3.0, 0.5, 4.0]]
    assert [d.cut is None for d in decisions] == [True, True, False, False, False]
    assert [d.routed for d in decisions] == [False, False, True, False, True]


def test_disabled_budget_routes_only_forced_posts() -> None:
    budget = ReviewBudget(None, None)
    assert not budget.enabled
    scores = lognormal(6, 2_000)
    forced = np.arange(2_000) % 7 == 0
    routed = run(budget, scores, forced)
    np.testing.assert_array_equal(routed, forced)


def test_forced_posts_are_routed_and_count_toward_the_target() -> None:
    rng = np.random.default_rng(7)
    scores = rng.lognormal(0.0, 1.0, N)
    forced = rng.random(N) < 0.03
    counted = run(ReviewBudget(0.10, warmup=WARMUP), scores, forced)
    assert counted[forced].all()
    assert counted[WARMUP:].mean() == pytest.approx(0.10, abs=0.01)
    separate = run(ReviewBudget(0.10, warmup=WARMUP, count_forced=False), scores, forced)
    assert separate[forced].all()
    assert separate[WARMUP:].mean() == pytest.approx(0.13, abs=0.01)
    # forced posts beyond the target: everything else waits
    swamped = run(ReviewBudget(0.02, warmup=WARMUP), scores, forced)
    assert swamped[WARMUP:][~forced[WARMUP:]].mean() < 0.002


def test_zero_target_routes_only_forced_posts() -> None:
    budget = ReviewBudget(0.0, warmup=0)
    assert budget.enabled
    assert not any(budget.decide(float(s)).routed for s in lognormal(8, 500))
    assert budget.decide(0.0, forced=True).routed


def per_minute_counts(routed: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, int]:
    """Routed posts per clock minute, and the most in any 60-second window."""
    minutes = np.bincount(times[routed].astype(np.int64) // 60)
    t = times[routed]
    sliding = int((np.searchsorted(t, t + 60.0, side="left") - np.arange(len(t))).max())
    return minutes, sliding


def test_per_minute_cap_holds_and_is_used() -> None:
    """1,000 posts per simulated minute, a cap of 30 per minute, a target of 10 % (100/minute):
    the cap binds; every minute routes between 0.9 x cap and cap, never more in any 60 s."""
    clock = FakeClock()
    budget = ReviewBudget(0.10, max_per_minute=30, warmup=WARMUP, clock=clock)
    scores = lognormal(9)
    times = np.arange(N) * 60.0 / 1_000
    routed = np.zeros(N, dtype=bool)
    for i, (score, t) in enumerate(zip(scores, times, strict=True)):
        clock.now = float(t)
        decision = budget.decide(float(score))
        routed[i] = decision.routed
        assert 0.0 <= decision.rate <= 0.10
    minutes, sliding = per_minute_counts(routed, times)
    assert len(minutes) == N // 1_000
    assert sliding <= 30
    assert minutes.max() <= 30
    assert minutes[1:].min() >= 27, minutes
    # still the most uncertain: nearly all routed posts are in the top 10 % of scores
    assert (scores[routed] >= np.quantile(scores, 0.9)).mean() > 0.95


def test_per_minute_cap_under_changing_traffic_and_bursts() -> None:
    """Traffic at 1,000/min, then a burst at 5,000/min, a quiet spell, then 200/min (where the
    10 % target, 20/min, binds): never more than the cap in any 60 s."""
    clock = FakeClock()
    budget = ReviewBudget(0.10, max_per_minute=30, warmup=WARMUP, clock=clock)
    phases = [(5_000, 1_000), (10_000, 5_000), (2_000, 200)]
    times_list, start = [], 0.0
    for n, per_minute in phases:
        times_list.append(start + np.arange(n) * 60.0 / per_minute)
        start = times_list[-1][-1] + 300.0  # five quiet minutes between phases
    times = np.concatenate(times_list)
    scores = lognormal(10, len(times))
    routed = np.zeros(len(times), dtype=bool)
    for i, (score, t) in enumerate(zip(scores, times, strict=True)):
        clock.now = float(t)
        routed[i] = budget.decide(float(score)).routed
    _, sliding = per_minute_counts(routed, times)
    assert sliding <= 30
    burst = slice(5_000, 15_000)  # two minutes at 5,000/min
    since = times[burst][routed[burst]] - times[5_000]
    assert np.bincount(since.astype(np.int64) // 60).tolist() == [30, 30]
    low = slice(15_000 + 400, None)  # 200/min: the target binds (20/min), not the cap
    assert routed[low].mean() == pytest.approx(0.10, abs=0.02)


def test_forced_posts_go_beyond_the_cap_but_count() -> None:
    clock = FakeClock()
    budget = ReviewBudget(0.5, max_per_minute=10, warmup=0, clock=clock)
    for i in range(600):  # a minute at 600/min, every post forced
        clock.now = i * 0.1
        assert budget.decide(1.0, forced=True).routed
    clock.now = 60.05
    assert not budget.decide(100.0).routed, "forced posts used up the allowance"


def test_priority_is_the_percentile_and_monotone_in_the_score() -> None:
    budget = ReviewBudget(0.05, window=1_000, warmup=0)
    rng = np.random.default_rng(11)
    for s in rng.random(1_000):
        budget.decide(float(s))
    probes = np.linspace(-0.1, 1.1, 241)
    priorities = [budget.percentile(float(p)) for p in probes]
    assert priorities == sorted(priorities), "non-decreasing in the score"
    assert priorities[0] == 0 and priorities[-1] == 100
    for p, priority in zip(probes, priorities, strict=True):
        assert 0 <= priority <= 100
        assert priority == pytest.approx(100 * min(max(p, 0.0), 1.0), abs=4)
    # decide reports the percentile among the window before the post is added
    expected = budget.percentile(0.5)
    assert budget.decide(0.5).priority == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_rate": 1.5}, "target_rate"),
        ({"target_rate": 0.1, "max_per_minute": 0}, "max_per_minute"),
        ({"target_rate": 0.1, "window": 0}, "window"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReviewBudget(**kwargs)  # type: ignore[arg-type]
