"""The promotion gate: a candidate bundle is promoted only if it scores at least as well as the
model in use on a held-out canary set.

Both are scored the way they would run: MC Dropout means (the same samples, mode and seed) and
each bundle's own thresholds; the figure is macro-F1 over the canary posts. ``tolerance`` is how
much worse the candidate may be (default 0: never worse).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier
from worker.training.evaluation import predict_texts
from worker.training.goemotions import LabelledSplit
from worker.training.metrics import binarize, macro_f1


@dataclass
class GateResult:
    candidate_f1: float
    current_f1: float
    tolerance: float
    canary_posts: int
    candidate_revision: str | None = None  # its weights' hash, for the release

    @property
    def passed(self) -> bool:
        return self.candidate_f1 >= self.current_f1 - self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}

    def line(self) -> str:
        verdict = "passed" if self.passed else "REFUSED"
        return (
            f"gate {verdict}: candidate macro-F1 {self.candidate_f1:.4f}, model in use "
            f"{self.current_f1:.4f} on {self.canary_posts} canary posts"
        )


def canary_f1(classifier: Classifier, canary: LabelledSplit, engine: EngineConfig) -> float:
    mean = predict_texts(classifier, canary.texts, engine_config=engine).mean
    return macro_f1(canary.targets, binarize(mean, classifier.thresholds))


def gate(
    candidate: Classifier,
    current: Classifier,
    canary: LabelledSplit,
    engine: EngineConfig,
    tolerance: float = 0.0,
) -> GateResult:
    if candidate.label_names != current.label_names:
        raise ValueError("the candidate's labels differ from the model in use's")
    return GateResult(
        candidate_f1=canary_f1(candidate, canary, engine),
        current_f1=canary_f1(current, canary, engine),
        tolerance=tolerance,
        canary_posts=len(canary),
        candidate_revision=candidate.revision,
    )
