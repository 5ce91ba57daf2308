"""Load a classifier from configuration: the default bundle, a bundle folder, a Hugging Face
checkpoint folder or a hub id, an ONNX classifier, or an encoder with an ONNX head.

Safetensors only for torch weights; a checkpoint's own code runs only when
``EMOWORKER_MODEL__TRUST_REMOTE_CODE=true``. Which class is built and where the scores are is the
output adapter's business (``adapters.py``, ``EMOWORKER_MODEL__ADAPTER``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
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
from worker.inference.adapters import (
    ENV as ADAPTER_ENV,
)
from worker.inference.adapters import (
    AdapterSpecError,
    EncoderOnnxHeadAdapter,
    OnnxClassifierAdapter,
    OutputAdapter,
    OutputAdapterError,
    needs_remote_code,
    parse_adapter,
)
from worker.inference.dropout import has_dropout
from worker.inference.onnx_models import (
    EncoderWithOnnxHead,
    OnnxHead,
    OnnxModelError,
    OnnxSequenceClassifier,
    file_digest,
    open_session,
    sentence_transformers_pooling,
)
from worker.ood.calibration import OodCalibration, read_calibration
from worker.routing.calibration import LabelCalibration
from worker.routing.selector import RiskSelector
from worker.settings import ModelSettings

TRUST_ENV = "EMOWORKER_MODEL__TRUST_REMOTE_CODE"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
LORA_WEIGHTS = "adapter_model.safetensors"  # what peft reads of a LoRA bundle
PROBE_TEXT = "Thank you, this is great!"


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
    ood: OodCalibration | None = None  # the OOD calibration the model folder carries
    members: list[nn.Module] = field(default_factory=list)  # an ensemble's models, ``model`` first
    selector: RiskSelector | None = None  # the learned review score the bundle carries
    calibration: LabelCalibration | None = None  # per-label calibration of the MC means

    @property
    def models(self) -> list[nn.Module]:
        """The models whose samples make a post's statistics: the ensemble's, or ``model``."""
        return self.members or [self.model]

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
        """Per-label probabilities (rows, labels) under the model's current dropout mode."""
        return self.adapter.probabilities(self.model, input_ids, attention_mask)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("EMOWORKER_MODEL__DEVICE=cuda but no CUDA device is visible")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _member_files(folder: Path, manifest: BundleManifest) -> list[Path]:
    """An ensemble's weight files (its members' folders)."""
    return [
        f
        for member, _ in manifest.member_folders(folder)
        if member != folder
        for f in sorted(member.glob("*.safetensors"))
    ]


def _weights_digest(folder: Path, extra: list[Path] | None = None) -> str | None:
    files = sorted(folder.glob("*.safetensors")) + list(extra or [])
    return file_digest(files) if files else None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor is True.*")


def _refuse_pickle_weights(
    folder: Path, safe: str = "*.safetensors", what: str = "weights"
) -> None:
    """A folder with torch weights only as pickle files is refused (they can run code):
    ``safe`` is the file (glob) that would be loaded instead, ``what`` names it in the error."""
    if any(folder.glob(safe)):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise ModelLoadError(
            f"{folder} has {what} only as {', '.join(pickles)}; only safetensors are loaded "
            "(pickle files can run code). Convert the checkpoint with safetensors first"
        )


def _remote_code_error(source: str, code: str | None) -> ModelLoadError:
    what = f" ({code})" if code else ""
    return ModelLoadError(
        f"{source} needs its own Python code to load{what}. Review that code, then allow it "
        f"with {TRUST_ENV}=true"
    )


def _config_dict(source: str, settings: ModelSettings) -> dict[str, Any]:
    from transformers import PretrainedConfig

    try:
        data, _ = PretrainedConfig.get_config_dict(source, revision=settings.revision)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {source!r}: {first}") from exc
    return dict(data)


