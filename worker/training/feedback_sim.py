"""Does routing by the product's uncertainty teach the model faster than routing random posts?

The GoEmotions simulation of the feedback loop (docs/feedback.md), sized for 2 CPU cores:

1. every train and dev post is embedded once by the frozen base encoder (mean-pooled, unit
   length; cached), so that a retrain is seconds, not hours;
2. the model is an MC Dropout head on those features (dropout on the input and hidden layer),
   trained on ``initial_share`` of train (minus a holdout that sets its thresholds, as a
   bundle's are set on dev);
3. the rest of train streams in ``rounds`` equal chunks of unlabelled posts; from each chunk the
   strategy routes ``budget`` of the posts to review (``expected_risk``: the product's score,
   ``mutual_information``: BALD, ``random``) and the reviewers answer with the gold labels
   (five reviewer ids in turn);
4. after each chunk the head is retrained from scratch on every label so far (the scheduled
   fine-tune, every ``budget * chunk`` verdicts) and its thresholds are recalibrated from the
   verdicts (``worker/feedback/thresholds.py``, with its guards);
5. dev macro-F1 after each round: of the model (thresholds tuned on one half of dev, scored on
   the other: ranking quality alone) and as deployed (holdout thresholds, recalibrated).

What it leaves out: the encoder is frozen (fine-tuning it every round does not fit a 2-core
machine in an hour), so absolute F1 is below the product's; the comparison between strategies is
what it measures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.feedback.thresholds import recalibrate
from worker.inference.uncertainty import summarise_samples
from worker.routing.policy import expected_risk
from worker.training.goemotions import LabelledSplit
from worker.training.metrics import binarize, macro_f1, split_half_macro_f1, tune_thresholds

STRATEGIES = ("expected_risk", "mutual_information", "random")
REVIEWERS = [f"reviewer-{k}" for k in range(5)]


@dataclass
class SimConfig:
    initial_share: float = 0.2
    holdout_share: float = 0.2  # of the initial labels: sets the thresholds
    budget: float = 0.05
    rounds: int = 10
    n_samples: int = 20
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    hidden: int = 512
    dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3


class McHead(nn.Module):
    def __init__(self, dim: int, hidden: int, n_labels: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_labels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def embed(texts: list[str], model_dir: str, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states of the frozen encoder, unit length, length-sorted batches."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[idx] = nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def cached_features(texts: list[str], model_dir: str, cache_dir: Path) -> np.ndarray:
    digest = hashlib.sha256(("\n".join(texts) + model_dir).encode()).hexdigest()[:16]
    path = cache_dir / f"features-{digest}.npy"
    if path.exists():
        return np.load(path)
    features = embed(texts, model_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, features)
    return features


def train_head(x: np.ndarray, y: np.ndarray, config: SimConfig, seed: int) -> McHead:
    torch.manual_seed(seed)
    head = McHead(x.shape[1], config.hidden, y.shape[1], config.dropout)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=0.01)
    xs, ys = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.BCEWithLogitsLoss()
    head.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss_fn(head(xs[idx]), ys[idx]).backward()
            optimiser.step()
    return head


def mc_samples(head: McHead, x: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """(S, B, L) sigmoid outputs with dropout on."""
    torch.manual_seed(seed)
    head.train()
    xs = torch.as_tensor(x)
    with torch.inference_mode():
        return np.stack([torch.sigmoid(head(xs)).numpy() for _ in range(n_samples)])


def choose(
    strategy: str, samples: np.ndarray, thresholds: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the ``k`` posts of the chunk the strategy routes to review."""
    if strategy == "random":
        return rng.choice(samples.shape[1], size=k, replace=False)
    summary = summarise_samples(samples, thresholds)
    if strategy == "expected_risk":
        score = expected_risk(summary.mean, thresholds)
    elif strategy == "mutual_information":
        score = np.asarray(summary.mutual_information)
    else:
        raise ValueError(f"unknown strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    return np.argsort(-score, kind="stable")[:k]


def run_strategy(
    strategy: str,
    features: np.ndarray,
    train: LabelledSplit,
    dev_x: np.ndarray,
    dev: LabelledSplit,
    names: list[str],
    config: SimConfig,
    seed: int,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)  # the same split and stream for every strategy
    order = rng.permutation(len(train))
    n_initial = int(len(order) * config.initial_share)
    n_holdout = int(n_initial * config.holdout_share)
    holdout, labelled = order[:n_holdout], list(order[n_holdout:n_initial])
    chunks = np.array_split(order[n_initial:], config.rounds)
    pick_rng = np.random.default_rng(seed + 1000)
    y = train.targets
    verdict_idx: list[int] = []
    curve = []
    head = train_head(features[labelled], y[labelled], config, seed)
    for round_number in range(config.rounds + 1):
        hold_mean = mc_samples(head, features[holdout], config.n_samples, seed).mean(0)
        base_thresholds = tune_thresholds(y[holdout], hold_mean)
        thresholds = base_thresholds
        if verdict_idx:
            verdict_mean = mc_samples(head, features[verdict_idx], config.n_samples, seed).mean(0)
            reviewers = [REVIEWERS[k % len(REVIEWERS)] for k in range(len(verdict_idx))]
            thresholds = recalibrate(
                verdict_mean, y[verdict_idx], reviewers, base_thresholds, names
            ).thresholds
        dev_mean = mc_samples(head, dev_x, config.n_samples, seed).mean(0)
        curve.append(
            {
                "round": round_number,
                "verdicts": len(verdict_idx),
                "labels": len(labelled),
                "model_f1": split_half_macro_f1(dev.targets, dev_mean, seed)[0],
                "deployed_f1": macro_f1(dev.targets, binarize(dev_mean, base_thresholds)),
                "recalibrated_f1": macro_f1(dev.targets, binarize(dev_mean, thresholds)),
            }
        )
        if round_number == config.rounds:
            break
        chunk = chunks[round_number]
        samples = mc_samples(head, features[chunk], config.n_samples, seed + round_number)
        k = max(1, round(config.budget * len(chunk)))
        routed = chunk[choose(strategy, samples, thresholds, k, pick_rng)]
        verdict_idx += routed.tolist()
        labelled += routed.tolist()
        head = train_head(features[labelled], y[labelled], config, seed)
    return curve


def verdicts_to_reach(curve: list[dict[str, Any]], target: float, key: str) -> float | None:
    """Verdicts at which ``curve`` first reaches ``target`` (linear between rounds)."""
    for a, b in itertools.pairwise(curve):
        if a[key] >= target:
            return float(a["verdicts"])
        if b[key] >= target:
            share = (target - a[key]) / max(b[key] - a[key], 1e-12)
            return float(a["verdicts"] + share * (b["verdicts"] - a["verdicts"]))
    return None


def simulate(
    train: LabelledSplit,
    dev: LabelledSplit,
    names: list[str],
    model_dir: str,
    cache_dir: Path,
    config: SimConfig,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.perf_counter()
    features = cached_features(train.texts + dev.texts, model_dir, cache_dir)
    train_x, dev_x = features[: len(train)], features[len(train) :]
    progress(f"features: {features.shape} in {time.perf_counter() - started:.0f} s")
    runs: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in config.strategies}
    for seed in config.seeds:
        for strategy in config.strategies:
            t = time.perf_counter()
            curve = run_strategy(strategy, train_x, train, dev_x, dev, names, config, seed)
            runs[strategy].append(curve)
            last = curve[-1]
            progress(
                f"seed {seed} {strategy}: model F1 {curve[0]['model_f1']:.4f} -> "
                f"{last['model_f1']:.4f} with {last['verdicts']} verdicts "
                f"({time.perf_counter() - t:.0f} s)"
            )
    mean_curves, summary = summarise(runs, config.rounds)
    return {
        "config": asdict(config),
        "train_posts": len(train),
        "dev_posts": len(dev),
        "seconds": time.perf_counter() - started,
        "mean_curves": mean_curves,
        "runs": runs,
        "summary": summary,
    }


def summarise(
    runs: dict[str, list[list[dict[str, Any]]]], rounds: int
) -> tuple[dict[str, list[dict[str, float]]], dict[str, Any]]:
    """Mean curves over the seeds and, per measure, how much faster each strategy learns than
    random: the slope of dev macro-F1 against verdicts (least squares over every round, per
    seed, averaged; the least noisy comparison) and the verdicts each strategy needs to reach
    random's F1 after all of its verdicts (``at_random_end``) or where random's mean curve first
    reaches that value (``at_random_first``; random's curve is noisy)."""
    keys = ("verdicts", "model_f1", "deployed_f1", "recalibrated_f1")
    mean_curves = {
        s: [
            {key: float(np.mean([c[r][key] for c in curves])) for key in keys} | {"round": r}
            for r in range(rounds + 1)
        ]
        for s, curves in runs.items()
    }
    summary: dict[str, Any] = {}
    if "random" not in mean_curves:
        return mean_curves, summary
    for key in ("model_f1", "recalibrated_f1"):
        slopes = {
            s: float(np.mean([
                np.polyfit([p["verdicts"] for p in c], [p[key] for p in c], 1)[0] * 1000
                for c in curves
            ]))
            for s, curves in runs.items()
        }  # fmt: skip
        target = mean_curves["random"][-1][key]
        random_end = mean_curves["random"][-1]["verdicts"]
        random_first = verdicts_to_reach(mean_curves["random"], target, key)
        row: dict[str, Any] = {"random_final_f1": target, "random_slope_per_1000": slopes["random"]}
        for s, c in mean_curves.items():
            if s == "random":
                continue
            needs = verdicts_to_reach(c, target, key)
            row[s] = {
                "slope_per_1000": slopes[s],
                "slope_ratio_to_random": slopes[s] / slopes["random"],
                "verdicts_to_random_final_f1": needs,
                "fewer_than_random_at_random_end": random_end / needs if needs else None,
                "fewer_than_random_at_random_first": random_first / needs
                if needs and random_first
                else None,
            }
        summary[key] = row
    return mean_curves, summary


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``feedback-simulation.json``, a markdown table and a plot of dev macro-F1 by verdicts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "feedback-simulation.json", out_dir / "feedback-simulation.md"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    curves = result["mean_curves"]
    lines = [
        "| round | verdicts | "
        + " | ".join(f"{s} model F1" for s in curves)
        + " | "
        + " | ".join(f"{s} deployed+recal F1" for s in curves)
        + " |",
        "|---:|---:|" + "---:|" * (2 * len(curves)),
    ]
    first = next(iter(curves.values()))
    for r, row in enumerate(first):
        cells = [f"{curves[s][r]['model_f1']:.4f}" for s in curves]
        cells += [f"{curves[s][r]['recalibrated_f1']:.4f}" for s in curves]
        lines.append(f"| {r} | {row['verdicts']:.0f} | " + " | ".join(cells) + " |")
    paths[1].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "model_f1", "model (dev split-half macro-F1)"),
        (axes[1], "recalibrated_f1", "deployed (recalibrated thresholds)"),
    ):
        for s, c in curves.items():
            ax.plot([p["verdicts"] for p in c], [p[key] for p in c], marker="o", label=s)
        ax.set_xlabel("verdicts")
        ax.set_ylabel("dev macro-F1")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    plot = out_dir / "feedback-simulation.png"
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    paths.append(plot)
    return paths
