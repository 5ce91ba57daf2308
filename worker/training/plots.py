"""PNG plots for ``emoworker evaluate`` (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from worker.training.report import RoutingResult

STYLES: dict[str, dict[str, Any]] = {
    "oracle": {"color": "black", "linestyle": ":"},
    "det_entropy": {"color": "tab:gray", "linestyle": "--"},
    "det_threshold_margin": {"color": "tab:brown", "linestyle": "--"},
}


def rejection_curves(
    curves: dict[str, RoutingResult], path: Path, max_rejected: float = 0.5
) -> None:
    """Per-post F1 of the kept posts against the share sent to review."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in curves.items():
        rejected = 1.0 - r.coverage
        keep = rejected <= max_rejected
        ax.plot(rejected[keep] * 100, r.kept_f1[keep], label=name, **STYLES.get(name, {}))
    for rate in (5, 10, 20):
        ax.axvline(rate, color="lightgray", linewidth=0.8, zorder=0)
    _save(fig, ax, path, "posts sent to review (%)", "per-post F1 of the posts kept",
          "F1 rejection curves (higher is better)", legend=True)  # fmt: skip


def reliability_diagram(
    targets: np.ndarray, probs: np.ndarray, path: Path, bins: int = 15
) -> float:
    """Observed frequency against predicted probability, every label pooled; returns the ECE."""
    p, y = probs.ravel(), targets.ravel()
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    mean_p = np.bincount(index, weights=p, minlength=bins) / np.maximum(counts, 1)
    freq = np.bincount(index, weights=y, minlength=bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(mean_p - freq)) / counts.sum())
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    used = counts > 0
    ax.plot([0, 1], [0, 1], color="lightgray", linestyle="--")
    ax.plot(mean_p[used], freq[used], marker="o")
    _save(fig, ax, path, "mean predicted probability", "observed frequency",
          f"reliability (all labels pooled), ECE {ece:.4f}")  # fmt: skip
    return ece


def probability_uncertainty_scatter(
    mean: np.ndarray, std: np.ndarray, path: Path, max_points: int = 30_000, seed: int = 0
) -> None:
    """Per-label MC mean against MC standard deviation (epistemic spread), every label pooled."""
    m, s = mean.ravel(), std.ravel()
    if len(m) > max_points:
        pick = np.random.default_rng(seed).choice(len(m), max_points, replace=False)
        m, s = m[pick], s[pick]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(m, s, s=2, alpha=0.25)
    grid = np.linspace(0, 1, 200)
    ax.plot(
        grid,
        np.sqrt(grid * (1 - grid)) / 2,
        color="tab:red",
        linewidth=0.8,
        label="sqrt(p(1-p))/2 (for scale)",
    )
    _save(fig, ax, path, "MC mean probability", "MC standard deviation",
          "probability vs uncertainty (every label of every post)", legend=True)  # fmt: skip


def _save(
    fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = False
) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
