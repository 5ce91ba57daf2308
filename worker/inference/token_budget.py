"""How many tokens one MC Dropout pass carries on the CPU: measured at start-up, not guessed.

A pass has a fixed cost besides its matmuls (the Python of a dozen modules, one dropout mask per
layer, small kernels), so small passes waste the CPU; past some size nothing more is gained and
memory grows. Where that size lies depends on the CPU and the precision: on an Intel Xeon with
AMX, bfloat16 passes of 1,024 tokens ran at 20-21 posts/s and passes of 2,048-8,192 at 25-28
(full MC, N = 30, the default ensemble), while float32 gained 4-10 %. So with the budget on
``auto`` the engine times a few passes of each candidate size on its own model, at its own
precision, with dropout on, and takes the smallest within ``TOLERANCE`` of the fastest
(smaller passes: less memory, fewer kernel shapes).

A seeded engine does not measure (timings vary from run to run, and the pass arrangement decides
which dropout mask each post gets): it uses ``SEEDED_CPU_BUDGET``, so the same seed gives the
same samples in every process.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import structlog
import torch
from torch import nn

from worker.inference.dropout import set_mc_dropout
from worker.inference.loading import Classifier
from worker.inference.precision import autocast

log = structlog.get_logger(__name__)

CANDIDATES = (1024, 2048, 4096, 8192)
SEEDED_CPU_BUDGET = 2048  # the smallest size on the plateau in the measurements above
TOLERANCE = 0.03  # within 3 % of the fastest counts as as fast
ROUNDS = 2  # timed passes per candidate (interleaved: a slow moment hits all candidates)
TOKENS_PER_ROW = 24  # about a GoEmotions post (dev: 21 tokens on average)
SAMPLE_POST = "I can't believe how happy this made me, thank you so much! "


@dataclass(frozen=True)
class BudgetChoice:
    tokens_per_forward: int
    tokens_per_s: dict[int, float]  # per candidate, the best of its rounds
    seconds: float  # what measuring took


_CHOICES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int], BudgetChoice]] = (
    weakref.WeakKeyDictionary()
)


def measured_budget(
    classifier: Classifier,
    model: nn.Module,
    precision: str,
    candidates: tuple[int, ...] = CANDIDATES,
) -> BudgetChoice:
    """The token budget for MC passes of ``model`` at ``precision`` (once per model, precision
    and thread count in a process)."""
    key = (precision, torch.get_num_threads())
    choices = _CHOICES.setdefault(model, {})
    if key not in choices:
        choices[key] = _measure(classifier, model, precision, candidates)
        choice = choices[key]
        log.info(
            "token budget measured",
            tokens_per_forward=choice.tokens_per_forward,
            tokens_per_s={k: round(v) for k, v in choice.tokens_per_s.items()},
            precision=precision,
            seconds=round(choice.seconds, 2),
        )
    return choices[key]


def _measure(
    classifier: Classifier, model: nn.Module, precision: str, candidates: tuple[int, ...]
) -> BudgetChoice:
    started = time.perf_counter()
    row = torch.as_tensor(classifier.tokenize([SAMPLE_POST * 3])[0][:TOKENS_PER_ROW])
    passes = {}
    for budget in candidates:
        ids = row.repeat(max(1, budget // len(row)), 1).to(classifier.device)
        passes[budget] = (ids, torch.ones_like(ids))
    best = dict.fromkeys(candidates, 0.0)
    rng_state = torch.get_rng_state()  # the passes' dropout masks draw from torch's generator
    set_mc_dropout(model, True)
    try:
        with torch.inference_mode(), autocast(precision, classifier.device):
            for ids, mask in passes.values():  # warm-up: kernels made, memory sized
                classifier.adapter.probabilities(model, ids, mask)
            for _ in range(ROUNDS):
                for budget, (ids, mask) in passes.items():
                    t0 = time.perf_counter()
                    classifier.adapter.probabilities(model, ids, mask)
                    best[budget] = max(best[budget], _rate(ids.numel(), time.perf_counter() - t0))
    finally:
        model.eval()
        torch.set_rng_state(rng_state)
    fastest = max(best.values())
    chosen = min(b for b, rate in best.items() if rate >= (1 - TOLERANCE) * fastest)
    return BudgetChoice(chosen, best, time.perf_counter() - started)


def _rate(tokens: int, seconds: float) -> float:
    return tokens / max(seconds, 1e-9)
