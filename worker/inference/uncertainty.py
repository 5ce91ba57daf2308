"""Uncertainty of a multi-label prediction from Monte Carlo Dropout samples.

For a post with S samples of per-label sigmoid outputs p[s, l] and per-label thresholds t[l]
(natural logarithms; H(p) = -p ln p - (1 - p) ln(1 - p) is the binary entropy):

    mean[l]            = (1/S) sum_s p[s, l]
    std[l]             = sqrt( sum_s (p[s, l] - mean[l])^2 / (S - 1) )          (0 when S = 1)
    predictive_entropy = sum_l H(mean[l])                                      (total)
    expected_entropy   = (1/S) sum_s sum_l H(p[s, l])                           (aleatoric)
    mutual_information = predictive_entropy - expected_entropy                 (epistemic, BALD)
    flip_rate[l]       = share of samples s with (p[s, l] >= t[l]) != (mean[l] >= t[l])
    threshold_distance = min_l |mean[l] - t[l]| / max(std[l], 0.001)            (small: ambiguous)

Samples arrive in chunks (adaptive sampling adds samples to some posts only), so the statistics are
kept as running sums, in float64, on the device that computes the samples (on a GPU, moving each
pass's probabilities to the host would stop the device at every pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

EPS = 1e-12
STD_FLOOR = 1e-3  # in probability units; keeps threshold distances finite for very sure labels


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Elementwise H(p) in nats, safe at 0 and 1."""
    q = p.clamp(EPS, 1 - EPS)
    return -(q * q.log() + (1 - q) * torch.log1p(-q))


