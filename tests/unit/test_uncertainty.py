"""MC Dropout statistics against values computed by hand from the formulas in the module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.inference.uncertainty import (
    STD_FLOOR,
    McAccumulator,
    binary_entropy,
    summarise_samples,
)

TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# S = 3 samples, B = 2 posts, L = 2 labels: SAMPLES[s][b][l]
SAMPLES = np.array(
    [
        [[0.9, 0.2], [0.6, 0.1]],
        [[0.7, 0.4], [0.4, 0.1]],
        [[0.8, 0.3], [0.45, 0.1]],
    ]
)
THRESHOLDS = np.array([0.5, 0.35])


def h(p: float) -> float:
    """Binary entropy in nats, written out."""
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


# --- the expected values, by hand -----------------------------------------------------------------
# post 0, label 0: samples 0.9, 0.7, 0.8 -> mean 0.8; deviations +0.1, -0.1, 0 -> var 0.02 / 2
# post 0, label 1: samples 0.2, 0.4, 0.3 -> mean 0.3; deviations -0.1, +0.1, 0 -> var 0.02 / 2
# post 1, label 0: samples 0.6, 0.4, 0.45 -> mean 1.45 / 3
# post 1, label 1: samples 0.1, 0.1, 0.1 -> mean 0.1, std 0
M10 = 1.45 / 3
EXPECTED_MEAN = np.array([[0.8, 0.3], [M10, 0.1]])
EXPECTED_STD = np.array(
    [
        [math.sqrt(0.02 / 2), math.sqrt(0.02 / 2)],
        [math.sqrt(((0.6 - M10) ** 2 + (0.4 - M10) ** 2 + (0.45 - M10) ** 2) / 2), 0.0],
    ]
)
# predictive entropy: the binary entropies of the means, summed over labels
EXPECTED_PE = np.array([h(0.8) + h(0.3), h(M10) + h(0.1)])
# expected entropy: per sample the summed binary entropies, averaged over the 3 samples
EXPECTED_EE = np.array(
    [
        ((h(0.9) + h(0.2)) + (h(0.7) + h(0.4)) + (h(0.8) + h(0.3))) / 3,
        ((h(0.6) + h(0.1)) + (h(0.4) + h(0.1)) + (h(0.45) + h(0.1))) / 3,
    ]
)
EXPECTED_MI = EXPECTED_PE - EXPECTED_EE
# flip rate: the share of samples on the other side of the threshold from the mean
# post 0, label 0: mean 0.8 >= 0.5, all samples >= 0.5                -> 0
# post 0, label 1: mean 0.3 < 0.35, sample 0.4 >= 0.35                -> 1/3
# post 1, label 0: mean 0.483 < 0.5, sample 0.6 >= 0.5                -> 1/3
# post 1, label 1: mean 0.1 < 0.35, all samples < 0.35                -> 0
EXPECTED_FLIP = np.array([[0.0, 1 / 3], [1 / 3, 0.0]])
# threshold distance: min over labels of |mean - t| / max(std, STD_FLOOR)
EXPECTED_DISTANCE = np.array(
    [
        min(abs(0.8 - 0.5) / 0.1, abs(0.3 - 0.35) / 0.1),  # = 0.5
        min(abs(M10 - 0.5) / EXPECTED_STD[1, 0], abs(0.1 - 0.35) / STD_FLOOR),
    ]
)


def test_hand_computed_expectations_are_what_the_comments_say() -> None:
    assert EXPECTED_STD[0, 0] == pytest.approx(0.1)
    assert EXPECTED_DISTANCE[0] == pytest.approx(0.5)
    assert EXPECTED_MI[0] > 0 and EXPECTED_MI[1] > 0


def test_summary_matches_the_formulas() -> None:
    summary = summarise_samples(SAMPLES, THRESHOLDS)
    assert len(summary) == 2
    np.testing.assert_array_equal(summary.n_samples, [3, 3])
    np.testing.assert_allclose(summary.mean, EXPECTED_MEAN, rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.std, EXPECTED_STD, rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.predictive_entropy, EXPECTED_PE, rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.expected_entropy, EXPECTED_EE, rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.mutual_information, EXPECTED_MI, rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.flip_rate, EXPECTED_FLIP, rtol=0, atol=TOL)
    np.testing.assert_allclose(
        summary.threshold_distance(THRESHOLDS), EXPECTED_DISTANCE, rtol=0, atol=TOL
    )


def test_summary_from_float32_samples_is_computed_in_float64() -> None:
    """The model produces float32; the sums are float64 so the result is the float32 input's."""
    samples32 = SAMPLES.astype(np.float32)
    summary = summarise_samples(samples32, THRESHOLDS)
    assert summary.mean.dtype == np.float64
    exact = samples32.astype(np.float64)
    np.testing.assert_allclose(summary.mean, exact.mean(axis=0), rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.std[0], exact.std(axis=0, ddof=1)[0], rtol=0, atol=TOL)


