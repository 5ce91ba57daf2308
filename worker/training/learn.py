"""``emoworker learn``: fine-tune on train + the reviewed posts, gate the new bundle against the
model in use on a canary set, announce it if it is not worse.

1. the final topic's labelled verdicts (the last per post) are appended to train;
2. a bundle is trained with ``emoworker train``'s recipe (resumable) into ``output/bundle``;
3. the gate scores it and the model in use (the current release with its thresholds, else the
   configured model) on the canary set; ``output/gate.json`` records the result;
4. if it passed and ``announce``: a release on the control topic.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas import ModelRollout
from worker.feedback.hot_swap import use_release_thresholds
from worker.feedback.recalibration_job import model_in_use
from worker.feedback.rollout import promote
from worker.feedback.verdict_data import read_final_events, training_rows
from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier, load_classifier
from worker.settings import WorkerSettings
from worker.training.gate import GateResult, gate
from worker.training.goemotions import read_tsv
from worker.training.run import run_training, write_training_data
from worker.training.train import TrainConfig, default_base_model


def load_model(settings: WorkerSettings, path: str) -> Classifier:
    return load_classifier(settings.model.model_copy(update={"path": path}))


def gate_against_current(
    settings: WorkerSettings, candidate_path: str, canary: Path, tolerance: float
) -> GateResult:
    path, rollout = asyncio.run(model_in_use(settings))
    current = load_model(settings, path)
    if rollout is not None:
        use_release_thresholds(current, rollout.current)
    candidate = load_model(settings, candidate_path)
    m = settings.model
    engine = EngineConfig(n_samples=m.n_samples, mode=m.mc_mode, seed=0, precision=m.precision)
    return gate(candidate, current, read_tsv(canary, len(current.label_names)), engine, tolerance)


def learn(
    settings: WorkerSettings,
    data_dir: Path,
    canary: Path,
    output: Path,
    config: TrainConfig,
    tolerance: float,
    announce: bool,
    log: Callable[[str], Any] = print,
) -> tuple[GateResult, ModelRollout | None]:
    events = asyncio.run(read_final_events(settings.kafka, settings.topics.final))
    rows = training_rows(events)
    log(f"training on {data_dir}/train.tsv + {len(rows)} reviewed posts")
    data = write_training_data(data_dir, rows, output / "data")
    candidate = (output / "bundle").resolve()
    config.base_model = config.base_model or default_base_model()
    run_training(data, candidate, config, "lora", settings.model.n_samples, log=log)
    result = gate_against_current(settings, str(candidate), canary, tolerance)
    (output / "gate.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    log(result.line())
    if not (result.passed and announce):
        return result, None
    release = promote(settings, str(candidate), result.candidate_revision, note="learn")
    return result, asyncio.run(release)
