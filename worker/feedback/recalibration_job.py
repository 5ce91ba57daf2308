"""``emoworker learn --thresholds-only``: the model in use's thresholds, recalibrated from the
verdicts in the final topic so far, and announced as a release of the same bundle.

The recalibration always starts from the bundle's own thresholds and uses every verdict so far,
so running it again on the same verdicts gives the same thresholds (the shrinkage toward the
bundle's does not compound); a release is announced only when they differ from the ones the
workers run with."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import ModelRollout
from worker.feedback.rollout import promote, read_rollout
from worker.feedback.thresholds import Recalibration, recalibrate
from worker.feedback.verdict_data import read_final_events, recalibration_inputs
from worker.inference.loading import load_classifier
from worker.settings import WorkerSettings


@dataclass
class ThresholdsJob:
    model_path: str
    reviewed_posts: int  # final events read
    verdicts: int  # of them, labelled verdicts on the model in use
    result: Recalibration
    announced: ModelRollout | None


async def model_in_use(settings: WorkerSettings) -> tuple[str, ModelRollout | None]:
    """The current release's bundle, else the configured model; and the rollout, if any."""
    rollout, _ = await read_rollout(settings.kafka, settings.topics.control)
    return (rollout.current.model_path if rollout else settings.model.path), rollout


async def recalibrate_thresholds(settings: WorkerSettings, announce: bool) -> ThresholdsJob:
    events = await read_final_events(settings.kafka, settings.topics.final)
    path, rollout = await model_in_use(settings)
    classifier = load_classifier(settings.model.model_copy(update={"path": path}))
    names = classifier.label_names
    running = dict(zip(names, classifier.thresholds.tolist(), strict=True))
    if rollout is not None and rollout.current.thresholds:
        running |= rollout.current.thresholds  # the thresholds the workers run with
    v = recalibration_inputs(events, names, classifier.revision)
    result = recalibrate(v.probabilities, v.labels, v.reviewers, classifier.thresholds, names)
    moved = dict(zip(names, result.thresholds.tolist(), strict=True))
    differs = any(abs(moved[n] - running[n]) > 1e-4 for n in names)
    announced = None
    if announce and differs:
        announced = await promote(settings, path, classifier.revision, moved, "thresholds")
    return ThresholdsJob(path, len(events), len(v.reviewers), result, announced)
