"""``emoworker train``: fine-tune, calibrate thresholds on dev with MC Dropout, write a bundle."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.inference.adapters import OutputAdapter
from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier
from worker.training.calibrate import fit_calibration, write_fitted
from worker.training.evaluation import calibration_report, mc_threshold_metrics, predict_texts
from worker.training.export import WeightsKind, export_bundle
from worker.training.goemotions import LabelledSplit, load_dataset_dir
from worker.training.ood_fit import middle_layer
from worker.training.train import TrainConfig, TrainResult, train

CHECKPOINT_DIR = "checkpoint"  # inside the bundle folder while training runs


def classifier_from(result: TrainResult, label_names: list[str]) -> Classifier:
    from worker.training.export import plain_model

    model = plain_model(result.model)
    model.eval()
    return Classifier(
        model=model,
        tokenizer=result.tokenizer,
        label_names=label_names,
        thresholds=np.full(len(label_names), 0.5),
        name=result.config.base_model,
        revision=None,
        device=next(model.parameters()).device,
        max_length=result.config.max_length,
        adapter=OutputAdapter(),
    )


def describe_base(base_model: str) -> str:
    from worker.training.export import base_reference

    ref = base_reference(base_model)
    if "package" in ref:
        return f"sentence-transformers/all-MiniLM-L6-v2 (Python package {ref['package']})"
    return next(iter(ref.values()))


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
        )
    return f"{cpu}, {torch.get_num_threads()} CPU threads"


CARD = """# {name}

Multi-label emotion classifier (the 28 GoEmotions labels) for emotion-stream, built with
`emoworker train`.

| | |
|---|---|
| base model | {base}, 22.7M parameters |
| stored weights | {kind} on top of the base ({size_kb:,.0f} KB in this folder) |
| training data | {data} (train split, {n_train:,} posts) |
| calibration data | dev split ({n_dev:,} posts): per-label thresholds, best F1 per label |
| probabilities | MC Dropout means |
| recommended inference | MC Dropout, mode `{mc_mode}`, {n_samples} samples |
| training | best checkpoint after {epochs_run:.2f} epochs; {seconds:.0f} s on {hardware} |
| calibration | {calibration_seconds:.0f} s (deterministic and MC passes over dev) |

## Dev figures (macro average over the labels)

These are measured on the **dev** split, which also chose the thresholds and the stopping point.
`split-half` tunes thresholds on one half of dev and scores the other half (averaged both ways):
the honest figure for data the thresholds were not tuned on.

| probabilities | thresholds | macro-F1 |
|---|---|---|
| one deterministic pass | 0.5 | {det_half:.4f} |
| one deterministic pass | tuned on the other half of dev (honest) | {det_split:.4f} |
| MC Dropout mean (N = {n_samples}) | 0.5 | {mc_half:.4f} |
| MC Dropout mean (N = {n_samples}) | tuned on all of dev (optimistic) | {mc_tuned:.4f} |
| MC Dropout mean (N = {n_samples}) | tuned on the other half of dev (honest) | {mc_split:.4f} |

## Training configuration

