"""How many tokens one MC Dropout pass carries on the CPU: measured at start-up, not guessed.

A pass has a fixed cost besides its matmuls (the Python of a dozen modules, one dropout mask per
layer, small kernels, the running sums), so small passes waste the CPU; past some size nothing
more is gained and memory grows. Where that size lies depends on the CPU and the precision: on an
Intel Xeon with AMX, full MC (N = 30, the default ensemble) in bfloat16 ran at 20-21 posts/s with
passes of 1,024 tokens and 25-28 with 2,048-8,192, while float32 gained 4-10 %; 8,192 was never
faster than 4,096 and costs more memory, so it is no candidate. So with the budget on ``auto``
the engine samples a small fixed batch (``calibration_posts``) with each candidate budget, its
own way (chunks, copies, dropout on, its precision), and takes the smallest budget within
``TOLERANCE`` of the fastest (smaller passes: less memory, fewer kernel shapes). Each candidate's
best of ``ROUNDS`` interleaved runs counts: a busy moment only slows a run. (Timing bare forward
passes instead was misleading: it missed the per-pass cost outside the model and picked 1,024
in one run of three.)

The choice is kept per architecture, precision and thread count, so a model swap to retrained
weights of the same shape (a rollout of new adapters) reuses it instead of measuring again.

A seeded engine does not measure (timings vary from run to run, and the pass arrangement decides
which dropout mask each post gets): it uses ``SEEDED_CPU_BUDGET``, so the same seed gives the
same samples in every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
import torch
from torch import nn

log = structlog.get_logger(__name__)

CANDIDATES = (1024, 2048, 4096)
SEEDED_CPU_BUDGET = 2048  # the smallest size on the plateau in the measurements above
TOLERANCE = 0.03  # within 3 % of the fastest counts as as fast
ROUNDS = 2  # timed runs per candidate (interleaved: a slow moment hits all candidates)
CALIBRATION_LENGTHS = (12, 16, 20, 24, 28, 32, 36, 40)  # GoEmotions dev: 21 tokens on average
SAMPLE_POST = "I can't believe how happy this made me, thank you so much! "


@dataclass(frozen=True)
class BudgetChoice:
    tokens_per_forward: int
    tokens_per_s: dict[int, float]  # per candidate, the best of its rounds
    seconds: float  # what measuring took


# per architecture (``architecture``), precision, thread count and sampling arrangement: a model
# swap to another release of the same architecture (new adapters on the same base) measures
# nothing
_CHOICES: dict[tuple[Any, ...], BudgetChoice] = {}
_LAYER_RATES: dict[tuple[Any, ...], dict[bool, float]] = {}
T = TypeVar("T")


def architecture(model: nn.Module) -> tuple[Any, ...]:
    """What the speed of a pass depends on, not the weights: each module's type and its own
    description (sizes, dropout rates, the dtype of quantised layers, whose weights are not
    parameters), the parameters' names, shapes and dtypes, and the attention implementation."""
    config = getattr(model, "config", None)
    return (
        tuple((type(m).__module__, type(m).__qualname__, m.extra_repr()) for m in model.modules()),
        tuple((name, tuple(p.shape), p.dtype) for name, p in model.named_parameters()),
        getattr(config, "_attn_implementation", None),
    )


def measured_budget(
    model: nn.Module,
    precision: str,
    sample_with_budget: Callable[[int], int],
    candidates: tuple[int, ...] = CANDIDATES,
    arrangement: tuple[Any, ...] = (),
) -> BudgetChoice:
    """The token budget for MC passes of ``model`` at ``precision`` (once per architecture,
    precision, thread count and ``arrangement`` in a process: what else shapes the sampling,
    e.g. the samples per post). ``sample_with_budget(budget)`` runs the engine's own sampling of
    a small fixed batch with that budget and returns the tokens it sampled."""
    key = (architecture(model), precision, torch.get_num_threads(), arrangement)
    if key not in _CHOICES:
        _CHOICES[key] = _measure(sample_with_budget, candidates)
        choice = _CHOICES[key]
        log.info(
            "token budget measured",
            tokens_per_forward=choice.tokens_per_forward,
            tokens_per_s={k: round(v) for k, v in choice.tokens_per_s.items()},
            precision=precision,
            seconds=round(choice.seconds, 2),
        )
    return _CHOICES[key]


def _measure(sample_with_budget: Callable[[int], int], candidates: tuple[int, ...]) -> BudgetChoice:
    started = time.perf_counter()
    best = best_rates(sample_with_budget, candidates)
    fastest = max(best.values())
    chosen = min(b for b, rate in best.items() if rate >= (1 - TOLERANCE) * fastest)
    return BudgetChoice(chosen, best, time.perf_counter() - started)


def best_rates(sample_with: Callable[[T], int], candidates: tuple[T, ...]) -> dict[T, float]:
    """Tokens per second of each candidate arrangement: the best of ``ROUNDS`` interleaved runs
    after one warm-up run each (kernels made, memory sized); torch's generator is left as it was
    (the passes' dropout masks draw from it)."""
    best = dict.fromkeys(candidates, 0.0)
    rng_state = torch.get_rng_state()
    try:
        for candidate in candidates:
            sample_with(candidate)
        for _ in range(ROUNDS):
            for candidate in candidates:
                t0 = time.perf_counter()
                tokens = sample_with(candidate)
                best[candidate] = max(best[candidate], _rate(tokens, time.perf_counter() - t0))
    finally:
        torch.set_rng_state(rng_state)
    return best


def measured_fused_layers(
    model: nn.Module,
    precision: str,
    sample_with_layers: Callable[[bool], int],
    arrangement: tuple[Any, ...] = (),
) -> dict[bool, float]:
    """Tokens per second with the fused encoder layers (``fused_layers.py``) and with the
    model's own, at the budget already chosen (once per architecture, precision, thread count and
    ``arrangement`` in a process, like the budget); the engine keeps the faster."""
    key = (architecture(model), precision, torch.get_num_threads(), arrangement)
    if key not in _LAYER_RATES:
        started = time.perf_counter()
        _LAYER_RATES[key] = best_rates(sample_with_layers, (True, False))
        rates = _LAYER_RATES[key]
        log.info(
            "fused encoder layers measured",
            fused=rates[True] > rates[False],
            tokens_per_s={"fused": round(rates[True]), "plain": round(rates[False])},
            precision=precision,
            seconds=round(time.perf_counter() - started, 2),
        )
    return _LAYER_RATES[key]


def calibration_posts(tokenize: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
    """A small fixed batch of post-like token sequences, 12 to 40 tokens long."""
    row = tokenize([SAMPLE_POST * 6])[0]
    return [row[:length] for length in CALIBRATION_LENGTHS]


def _rate(tokens: int, seconds: float) -> float:
    return tokens / max(seconds, 1e-9)
