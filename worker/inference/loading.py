"""Load a classifier from configuration: the default bundle, a bundle folder, a Hugging Face
checkpoint folder or a hub id. Safetensors only; a checkpoint's own code runs only when allowed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.bundle import (
    THRESHOLDS_FILE,
    BundleManifest,
    apply_delta,
    default_bundle_path,
    is_bundle,
    read_thresholds,
    resolve_base,
)
from worker.inference.adapters import OutputAdapter, parse_adapter
from worker.inference.dropout import has_dropout
from worker.settings import ModelSettings


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


@dataclass
class Classifier:
    """A loaded model and what the engine needs to run it."""

    model: nn.Module
    tokenizer: Any
    label_names: list[str]
    thresholds: np.ndarray
    name: str
    revision: str | None
    device: torch.device
    max_length: int
    adapter: OutputAdapter
    recommended_n_samples: int | None = None

    @property
    def supports_mc(self) -> bool:
        return self.adapter.supports_mc and has_dropout(self.model)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, add_special_tokens=True
        )["input_ids"]
        return ids

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def probabilities(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sigmoid outputs (rows, labels) under the model's current dropout mode."""
        return self.adapter.probabilities(self.model, input_ids, attention_mask)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("EMOWORKER_MODEL__DEVICE=cuda but no CUDA device is visible")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _weights_digest(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def _load_hf(
    source: str,
    settings: ModelSettings,
    adapter: OutputAdapter,
    config: Any = None,
) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoTokenizer

    kwargs: dict[str, Any] = {
        "revision": settings.revision,
        "trust_remote_code": settings.trust_remote_code,
    }
    try:
        if config is None:
            config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = adapter.model_class().from_pretrained(
            source,
            config=config,
            use_safetensors=True,
            **adapter.load_kwargs(),
            **kwargs,
        )
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{source} needs its own Python code to load. Review that code, then allow it "
                "with EMOWORKER_MODEL__TRUST_REMOTE_CODE=true"
            ) from exc
        raise
    except OSError as exc:
        text = str(exc)
        if "safetensors" in text or "pytorch_model.bin" in text:
            raise ModelLoadError(
                f"{source} has no safetensors weights; only safetensors are loaded (pickle "
                "files can run code). Convert the checkpoint with safetensors first"
            ) from exc
        raise ModelLoadError(f"cannot load model {source!r}: {text.splitlines()[0]}") from exc
    return model, tokenizer


def load_classifier(settings: ModelSettings) -> Classifier:
    """Load what ``settings`` names; raises ``ModelLoadError`` with a clear message."""
    _quiet_transformers()
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    adapter = parse_adapter(settings.adapter)
    name = settings.path
    folder = default_bundle_path() if name == "default" else Path(name).expanduser()
    recommended: int | None = None
    max_length = settings.max_length

    if folder.is_dir() and is_bundle(folder):
        manifest = BundleManifest.read(folder)
        model, tokenizer = _load_bundle(folder, manifest, settings, adapter)
        revision = _weights_digest(folder)
        recommended = manifest.recommended_n_samples
        max_length = min(max_length, manifest.max_length)
        if name == "default":
            name = "emotion-stream/default"
    elif folder.is_dir():
        model, tokenizer = _load_hf(str(folder), settings, adapter)
        revision = _weights_digest(folder)
    elif os.sep in name or name.startswith("."):
        raise ModelLoadError(f"model folder {name!r} does not exist")
    else:  # a hub id
        model, tokenizer = _load_hf(name, settings, adapter)
        revision = getattr(model.config, "_commit_hash", None) or settings.revision

    adapter.prepare(model, folder if folder.is_dir() else None)
    model.to(device)
    model.eval()
    label_names = adapter.label_names(model)
    thresholds_path = settings.thresholds_file or (
        folder / THRESHOLDS_FILE if folder.is_dir() else None
    )
    if thresholds_path is not None and Path(thresholds_path).is_file():
        thresholds = read_thresholds(Path(thresholds_path), label_names)
    else:
        thresholds = np.full(len(label_names), 0.5)
    return Classifier(
        model=model,
        tokenizer=tokenizer,
        label_names=label_names,
        thresholds=thresholds,
        name=name,
        revision=revision,
        device=device,
        max_length=max_length,
        adapter=adapter,
        recommended_n_samples=recommended,
    )


def _load_bundle(
    folder: Path, manifest: BundleManifest, settings: ModelSettings, adapter: OutputAdapter
) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig

    if manifest.weights == "full":
        return _load_hf(str(folder), settings, adapter)
    base = resolve_base(manifest.base)
    config = AutoConfig.from_pretrained(str(folder))
    model, tokenizer = _load_hf(base, settings, adapter, config=config)
    if manifest.weights == "delta":
        apply_delta(model, folder)
        return model, tokenizer
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return merged, tokenizer
