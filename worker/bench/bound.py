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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

GEMM_SHAPE = (2048, 384, 1536)  # (rows, hidden, intermediate): the feed-forward layer's matmul
LINEAR_ROWS = 4096  # tokens a pass of the linear-layer ceiling carries (the bf16 engine's budget)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gemm_gflops(device: torch.device, precision: str, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of (rows x hidden) @ (hidden x intermediate) in ``precision``."""
    m, k, n = GEMM_SHAPE
    dtype = DTYPES[precision]
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)

    def ten_matmuls() -> None:
        for _ in range(10):
            a @ b

    return sustained_gflops(ten_matmuls, 10 * 2.0 * m * k * n, device, seconds)


def sustained_gflops(
    step: Callable[[], object], flop: float, device: torch.device, seconds: float
) -> float:
    """GFLOP/s of ``step`` (``flop`` per call) called again and again for at least ``seconds``,
    after one untimed call (kernels chosen, weights packed, caches warm)."""
    with torch.inference_mode():
        step()
        _sync(device)
        calls, started = 0, time.perf_counter()
        while True:
            step()
            calls += 1
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


def linear_layers_gflops(
    config: Any, device: torch.device, precision: str, rows: int = LINEAR_ROWS, seconds: float = 1.0
) -> float:
    """GFLOP/s of a pass's linear layers alone on ``rows`` tokens: per encoder layer the
    query/key/value matmul, the attention output, the feed-forward in (with its activation) and
    out, with random weights of the model's shapes, run as the engine runs them: packed bfloat16
    weights with the activation inside the matmul (``fused_layers.PackedLinear``) where the CPU
    has them, ``F.linear`` otherwise. What a pass would reach if everything around its linear
    layers (attention, softmax, layer norms, residual sums, casts, dropout masks) took no time:
    the ceiling of any fusion of them, below the bound because these matmuls are smaller than
    the bound's and follow one another (per token and layer 2 (4 h^2 + 2 h i) FLOP, ``pass_flops``
    without attention's products)."""
    from transformers.activations import ACT2FN

    from worker.inference.fused_layers import ACTIVATIONS, PackedLinear, fused_linear_available

    h = int(getattr(config, "hidden_size", 384))
    i = int(getattr(config, "intermediate_size", 4 * h))
    layers = int(getattr(config, "num_hidden_layers", 6))
    activation = getattr(config, "hidden_act", "gelu")
    activation = activation if isinstance(activation, str) and activation in ACTIVATIONS else ""
    dtype = DTYPES[precision]
    packed = precision == "bf16" and device.type == "cpu" and fused_linear_available()
    shapes = [(h, 3 * h, ""), (h, h, ""), (h, i, activation), (i, h, "")]  # (in, out, activation)
    calls: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = []
    for _ in range(layers):
        for fan_in, fan_out, act in shapes:
            linear = torch.nn.Linear(fan_in, fan_out, device=device).to(dtype)
            x = torch.randn(rows, fan_in, device=device).to(dtype)
            if packed:
                calls.append((PackedLinear([linear], [1.0], act), x))
            else:
                calls.append((torch.nn.Sequential(linear, ACT2FN[act]) if act else linear, x))

    def one_pass() -> None:
        for call, x in calls:
            call(x)

    return sustained_gflops(
        one_pass, layers * 2.0 * (4 * h * h + 2 * h * i) * rows, device, seconds
    )


def linear_layers_ceiling(
    config: Any, device: torch.device, bounds: dict[str, float], seconds: float = 1.0
) -> dict[str, dict[str, float | None]]:
    """Per precision of ``bounds``: the linear layers' GFLOP/s alone (``linear_layers_gflops``)
    and their share of the bound, the highest share a pass of this model could reach."""
    ceiling: dict[str, dict[str, float | None]] = {}
    for precision, bound in bounds.items():
        gflops = round(linear_layers_gflops(config, device, precision, seconds=seconds), 1)
        ceiling[precision] = {
            "rows": LINEAR_ROWS,
            "gflops": gflops,
            "bound_fraction": round(gflops / bound, 3) if bound else None,
        }
    return ceiling