def test_threshold_distance_uses_the_std_floor_for_certain_labels() -> None:
    samples = np.full((4, 1, 2), 0.2)
    samples[:, 0, 1] = [0.7, 0.7, 0.7, 0.7]
    summary = summarise_samples(samples, np.array([0.5, 0.5]))
    # label 0: |0.2 - 0.5| / 1e-3 = 300, label 1: |0.7 - 0.5| / 1e-3 = 200
    assert summary.threshold_distance(np.array([0.5, 0.5]))[0] == pytest.approx(200.0, rel=1e-4)


def test_chunked_adds_equal_adding_all_samples_at_once() -> None:
    reference = summarise_samples(SAMPLES, THRESHOLDS)
    acc = McAccumulator(2, 2, torch.as_tensor(THRESHOLDS))
    # call 1: sample 0 of both posts
    acc.add(torch.tensor([0, 1]), torch.as_tensor(SAMPLES[0]))
    # call 2: samples 1 and 2 of post 0 (a repeated row) and sample 1 of post 1, mixed order
    acc.add(
        torch.tensor([0, 1, 0]),
        torch.as_tensor(np.stack([SAMPLES[1, 0], SAMPLES[1, 1], SAMPLES[2, 0]])),
    )
    # call 3: the last sample of post 1 only
    acc.add(torch.tensor([1]), torch.as_tensor(SAMPLES[2, 1:2]))
    chunked = acc.summary()
    np.testing.assert_array_equal(chunked.n_samples, [3, 3])
    for name in (
        "mean",
        "std",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "flip_rate",
    ):
        np.testing.assert_allclose(
            getattr(chunked, name), getattr(reference, name), rtol=0, atol=1e-12, err_msg=name
        )
    np.testing.assert_allclose(chunked.mean, EXPECTED_MEAN, rtol=0, atol=TOL)


def test_random_chunking_equals_all_at_once() -> None:
    rng = np.random.default_rng(7)
    s, b, n_labels = 12, 5, 28
    samples = rng.uniform(0.001, 0.999, size=(s, b, n_labels))
    thresholds = rng.uniform(0.2, 0.8, size=n_labels)
    reference = summarise_samples(samples, thresholds)
    acc = McAccumulator(b, n_labels, torch.as_tensor(thresholds))
    # all (sample, post) pairs in a random order, added in chunks of random sizes
    pairs = [(i, j) for i in range(s) for j in range(b)]
    order = rng.permutation(len(pairs))
    start = 0
    while start < len(order):
        size = int(rng.integers(1, 9))
        chunk = [pairs[k] for k in order[start : start + size]]
        rows = torch.tensor([j for _, j in chunk])
        probs = torch.as_tensor(np.stack([samples[i, j] for i, j in chunk]))
        acc.add(rows, probs)
        start += size
    chunked = acc.summary()
    np.testing.assert_array_equal(chunked.n_samples, [s] * b)
    for name in ("mean", "std", "predictive_entropy", "expected_entropy", "flip_rate"):
        np.testing.assert_allclose(
            getattr(chunked, name), getattr(reference, name), rtol=0, atol=1e-12, err_msg=name
        )


