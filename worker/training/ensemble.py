"""``emoworker bundle combine``: an ensemble bundle from bundles trained apart.

Deep ensembles (Lakshminarayanan et al. 2017) are the strongest baseline for uncertainty; here the
members share the base encoder (each is its own LoRA adapter or int8 delta on it), and a post's N
MC samples are split evenly over them, so an ensemble of three at N = 30 costs what one model at
N = 30 does. Combining:

1. each member's weights are copied into ``member-<k>/`` (the members must share base, labels and
   length limit);
2. the ensemble's MC means on dev choose the per-label thresholds, as for one model;
3. the OOD calibration: density statistics from the first member's features on train, references
   and cut on dev (``ood_fit.py``);
4. the card names every member's recipe and the ensemble's dev figures.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.bundle import (
    BUNDLE_FILE,
    THRESHOLDS_FILE,
    BundleManifest,
    Member,
    is_bundle,
    write_thresholds,
)
from worker.inference.engine import EngineConfig
from worker.inference.loading import load_classifier
from worker.settings import ModelSettings
from worker.training.calibrate import fit_calibration, write_fitted
from worker.training.evaluation import calibration_report, mc_threshold_metrics, predict_texts
from worker.training.goemotions import load_dataset_dir
from worker.training.ood_fit import middle_layer

MEMBER_FILES = (  # what a member keeps: its weights, and its recipe and figures
    "CARD.md",
    "config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "delta.safetensors",
    "model.safetensors",
    "training_history.json",
)


def read_members(paths: list[Path]) -> list[BundleManifest]:
    manifests = []
    for path in paths:
        if not is_bundle(path):
            raise ValueError(f"{path} is not a model bundle (no {BUNDLE_FILE})")
        manifest = BundleManifest.read(path)
        if manifest.weights == "ensemble":
            raise ValueError(f"{path} is an ensemble already; combine its members instead")
        manifests.append(manifest)
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:], strict=True):
        if (m.base, m.labels, m.max_length) != (first.base, first.labels, first.max_length):
            raise ValueError(f"{path} differs from {paths[0]} in base model, labels or max_length")
    return manifests


def copy_members(paths: list[Path], manifests: list[BundleManifest], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(paths, 1):
        target = output / f"member-{k}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for name in MEMBER_FILES:
            if (path / name).is_file():
                shutil.copy2(path / name, target / name)
        metrics = {"source": str(path), **manifests[k - 1].metrics}
        (target / "member.json").write_text(json.dumps(metrics, indent=2) + "\n")


def combine_bundles(
    paths: list[Path],
    output: Path,
    data_dir: Path,
    n_samples: int = 30,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Write the ensemble of the bundles ``paths`` to ``output``; returns its dev figures."""
    if len(paths) < 2:
        raise ValueError("an ensemble needs at least two member bundles")
    manifests = read_members(paths)
    started = time.perf_counter()
    copy_members(paths, manifests, output)
    first = manifests[0]
    manifest = BundleManifest(
        base=first.base,
        weights="ensemble",
        labels=first.labels,
        recommended_n_samples=n_samples,
        recommended_mc_mode="full",
        max_length=first.max_length,
        members=[
            Member(f"member-{k}", m.weights)  # type: ignore[arg-type]
            for k, m in enumerate(manifests, 1)
        ],
    )
    (output / BUNDLE_FILE).write_text(manifest.to_json(), encoding="utf-8")
    (output / THRESHOLDS_FILE).unlink(missing_ok=True)
    for stale in ("ood.json", "ood.safetensors", "selector.json", "calibration.json"):
        (output / stale).unlink(missing_ok=True)
    names, train_split, dev_split = load_dataset_dir(data_dir)
    classifier = load_classifier(ModelSettings(path=str(output)))
    log(f"{len(classifier.models)} members; MC Dropout on dev (N = {n_samples}, split evenly)")
    engine = EngineConfig(
        n_samples=n_samples, mode="full", seed=0, feature_layer=middle_layer(classifier)
    )
    mc = predict_texts(classifier, dev_split.texts, engine_config=engine)
    report = calibration_report(dev_split.targets, mc.mean)
    write_thresholds(output / THRESHOLDS_FILE, names, report["thresholds"])
    first_only = dataclasses.replace(classifier, members=[])
    deterministic = predict_texts(first_only, dev_split.texts, mode="off")
    det = calibration_report(dev_split.targets, deterministic.mean)
    log("fitting the out-of-distribution signals and the routing (cross-fitted on dev)")
    classifier.thresholds = report["thresholds"]
    ood, routing = fit_calibration(classifier, train_split, dev_split, mc, engine)
    write_fitted(output, ood, routing, names)
    manifest.metrics = {
        "split": "dev",
        "n_samples": n_samples,
        "members": len(paths),
        "first_member_deterministic_macro_f1_split_half": det["macro_f1_split_half"],
        **mc_threshold_metrics(report),
        "routing": routing.measured,
        "calibration_seconds": round(time.perf_counter() - started, 1),
        "training_data": str(data_dir),
        "train_posts": len(train_split),
        "dev_posts": len(dev_split),
    }
    (output / BUNDLE_FILE).write_text(manifest.to_json(), encoding="utf-8")
    write_ensemble_card(output, paths, manifests, manifest.metrics)
    manifest.metrics["bundle_bytes"] = bundle_bytes(output)
    return manifest.metrics


