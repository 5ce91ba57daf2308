"""The machine's limit, measured in the same run: matmul GFLOP/s at the model's shapes per
precision, and the useful GFLOP/s each method reaches (its share of that bound).

Useful work is what the posts need and nothing else: per post and per sample, the encoder's matmuls
on the post's own tokens (no padding) and its attention products,

    per layer: t (8 H^2 + 4 H I)  +  4 t^2 H          (t tokens, H hidden, I intermediate)

(the pooler and head are left out: a few hundred kFLOP a post). MiniLM-L6 (H = 384, I = 1,536)
needs about 21 MFLOP per token per pass (0.46 GFLOP for a 21-token post). A method that pads,
repeats or runs small matmuls does more or slower work for the same posts: its useful GFLOP/s
falls below the bound.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

GEMM_SHAPE = (2048, 384, 1536)  # (rows, hidden, intermediate): the feed-forward layer's matmul
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gemm_gflops(device: torch.device, precision: str, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of (rows x hidden) @ (hidden x intermediate) in ``precision``."""
    m, k, n = GEMM_SHAPE
    dtype = DTYPES[precision]
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    flop = 2.0 * m * k * n
    with torch.inference_mode():
        for _ in range(5):  # kernels chosen, caches warm
            a @ b
        _sync(device)
        calls, started = 0, time.perf_counter()
        while True:
            for _ in range(10):
                a @ b
            calls += 10
            _sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return flop * calls / elapsed / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pass_flops(config: Any, lengths: Sequence[int]) -> np.ndarray:
    """Useful matmul FLOPs of one pass over each post (``lengths``: its tokens; padding not
    counted): per token and layer 2 (4 h^2 + 2 h i) for the projections, 4 t h for attention."""
    h = getattr(config, "hidden_size", 0)
    i = getattr(config, "intermediate_size", 4 * h)
    layers = getattr(config, "num_hidden_layers", 0)
    t = np.asarray(lengths, dtype=np.float64)
    return np.asarray(layers * (2 * (4 * h * h + 2 * h * i) * t + 4 * t * t * h))


def useful_flops_per_sample(classifier: Any, lengths: Sequence[int]) -> float:
    """FLOPs of one stochastic pass over posts of these lengths."""
    return float(pass_flops(getattr(classifier.model, "config", None), lengths).sum())


def useful_gflop(config: Any, lengths: Sequence[int], samples: Sequence[float]) -> float:
    """GFLOP a method needed for its posts: each post's pass times the samples it drew."""
    return float(pass_flops(config, lengths) @ np.asarray(samples, dtype=np.float64)) / 1e9


def measure_bounds(device: torch.device, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s per precision the device runs natively: fp32 always, bf16 where native (AMX or
    AVX512-BF16 CPUs, GPUs), fp16 on GPUs."""
    from worker.inference.precision import native_bf16

    precisions = ["fp32"]
    if native_bf16(device):
        precisions.append("bf16")
    if device.type == "cuda":
        precisions.append("fp16")
    return {p: round(gemm_gflops(device, p, seconds), 1) for p in precisions}


def steadier_bounds(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per precision, the higher of a bound measured before the methods and one after: a single
    measurement on a shared machine moved by a quarter between runs (2,265 and 2,822 GFLOP/s in
    bfloat16 on one day) while the methods moved by 2 %; the higher is the closer to what the
    machine can do, and the harder reference for the methods."""
    return {p: max(before[p], after.get(p, before[p])) for p in before}


def set_bound_fractions(rows: list[dict[str, Any]], bounds: dict[str, float]) -> None:
    """Each method row's share of the bound of its precision (``None`` where none is measured,
    e.g. int8)."""
    for row in rows:
        bound = bounds.get(row["precision"])
        row["bound_fraction"] = round(row["useful_gflops"] / bound, 3) if bound else None