```json
{config}
```
"""


def write_training_data(
    data_dir: Path, reviewed: list[tuple[str, list[str], str]], output: Path
) -> Path:
    """A data folder for ``run_training``: ``data_dir``'s train.tsv with the reviewed posts (text,
    the reviewers' labels, id) appended, its dev.tsv and labels; returns the folder."""
    names, _, _ = load_dataset_dir(data_dir)
    index = {name: j for j, name in enumerate(names)}
    output.mkdir(parents=True, exist_ok=True)
    lines = [(data_dir / "train.tsv").read_text(encoding="utf-8").rstrip("\n")]
    for text, labels, post_id in reviewed:
        ids = ",".join(str(index[label]) for label in labels if label in index)
        clean = " ".join(text.replace("\t", " ").split())
        if ids and clean:
            lines.append(f"{clean}\t{ids}\t{post_id}")
    (output / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copyfile(data_dir / "dev.tsv", output / "dev.tsv")
    (output / "labels.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return output


def run_training(
    data_dir: Path,
    output: Path,
    config: TrainConfig,
    kind: WeightsKind,
    n_samples: int,
    log: Any = print,
    progress: Any = None,
) -> dict[str, Any]:
    """Train (resuming from ``output``/checkpoint when an earlier run of the same configuration
    stopped), calibrate and write the bundle; the checkpoint goes once the bundle is written."""
    names, train_split, dev_split = load_dataset_dir(data_dir)
    log(f"data: {len(train_split):,} train and {len(dev_split):,} dev posts, {len(names)} labels")
    checkpoint_dir = output / CHECKPOINT_DIR
    result = train(
        config,
        names,
        train_split,
        dev_split,
        log=log,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
    )
    log(f"best: {result.best.line()}")
    metrics = calibrate_and_export(
        result, names, data_dir, train_split, dev_split, output, kind, n_samples, log
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics


def calibrate_and_export(
    result: TrainResult,
    names: list[str],
    data_dir: Path,
    train_split: LabelledSplit,
    dev_split: LabelledSplit,
    output: Path,
    kind: WeightsKind,
    n_samples: int,
    log: Any = print,
) -> dict[str, Any]:
    """Thresholds from MC Dropout means on dev, the OOD calibration (``ood_fit.py``), dev
    figures, and the bundle with its card."""
    config = result.config
    started = time.perf_counter()
    classifier = classifier_from(result, names)
    deterministic = predict_texts(classifier, dev_split.texts, mode="off")
    log(f"calibrating thresholds on dev with MC Dropout (N = {n_samples})")
    engine = EngineConfig(
        n_samples=n_samples, mode="full", seed=0, feature_layer=middle_layer(classifier)
    )
    mc = predict_texts(classifier, dev_split.texts, engine_config=engine)
    report = calibration_report(dev_split.targets, mc.mean)
    det_report = calibration_report(dev_split.targets, deterministic.mean)
    metrics = {
        "split": "dev",
        "n_samples": n_samples,
        "deterministic_macro_f1_at_0.5": det_report["macro_f1_at_0.5"],
        "deterministic_macro_f1_split_half": det_report["macro_f1_split_half"],
        **mc_threshold_metrics(report),
        "best_step": result.best.step,
        "best_epoch": round(result.best.epoch, 2),
        "train_seconds": round(result.seconds, 1),
        "calibration_seconds": round(time.perf_counter() - started, 1),
        "hardware": hardware(),
        "training_data": str(data_dir),
        "train_posts": len(train_split),
        "dev_posts": len(dev_split),
    }
    export_bundle(
        result.model,
        result.tokenizer,
        output,
        base_model=config.base_model,
        kind=kind,
        label_names=names,
        thresholds=report["thresholds"],
        metrics=metrics,
        card="",
        n_samples=n_samples,
        mc_mode="full",
        max_length=config.max_length,
    )
    classifier.thresholds = report["thresholds"]
    log("fitting the out-of-distribution signals and the routing (cross-fitted on dev)")
    ood, routing = fit_calibration(classifier, train_split, dev_split, mc, engine)
    write_fitted(output, ood, routing, names)
    metrics["routing"] = routing.measured
    history = [h.__dict__ for h in result.history]
    (output / "training_history.json").write_text(json.dumps(history, indent=1) + "\n")
    write_card(output, config, metrics, kind)
    metrics["bundle_bytes"] = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    return metrics


def write_card(output: Path, config: TrainConfig, metrics: dict[str, Any], kind: str) -> None:
    """CARD.md from the bundle's figures (its size counts every file but the card)."""
    size = sum(f.stat().st_size for f in output.iterdir() if f.is_file() and f.name != "CARD.md")
    card = CARD.format(
        name=output.name,
        base=describe_base(config.base_model),
        kind=kind,
        size_kb=size / 1024,
        data=metrics["training_data"],
        n_train=metrics["train_posts"],
        n_dev=metrics["dev_posts"],
        mc_mode="full",
        n_samples=metrics["n_samples"],
        epochs_run=metrics["best_epoch"],
        seconds=metrics["train_seconds"],
        calibration_seconds=metrics["calibration_seconds"],
        hardware=metrics["hardware"],
        det_half=metrics["deterministic_macro_f1_at_0.5"],
        det_split=metrics["deterministic_macro_f1_split_half"],
        mc_half=metrics["mc_macro_f1_at_0.5"],
        mc_tuned=metrics["mc_macro_f1_tuned_on_dev"],
        mc_split=metrics["mc_macro_f1_split_half"],
        config=json.dumps({k: v for k, v in asdict(config).items() if k != "base_model"}, indent=2),
    )
    (output / "CARD.md").write_text(card, encoding="utf-8")