class McAccumulator:
    """Running sums over MC samples for a batch of posts (float64, on ``device``)."""

    def __init__(
        self,
        n_posts: int,
        n_labels: int,
        thresholds: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.thresholds = thresholds.to(self.device, torch.float64)
        self.count = self._zeros(n_posts)
        # sums are kept around a per-post shift (its first sample), so that the variance does
        # not lose precision to cancellation: identical samples give exactly zero
        self.shift = self._zeros(n_posts, n_labels)
        self.sum = self._zeros(n_posts, n_labels)
        self.sum_sq = self._zeros(n_posts, n_labels)
        self.sum_entropy = self._zeros(n_posts)
        self.above = self._zeros(n_posts, n_labels)
        self.feature_sum: torch.Tensor | None = None  # (n_posts, D), when features are added
        self.feature_count = self._zeros(n_posts)  # samples with features (one member's)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def add(self, rows: torch.Tensor, probs: torch.Tensor) -> None:
        """Add one sample of ``probs`` (len(rows), n_labels) for the posts at ``rows``.

        ``rows`` may repeat a post (several samples in one forward pass).
        """
        p = probs.detach().to(self.device, torch.float64)
        rows = rows.to(self.device)
        # a post's first sample becomes its shift; no host round trip (``if first.any()`` would
        # wait for the device): rows not seen before take their sample, the others keep theirs
        first = (self.count[rows] == 0).unsqueeze(1)
        self.shift[rows] = torch.where(first, p, self.shift[rows])
        centred = p - self.shift[rows]
        self.count.index_add_(
            0, rows, torch.ones(len(rows), dtype=torch.float64, device=self.device)
        )
        self.sum.index_add_(0, rows, centred)
        self.sum_sq.index_add_(0, rows, centred * centred)
        self.sum_entropy.index_add_(0, rows, binary_entropy(p).sum(dim=1))
        self.above.index_add_(0, rows, (p >= self.thresholds).to(torch.float64))

    def add_features(self, rows: torch.Tensor, features: torch.Tensor) -> None:
        """Add one sample of the posts' representations (len(rows), D) (``ood/density.py``);
        an ensemble adds those of its first member only (they are that member's features)."""
        f = features.detach().to(self.device, torch.float64)
        rows = rows.to(self.device)
        if self.feature_sum is None:
            self.feature_sum = self._zeros(len(self.count), f.shape[1])
        self.feature_sum.index_add_(0, rows, f)
        self.feature_count.index_add_(
            0, rows, torch.ones(len(rows), dtype=torch.float64, device=self.device)
        )

    def mean(self) -> torch.Tensor:
        return self.shift + self.sum / self.count.clamp(min=1).unsqueeze(1)

    def std(self) -> torch.Tensor:
        n = self.count.unsqueeze(1)
        centred_mean = self.sum / n.clamp(min=1)
        var = (self.sum_sq - n * centred_mean * centred_mean) / (n - 1).clamp(min=1)
        return var.clamp(min=0).sqrt() * (n > 1)

    def standard_error(self) -> torch.Tensor:
        return self.std() / self.count.clamp(min=1).sqrt().unsqueeze(1)

    def summary(self) -> McSummary:
        mean = self.mean()
        std = self.std()
        n = self.count.clamp(min=1)
        predictive = binary_entropy(mean).sum(dim=1)
        expected = self.sum_entropy / n
        above_share = self.above / n.unsqueeze(1)
        flip = torch.where(mean >= self.thresholds, 1 - above_share, above_share)
        return McSummary(
            mean=mean.cpu().numpy(),
            std=std.cpu().numpy(),
            n_samples=self.count.cpu().numpy().astype(np.int64),
            predictive_entropy=predictive.cpu().numpy(),
            expected_entropy=expected.cpu().numpy(),
            mutual_information=(predictive - expected).clamp(min=0).cpu().numpy(),
            flip_rate=flip.cpu().numpy(),
            features=(
                None
                if self.feature_sum is None
                else (self.feature_sum / self.feature_count.clamp(min=1).unsqueeze(1)).cpu().numpy()
            ),
        )


@dataclass
class McSummary:
    """Per-post results: arrays with posts on the first axis."""

    mean: np.ndarray  # (B, L)
    std: np.ndarray  # (B, L)
    n_samples: np.ndarray  # (B,)
    predictive_entropy: np.ndarray  # (B,)
    expected_entropy: np.ndarray  # (B,)
    mutual_information: np.ndarray  # (B,)
    flip_rate: np.ndarray  # (B, L)
    features: np.ndarray | None = None  # (B, D): the head's input, mean over the samples

    def __len__(self) -> int:
        return len(self.mean)

    def rows(self, index: list[int]) -> McSummary:
        """The posts at ``index``, in that order."""
        return self._select(index)

    def head(self, n: int) -> McSummary:
        """The first ``n`` posts."""
        return self._select(slice(n))

    def _select(self, posts: list[int] | slice) -> McSummary:
        values: dict[str, Any] = {}
        for f in McSummary.__dataclass_fields__:
            v = getattr(self, f)
            values[f] = None if v is None else v[posts]
        return McSummary(**values)

    @classmethod
    def concat(cls, parts: list[McSummary]) -> McSummary:
        """The parts' posts in order (features only when every part has them)."""
        values: dict[str, Any] = {}
        for f in cls.__dataclass_fields__:
            arrays = [getattr(p, f) for p in parts]
            values[f] = None if any(a is None for a in arrays) else np.concatenate(arrays)
        return cls(**values)

    def threshold_distance(self, thresholds: np.ndarray) -> np.ndarray:
        """Per post: the smallest |mean - threshold| over labels in units of that label's std."""
        z = np.abs(self.mean - thresholds) / np.maximum(self.std, STD_FLOOR)
        return np.asarray(z.min(axis=1))


def summarise_samples(samples: np.ndarray, thresholds: np.ndarray) -> McSummary:
    """The same statistics from a full array of samples (S, B, L): the reference in tests."""
    acc = McAccumulator(samples.shape[1], samples.shape[2], torch.as_tensor(thresholds))
    rows = torch.arange(samples.shape[1])
    for s in range(samples.shape[0]):
        acc.add(rows, torch.as_tensor(samples[s]))
    return acc.summary()