def _load_hf(
    source: str,
    settings: ModelSettings,
    adapter: OutputAdapter,
    config: Any = None,
    complete: bool = True,
) -> tuple[nn.Module, Any]:
    """A transformers model and its tokenizer; ``complete``: every weight the class needs must
    come from the checkpoint (no randomly initialised head)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if Path(source).is_dir():
        _refuse_pickle_weights(Path(source))
    config_dict = _config_dict(source, settings)
    class_name = adapter.model_class_name(config_dict)
    code = needs_remote_code(config_dict, class_name)
    if code is not None and not settings.trust_remote_code:
        raise _remote_code_error(source, code)
    kwargs: dict[str, Any] = {
        "revision": settings.revision,
        "trust_remote_code": settings.trust_remote_code,
    }
    try:
        if config is None:
            config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model, info = getattr(transformers, class_name).from_pretrained(
            source,
            config=config,
            use_safetensors=True,
            output_loading_info=True,
            **adapter.load_kwargs(),
            **kwargs,
        )
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise _remote_code_error(source, None) from exc
        raise ModelLoadError(
            f"cannot load model {source!r}: {text.strip().splitlines()[0]}"
        ) from exc
    except OSError as exc:
        text = str(exc)
        if "safetensors" in text or "pytorch_model.bin" in text:
            raise ModelLoadError(
                f"{source} has no safetensors weights; only safetensors are loaded (pickle "
                "files can run code). Convert the checkpoint with safetensors first"
            ) from exc
        raise ModelLoadError(f"cannot load model {source!r}: {text.splitlines()[0]}") from exc
    missing = sorted(k for k in info.get("missing_keys", ()) if not adapter.tolerated_missing(k))
    if complete and missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{source} lacks weights that {type(model).__name__} needs ({shown}); they would be "
            f"random. Is it the right checkpoint for {ADAPTER_ENV}="
            f"{adapter.describe()!r}? A custom model may need {ADAPTER_ENV}=tuple:<i> and "
            f"{TRUST_ENV}=true"
        )
    return model, tokenizer


def _hub_file(repo: str, filename: str, revision: str | None) -> Path | None:
    """A small file of a hub repository, when it has one and the hub (or cache) is reachable."""
    try:
        from transformers.utils import cached_file

        path = cached_file(
            repo,
            filename,
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except Exception:  # a missing optional file is not an error
        return None
    return Path(path) if path else None


@dataclass
class _Loaded:
    model: nn.Module
    tokenizer: Any
    revision: str | None
    folder: Path | None  # where labels.json and thresholds.json are looked for
    hub_repo: str | None = None
    recommended_n_samples: int | None = None
    max_length: int | None = None
    members: list[nn.Module] | None = None  # an ensemble's models (the first is ``model``)


def load_classifier(settings: ModelSettings) -> Classifier:
    """Load what ``settings`` names; raises ``ModelLoadError`` with a clear message."""
    _quiet_transformers()
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        adapter = parse_adapter(settings.adapter)
    except AdapterSpecError as exc:
        raise ModelLoadError(f"{ADAPTER_ENV}={settings.adapter!r}: {exc}") from exc
    name = settings.path
    folder = default_bundle_path() if name == "default" else Path(name).expanduser()
    if not folder.is_dir() and (os.sep in name or name.startswith(".")):
        raise ModelLoadError(f"model folder {name!r} does not exist")
    local = folder if folder.is_dir() else None
    if type(adapter) is OutputAdapter and local is not None and _is_onnx_folder(local):
        adapter = OnnxClassifierAdapter(labels=adapter.labels_option)
    if name == "default":
        name = "emotion-stream/default"

    try:
        if isinstance(adapter, OnnxClassifierAdapter):
            loaded = _load_onnx_classifier(settings, adapter, local, device)
        elif isinstance(adapter, EncoderOnnxHeadAdapter):
            loaded = _load_encoder_with_head(settings, adapter, local, device)
        elif local is not None and is_bundle(local):
            manifest = BundleManifest.read(local)
            models, tokenizer = _load_bundle(local, manifest, settings, adapter)
            loaded = _Loaded(
                models[0],
                tokenizer,
                _weights_digest(local, _member_files(local, manifest)),
                local,
                recommended_n_samples=manifest.recommended_n_samples,
                max_length=manifest.max_length,
                members=models,
            )
        elif local is not None:
            model, tokenizer = _load_hf(str(local), settings, adapter)
            loaded = _Loaded(model, tokenizer, _weights_digest(local), local)
        else:  # a hub id
            model, tokenizer = _load_hf(name, settings, adapter)
            revision = getattr(model.config, "_commit_hash", None) or settings.revision
            loaded = _Loaded(model, tokenizer, revision, None, hub_repo=name)

        model = loaded.model
        for member in loaded.members or [model]:
            adapter.prepare(member, loaded.folder)
            member.to(device)
            member.eval()
        label_names = adapter.label_names(model)
    except (AdapterSpecError, OnnxModelError) as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc

    max_length = min(settings.max_length, loaded.max_length or settings.max_length)
    tokenizer_limit = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 8 <= tokenizer_limit < 100_000:
        max_length = min(max_length, tokenizer_limit)
    classifier = Classifier(
        model=model,
        tokenizer=loaded.tokenizer,
        label_names=label_names,
        thresholds=np.full(len(label_names), 0.5),
        name=name,
        revision=loaded.revision,
        device=device,
        max_length=max_length,
        adapter=adapter,
        recommended_n_samples=loaded.recommended_n_samples,
        members=loaded.members or [],
    )
    _probe(classifier, adapter)
    classifier.thresholds = _thresholds(settings, adapter, loaded, label_names)
    if loaded.folder is not None:
        try:
            classifier.ood = read_calibration(loaded.folder)
            classifier.selector = RiskSelector.read(loaded.folder)
            classifier.calibration = LabelCalibration.read(loaded.folder, label_names)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{loaded.folder}: unreadable calibration: {exc}") from exc
    return classifier


def _probe(classifier: Classifier, adapter: OutputAdapter) -> None:
    """One deterministic pass over a short post: the scores are where the adapter says, one per
    label, and they are probabilities. Errors here name the setting to change."""
    from worker.inference.dropout import set_mc_dropout

    ids = classifier.tokenize([PROBE_TEXT])[0]
    input_ids = torch.as_tensor([ids], dtype=torch.long, device=classifier.device)
    mask = torch.ones_like(input_ids)
    set_mc_dropout(classifier.model, False)
    try:
        with torch.inference_mode():
            probs = classifier.probabilities(input_ids, mask)
    except (OutputAdapterError, OnnxModelError) as exc:
        raise ModelLoadError(f"{classifier.name}: {exc}") from exc
    n = len(classifier.label_names)
    if probs.ndim != 2 or probs.shape[0] != 1:
        raise ModelLoadError(
            f"{classifier.name}: expected scores shaped (posts, labels), got {tuple(probs.shape)}; "
            f"configure {ADAPTER_ENV}"
        )
    if probs.shape[1] != n:
        raise ModelLoadError(
            f"{classifier.name} gives {probs.shape[1]} scores per post but {n} label names are "
            f"known (from {adapter.label_source}); name the labels with "
            f"{ADAPTER_ENV}={adapter.describe()},labels=<preset|a|b|c|labels.json>"
        )
    if not bool(torch.isfinite(probs).all()) or probs.min() < 0 or probs.max() > 1:
        raise ModelLoadError(f"{classifier.name}: the scores are not probabilities in [0, 1]")


# -- thresholds ----------------------------------------------------------------------------------


def _thresholds(
    settings: ModelSettings, adapter: OutputAdapter, loaded: _Loaded, labels: list[str]
) -> np.ndarray:
    path: Path | None = settings.thresholds_file
    if path is None:
        folder = adapter.thresholds_folder(loaded.folder)
        if folder is not None and (folder / THRESHOLDS_FILE).is_file():
            path = folder / THRESHOLDS_FILE
        elif loaded.hub_repo is not None and not isinstance(adapter, EncoderOnnxHeadAdapter):
            path = _hub_file(loaded.hub_repo, THRESHOLDS_FILE, settings.revision)
    if path is None:
        return np.full(len(labels), 0.5)
    try:
        return read_thresholds(Path(path), labels)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"thresholds: {exc}") from exc


# -- ONNX ----------------------------------------------------------------------------------------


def _is_onnx_folder(folder: Path) -> bool:
    """A folder served as an ONNX classifier under ``auto``: ONNX and no torch weights."""
    has_onnx = (folder / "model.onnx").is_file() or (folder / "onnx" / "model.onnx").is_file()
    return has_onnx and not any(folder.glob("*.safetensors")) and not is_bundle(folder)


def _download_repo(repo: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(f"cannot fetch {repo!r} from the hub: {exc}") from exc


def _tokenizer_for(folders: list[Path], settings: ModelSettings) -> Any:
    from transformers import AutoTokenizer

    for folder in folders:
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    raise ModelLoadError(
        f"no tokenizer next to the ONNX model (looked in {', '.join(map(str, folders))})"
    )


def _load_onnx_classifier(
    settings: ModelSettings,
    adapter: OnnxClassifierAdapter,
    local: Path | None,
    device: torch.device,
) -> _Loaded:
    if local is None:  # a hub repository holding an exported model
        file = adapter.file or "model.onnx"
        root = _download_repo(
            settings.path, settings.revision, [file, "*.json", "*.txt", "*.model"]
        )
        if adapter.file is None and not (root / file).is_file():
            file = "onnx/model.onnx"
            root = _download_repo(settings.path, settings.revision, [file])
        onnx_path = root / file
    else:
        root = local
        onnx_path = adapter.onnx_file(local)
    if not onnx_path.is_file():
        raise ModelLoadError(f"ONNX model {onnx_path} does not exist")
    folders = list(dict.fromkeys([onnx_path.parent, root]))
    tokenizer = _tokenizer_for(folders, settings)
    model = OnnxSequenceClassifier(_session(onnx_path, settings, device), adapter.output)
    configs = [f / "config.json" for f in folders if (f / "config.json").is_file()]
    if configs:
        model.config = _OnnxConfig(json.loads(configs[0].read_text(encoding="utf-8")))
    side = next(
        (f for f in folders if (f / "labels.json").is_file() or (f / THRESHOLDS_FILE).is_file()),
        onnx_path.parent,
    )
    return _Loaded(model, tokenizer, file_digest([onnx_path]), side)


def _session(path: Path, settings: ModelSettings, device: torch.device) -> Any:
    try:
        return open_session(path, settings.threads, device.type)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc


class _OnnxConfig:
    """The part of a transformers config the adapters read: the label names (``config.json``
    next to an exported model)."""

    def __init__(self, data: dict[str, Any]) -> None:
        raw = data.get("id2label") or {}
        self.id2label = {int(k): str(v) for k, v in raw.items()}
        self.num_labels = int(data.get("num_labels", len(self.id2label)) or len(self.id2label))


def _resolve_head(spec: str) -> Path:
    """The head's local path: a path, or ``hf://owner/repo[@revision]/file.onnx`` (fetched with
    the thresholds.json, labels.json and config.json next to it)."""
    if not spec.startswith("hf://"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"ONNX head {spec} does not exist")
        return path
    parts = spec[len("hf://") :].split("/")
    if len(parts) < 3:
        raise ModelLoadError(f"{spec}: expected hf://<owner>/<repo>[@<revision>]/<file.onnx>")
    owner, repo_rev, *file_parts = parts
    repo, _, revision = repo_rev.partition("@")
    file = "/".join(file_parts)
    side = [str(Path(file).parent / n) for n in ("thresholds.json", "labels.json", "config.json")]
    side = [s[2:] if s.startswith("./") else s for s in side]
    root = _download_repo(f"{owner}/{repo}", revision or None, [file, *side])
    return root / file


def _load_encoder_with_head(
    settings: ModelSettings,
    adapter: EncoderOnnxHeadAdapter,
    local: Path | None,
    device: torch.device,
) -> _Loaded:
    head_path = _resolve_head(adapter.head)
    adapter.head_folder = head_path.parent
    head = OnnxHead(_session(head_path, settings, device), head_path)
    adapter.head_output_labels = head.output_labels
    source = str(local) if local is not None else settings.path
    encoder, tokenizer = _load_hf(source, settings, adapter)
    pooling, normalize = adapter.pooling, adapter.normalize
    if pooling is None or normalize is None:
        files = {
            rel: (local / rel if local is not None and (local / rel).is_file() else None)
            if local is not None
            else _hub_file(source, rel, settings.revision)
            for rel in ("1_Pooling/config.json", "modules.json")
        }
        found_pooling, found_normalize = sentence_transformers_pooling(files)
        pooling = pooling or found_pooling or "cls"
        normalize = normalize if normalize is not None else found_normalize
        normalize = True if normalize is None else normalize
    hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
    if head.layout.dim is not None and hidden is not None and head.layout.dim != hidden:
        raise ModelLoadError(
            f"the ONNX head {head_path} takes {head.layout.dim}-dimensional embeddings but "
            f"{source} produces {hidden}: pair the head with the encoder it was trained on"
        )
    adapter.pooling, adapter.normalize = pooling, normalize
    model = EncoderWithOnnxHead(encoder, head, pooling, normalize)
    revision = (
        _weights_digest(local, [head_path])
        if local is not None
        else f"{getattr(encoder.config, '_commit_hash', None) or settings.revision}"
        f"+{file_digest([head_path])}"
    )
    return _Loaded(model, tokenizer, revision, local)


# -- bundles -------------------------------------------------------------------------------------


def _load_bundle(
    folder: Path, manifest: BundleManifest, settings: ModelSettings, adapter: OutputAdapter
) -> tuple[list[nn.Module], Any]:
    """The bundle's models (one, or an ensemble's members in order) and the tokenizer."""
    models, tokenizer = [], None
    for member, weights in manifest.member_folders(folder):
        model, tokenizer = _load_weights(member, weights, manifest, settings, adapter)
        models.append(model)
    return models, tokenizer


def _load_weights(
    folder: Path,
    weights: str,
    manifest: BundleManifest,
    settings: ModelSettings,
    adapter: OutputAdapter,
) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig

    if weights == "full":
        return _load_hf(str(folder), settings, adapter)
    if weights == "lora":  # peft would torch.load an adapter_model.bin
        _refuse_pickle_weights(folder, LORA_WEIGHTS, "its LoRA adapter")
    base = resolve_base(manifest.base)
    config = AutoConfig.from_pretrained(str(folder))
    model, tokenizer = _load_hf(base, settings, adapter, config=config, complete=False)
    if weights == "delta":
        apply_delta(model, folder)
        return model, tokenizer
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return merged, tokenizer
