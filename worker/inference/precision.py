"""Numeric precision of the MC Dropout passes: float32, or bfloat16/float16 autocast.

Under autocast the matmuls (linear layers, attention products) run in 16-bit with float32
accumulation; layer norms, softmax over masked scores and the final sigmoid stay in float32. The
dropout masks are the same random draws whatever the precision, so a seeded run in ``bf16`` and
one in ``fp32`` sample the same sub-networks: measured on the default model, their probabilities
differ by about 1e-4 on average, a hundred times less than the MC standard error at N = 30 (see
``emoworker bench``, rows ``full`` and ``full_bf16``).

``auto`` picks bfloat16 where the hardware computes it natively (CUDA GPUs with bf16 support; CPUs
with AVX512-BF16 or AMX, where it measured about 2.3x the float32 matmul rate) and float32
elsewhere: emulated bfloat16 is slower than float32.
"""

from __future__ import annotations

import contextlib

import torch

from worker.settings import Precision

__all__ = ["DTYPES", "Precision", "autocast", "native_bf16", "resolve_precision"]

DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (faster than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device``: ``bf16`` or ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context that runs a forward pass at ``precision`` (resolved) on ``device``."""
    dtype = DTYPES[precision]
    if dtype is None or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