def bundle_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_ensemble_card(
    output: Path, paths: list[Path], manifests: list[BundleManifest], metrics: dict[str, Any]
) -> None:
    rows = []
    for k, (path, m) in enumerate(zip(paths, manifests, strict=True), 1):
        f1 = m.metrics.get("mc_macro_f1_split_half")
        rows.append(
            f"| member-{k} | {m.weights} | {path.name} | "
            + (f"{f1:.4f}" if isinstance(f1, float) else "")
            + " |"
        )
    size = bundle_bytes(output) / 1e6
    card = "\n".join(
        [
            f"# {output.name}",
            "",
            "Multi-label emotion classifier (the GoEmotions labels) for emotion-stream: an "
            f"ensemble of {len(paths)} models on the shared MiniLM-L6 base, combined with "
            "`emoworker bundle combine`. A post's MC Dropout samples are split evenly over the "
            f"members ({metrics['n_samples']} in all), so it costs what one model does.",
            "",
            f"Bundle size: {size:.1f} MB. Training data: {metrics['training_data']} "
            f"({metrics['train_posts']:,} train posts); thresholds and OOD references from dev "
            f"({metrics['dev_posts']:,} posts).",
            "",
            "| member | weights | from | its own dev macro-F1 (MC, split-half) |",
            "|---|---|---|---:|",
            *rows,
            "",
            "Each member folder keeps its own card with its training recipe (CARD.md), its "
            "figures (member.json) and its training history.",
            "",
            "## Dev figures (macro average over the labels)",
            "",
            "| probabilities | thresholds | macro-F1 |",
            "|---|---|---:|",
            "| first member, one deterministic pass | other half of dev (honest) | "
            f"{metrics['first_member_deterministic_macro_f1_split_half']:.4f} |",
            f"| ensemble MC mean (N = {metrics['n_samples']}) | 0.5 | "
            f"{metrics['mc_macro_f1_at_0.5']:.4f} |",
            f"| ensemble MC mean | all of dev (optimistic) | "
            f"{metrics['mc_macro_f1_tuned_on_dev']:.4f} |",
            f"| ensemble MC mean | other half of dev (honest) | "
            f"{metrics['mc_macro_f1_split_half']:.4f} |",
            "",
            *routing_lines(metrics.get("routing", {})),
        ]
    )
    (output / "CARD.md").write_text(card, encoding="utf-8")


def routing_lines(routing: dict[str, Any]) -> list[str]:
    """The card's routing table: each review score's cross-fitted dev figures."""
    if not routing:
        return []
    lines = [
        "## Routing on dev (cross-fitted; risk = 1 - per-post F1 under thresholds tuned on the "
        "other half of dev)",
        "",
        f"All posts: per-post F1 {routing['mean_post_f1']:.4f}. Calibration error of the MC "
        f"means {routing['ece_raw']:.4f}, {routing['ece_calibrated']:.4f} after per-label "
        "calibration.",
        "",
        "| review score | AURC | kept F1 at 10 % | routed top-label error at 10 % |",
        "|---|---:|---:|---:|",
    ]
    for name in ("expected_risk", "expected_risk_calibrated", "learned"):
        r = routing[name]
        lines.append(
            f"| {name} | {r['aurc']:.4f} | {r['kept_post_f1_at_10']:.4f} | "
            f"{r['routed_top_label_error_ratio_at_10']:.2f}x |"
        )
    shipped = "shipped" if routing.get("learned_shipped") else "not shipped (it did not beat both)"
    return [*lines, "", f"The learned score is {shipped}.", ""]
