"""Training checkpoints: what a stopped ``emoworker train`` needs to continue where it stopped.

One file, ``checkpoint.pt`` in the run's checkpoint folder, written at every dev evaluation through
a temporary file and a rename (a run killed while writing keeps the previous checkpoint). It holds
the trainable weights, the optimiser and schedule, the weight average, the best weights so far,
the evaluation history, the position in the epoch and dropout's random state. It is read with
``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, never code.

A checkpoint belongs to one configuration: resuming with another one (other than the thread count
or the device) is refused with the settings that differ, since the result would be neither run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"
# settings that change how fast a run goes, not what it computes
NOT_COMPARED = frozenset({"threads", "device"})


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a run with another configuration."""


@dataclass
class Progress:
    """Where a run stands: the step count, the epoch and the batches already taken in it."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    running_loss: float = 0.0
    stale: int = 0
    seconds: float = 0.0  # training time before this run started (earlier runs, resumed)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights training changes (LoRA factors and head; every weight when fully
    fine-tuned), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


class Checkpointer:
    """Saves and restores a run's state in ``folder`` (None: no checkpoints)."""

    def __init__(self, folder: Path | None, config: Any) -> None:
        self.folder = folder
        self.config = asdict(config)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none; refuses one of another configuration."""
        if self.path is None or not self.path.is_file():
            return None
        saved: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        theirs, ours = comparable(saved["config"]), comparable(self.config)
        if theirs != ours:
            differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
            raise CheckpointMismatch(
                f"{self.path} was written by a run with other settings ({', '.join(differ)}); "
                "start it again with those settings, or delete the checkpoint to start afresh"
            )
        return saved

    def save(
        self,
        model: nn.Module,
        optimiser: torch.optim.Optimizer,
        schedule: Any,
        progress: Progress,
        best_weights: dict[str, torch.Tensor] | None,
        averaged: dict[str, torch.Tensor] | None,
    ) -> None:
        if self.path is None:
            return
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.config,
            "progress": asdict(progress),
            "weights": trainable_state(model),
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "best_weights": best_weights,
            "averaged": averaged,
            "torch_rng": torch.get_rng_state(),
        }
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        os.replace(partial, self.path)

    def restore(
        self,
        saved: dict[str, Any],
        model: nn.Module,
        optimiser: torch.optim.Optimizer,
        schedule: Any,
    ) -> Progress:
        """Put the saved weights, optimiser, schedule and random state back; returns where the
        run stood."""
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in saved["weights"].items():
                params[name].copy_(value)
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["torch_rng"])
        return Progress(**saved["progress"])

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