def test_a_new_post_sampled_several_times_in_one_add_keeps_exact_statistics() -> None:
    """Its first sample in that pass becomes its shift (chosen on the device, no host check):
    identical samples still give exactly zero spread, different ones the reference's."""
    acc = McAccumulator(3, 2, torch.as_tensor(THRESHOLDS))
    same = np.array([0.7, 0.9999])
    acc.add(
        torch.tensor([0, 1, 0, 1, 0]),
        torch.as_tensor(np.stack([same, SAMPLES[0, 1], same, SAMPLES[1, 1], same])),
    )
    acc.add(torch.tensor([1, 0]), torch.as_tensor(np.stack([SAMPLES[2, 1], same])))
    summary = acc.summary()
    np.testing.assert_array_equal(summary.n_samples, [4, 3, 0])
    np.testing.assert_array_equal(summary.std[0], [0.0, 0.0])
    np.testing.assert_array_equal(summary.mean[0], same)
    reference = summarise_samples(SAMPLES, THRESHOLDS)
    np.testing.assert_allclose(summary.mean[1], reference.mean[1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(summary.std[1], reference.std[1], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(summary.mean[2], [0.0, 0.0])  # never sampled


def test_posts_with_different_sample_counts() -> None:
    acc = McAccumulator(2, 2, torch.as_tensor(THRESHOLDS))
    acc.add(torch.tensor([0, 0, 0, 1]), torch.as_tensor(np.stack([*SAMPLES[:, 0], SAMPLES[0, 1]])))
    summary = acc.summary()
    np.testing.assert_array_equal(summary.n_samples, [3, 1])
    np.testing.assert_allclose(summary.mean[0], EXPECTED_MEAN[0], rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.std[0], EXPECTED_STD[0], rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.mean[1], SAMPLES[0, 1], rtol=0, atol=TOL)
    np.testing.assert_array_equal(summary.std[1], [0.0, 0.0])


def test_mutual_information_is_never_negative() -> None:
    rng = np.random.default_rng(11)
    for trial in range(50):
        s = int(rng.integers(1, 20))
        samples = rng.beta(0.5, 0.5, size=(s, 4, 28))  # mass near 0 and 1: large entropies
        summary = summarise_samples(samples, np.full(28, 0.5))
        assert (summary.mutual_information >= 0).all(), trial
        # Jensen: the entropy of the mean is at least the mean entropy (up to rounding)
        assert (summary.predictive_entropy >= summary.expected_entropy - 1e-12).all(), trial


def test_single_sample_has_zero_std_flip_and_mutual_information() -> None:
    summary = summarise_samples(SAMPLES[:1], THRESHOLDS)
    np.testing.assert_array_equal(summary.n_samples, [1, 1])
    np.testing.assert_array_equal(summary.std, np.zeros((2, 2)))
    np.testing.assert_array_equal(summary.flip_rate, np.zeros((2, 2)))
    np.testing.assert_allclose(summary.mean, SAMPLES[0], rtol=0, atol=TOL)
    np.testing.assert_allclose(summary.mutual_information, [0.0, 0.0], rtol=0, atol=TOL)
    np.testing.assert_allclose(
        summary.predictive_entropy, [h(0.9) + h(0.2), h(0.6) + h(0.1)], rtol=0, atol=TOL
    )


def test_identical_samples_of_exactly_representable_values_have_zero_std() -> None:
    samples = np.full((30, 1, 3), 0.5)
    samples[:, 0, 1] = 0.25
    samples[:, 0, 2] = 0.125
    summary = summarise_samples(samples, np.full(3, 0.4))
    np.testing.assert_array_equal(summary.std, np.zeros((1, 3)))
    np.testing.assert_array_equal(summary.flip_rate, np.zeros((1, 3)))


def test_identical_samples_have_zero_std() -> None:
    samples = np.full((30, 1, 2), 0.7)
    samples[:, 0, 1] = 0.9999
    summary = summarise_samples(samples, np.full(2, 0.5))
    np.testing.assert_allclose(summary.std, np.zeros((1, 2)), rtol=0, atol=TOL)


def test_empty_accumulator_is_all_zero() -> None:
    summary = McAccumulator(3, 2, torch.as_tensor(THRESHOLDS)).summary()
    np.testing.assert_array_equal(summary.n_samples, [0, 0, 0])
    np.testing.assert_array_equal(summary.mean, np.zeros((3, 2)))
    np.testing.assert_array_equal(summary.std, np.zeros((3, 2)))


def test_binary_entropy_matches_the_formula_and_is_finite_at_the_ends() -> None:
    p = torch.tensor([0.0, 1e-15, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    values = binary_entropy(p)
    assert torch.isfinite(values).all()
    assert values[0].item() == pytest.approx(0.0, abs=1e-9)
    assert values[-1].item() == pytest.approx(0.0, abs=1e-9)
    assert values[2].item() == pytest.approx(h(0.1), abs=TOL)
    assert values[3].item() == pytest.approx(math.log(2), abs=TOL)
    assert values[4].item() == pytest.approx(h(0.9), abs=TOL)


def test_samples_exactly_at_the_threshold_count_as_above() -> None:
    """flip_rate uses p >= t on both sides, like the predicted label set."""
    samples = np.array([[[0.5]], [[0.5]], [[0.2]]])  # mean 0.4 < 0.5; two samples >= 0.5
    summary = summarise_samples(samples, np.array([0.5]))
    assert summary.flip_rate[0, 0] == pytest.approx(2 / 3, abs=TOL)
