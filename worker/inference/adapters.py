"""Output adapters: how a model is built, where its scores are, and what its labels are called.

Standard Hugging Face sequence-classification models need no configuration. Others are named by
``EMOWORKER_MODEL__ADAPTER``, a spec ``<kind>[:<argument>][,<option>=<value>]...``:

``auto`` (default, also empty)
    Pick the class from the checkpoint: its own code when ``config.json``'s ``auto_map`` names
    ``AutoModelForSequenceClassification`` or ``AutoModel``, else the built-in sequence
    classification class. Scores: the output's ``.logits``; else the one 2-D tensor in a tuple
    output (or the output itself) with one column per label. A folder with ``model.onnx`` and no
    ``*.safetensors`` is served as ``onnx``.
``tuple:<i>``
    A custom ``AutoModel`` whose output is a tuple with the logits at index ``i``
    (``tuple:1`` for models returning ``(embeddings, logits)``).
``onnx[:<file>]``
    A whole classifier exported to ONNX (default file ``model.onnx``, or ``onnx/model.onnx``):
    ``input_ids``/``attention_mask`` in, ``logits`` out. Deterministic: one pass per post,
    ``n_samples`` = 1, uncertainty fields null. Options: ``activation=sigmoid|none`` (``none``
    when the output already holds probabilities), ``output=<name>``.
``encoder_onnx_head:<head.onnx>``
    ``EMOWORKER_MODEL__PATH`` names a plain encoder (loaded with ``AutoModel``); the ONNX file is
    a head over its sentence embeddings (a path, or ``hf://<owner>/<repo>[@<revision>]/<file>``).
    MC Dropout samples the encoder; each sampled embedding goes through the head (onnxruntime).
    Options: ``pooling=cls|mean`` and ``normalize=true|false`` (default: the encoder's
    sentence-transformers files, else ``cls`` and ``true``, as BGE). Label names: the head's
    output names (one output per label), or a ``labels.json``/``config.json`` next to it.
    Thresholds: ``thresholds.json`` next to the head.

Every kind takes ``labels=<labels>``: a preset (``goemotions``, ``semeval2018``), names joined
by ``|`` (``anger|fear|joy``), or a file (JSON list, ``{"id2label": ...}`` or one name a line).
Without it the names come from a ``labels.json`` next to the model, then ``config.json``'s
``id2label``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from schemas.labels import GOEMOTIONS_LABELS, SEMEVAL_2018_EC_LABELS
from worker.inference.onnx_models import Pooling

Backend = Literal["transformers", "onnx", "encoder_onnx_head"]

LABEL_PRESETS: dict[str, tuple[str, ...]] = {
    "goemotions": GOEMOTIONS_LABELS,
    "semeval2018": SEMEVAL_2018_EC_LABELS,
    "semeval": SEMEVAL_2018_EC_LABELS,
}
LABELS_FILE = "labels.json"
SEQUENCE_CLASSIFICATION = "AutoModelForSequenceClassification"
BARE_MODEL = "AutoModel"
ENV = "EMOWORKER_MODEL__ADAPTER"


class AdapterSpecError(ValueError):
    """``EMOWORKER_MODEL__ADAPTER`` could not be parsed."""


class OutputAdapterError(TypeError):
    """The model's output does not hold what the adapter looks for."""


def read_label_file(path: Path) -> list[str]:
    """Label names from a JSON list, ``{"labels": [...]}``, ``{"id2label": {...}}``, or a text file
    with one name a line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("labels", data.get("id2label", data))
    if isinstance(data, dict):  # id -> name
        try:
            return [str(data[k]) for k in sorted(data, key=lambda k: int(k))]
        except ValueError as exc:
            raise AdapterSpecError(f"{path}: expected a list of label names or id2label") from exc
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return list(data)
    raise AdapterSpecError(f"{path}: expected a list of label names or id2label")


def resolve_labels_option(value: str) -> list[str]:
    """``labels=``: a preset, ``a|b|c``, or a file."""
    if value.lower() in LABEL_PRESETS:
        return list(LABEL_PRESETS[value.lower()])
    path = Path(value).expanduser()
    if path.is_file():
        return read_label_file(path)
    if "|" in value:
        names = [n.strip() for n in value.split("|")]
        if all(names) and len(set(names)) == len(names):
            return names
        raise AdapterSpecError(f"labels={value!r}: empty or repeated label names")
    raise AdapterSpecError(
        f"labels={value!r} is no preset ({', '.join(sorted(LABEL_PRESETS))}), no file, and no "
        "list of names joined by '|'"
    )


def config_label_names(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def _takes_keywords(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    if {"input_ids", "attention_mask"} <= set(params):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and not any(
        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
        for p in params.values()
    )


def _shape(x: Any) -> str:
    return f"{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class OutputAdapter:
    """``auto``: standard sequence classifiers (``.logits``) and custom models whose scores can
    be found by shape. Subclasses narrow where the scores are and how the model is built."""

    kind = "auto"
    backend: Backend = "transformers"
    supports_mc = True
    options: tuple[str, ...] = ("labels",)

    def __init__(self, labels: str | None = None) -> None:
        self.labels_option = labels
        self._labels: list[str] | None = None
        self.label_source = "config.json id2label"
        self._keywords = True

    # -- building ---------------------------------------------------------------------------

    def model_class_name(self, config: dict[str, Any] | None = None) -> str:
        """The transformers auto class that builds the model for this ``config.json``."""
        auto_map = _auto_map(config)
        if SEQUENCE_CLASSIFICATION in auto_map:
            return SEQUENCE_CLASSIFICATION
        if BARE_MODEL in auto_map:
            return BARE_MODEL
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )

        model_type = (config or {}).get("model_type")
        if model_type is None or model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            return SEQUENCE_CLASSIFICATION
        return BARE_MODEL

    def model_class(self, config: dict[str, Any] | None = None) -> Any:
        import transformers

        return getattr(transformers, self.model_class_name(config))

    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def tolerated_missing(self, key: str) -> bool:
        """Weights a checkpoint may lack for this adapter (they are not used)."""
        return False

    def prepare(self, model: nn.Module, folder: Path | None) -> None:
        """Resolve label names and how the model is called, once, before serving."""
        self._keywords = _takes_keywords(model)
        self._labels = self.resolve_label_names(model, folder)

    def resolve_label_names(self, model: nn.Module | None, folder: Path | None) -> list[str]:
        if self.labels_option:
            self.label_source = f"labels={self.labels_option}"
            return resolve_labels_option(self.labels_option)
        if folder is not None and (folder / LABELS_FILE).is_file():
            self.label_source = str(folder / LABELS_FILE)
            return read_label_file(folder / LABELS_FILE)
        self.label_source = "config.json id2label"
        return config_label_names(getattr(model, "config", None))

    def label_names(self, model: nn.Module) -> list[str]:
        if self._labels is None:
            self._labels = self.resolve_label_names(model, None)
        return list(self._labels)

    # -- running ----------------------------------------------------------------------------

    def forward(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> Any:
        if self._keywords:
            return model(input_ids=input_ids, attention_mask=mask)
        return model(input_ids, mask)

    def logits(self, output: Any) -> torch.Tensor:
        logits = getattr(output, "logits", None)
        if logits is not None:
            return torch.as_tensor(logits)
        if isinstance(output, torch.Tensor):
            return output
        items = _as_items(output)
        if items is None:
            raise OutputAdapterError(
                f"the model returned {type(output).__name__} without .logits; configure an "
                f"output adapter such as {ENV}=tuple:1"
            )
        n_labels = len(self._labels) if self._labels is not None else None
        candidates = [
            i
            for i, x in enumerate(items)
            if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == n_labels
        ]
        if len(candidates) == 1:
            return items[candidates[0]]
        shapes = ", ".join(f"[{i}] {_shape(x)}" for i, x in enumerate(items))
        if not candidates:
            raise OutputAdapterError(
                f"the model returned a tuple ({shapes}) and no element has one column per label "
                f"({n_labels} labels, from {self.label_source}); name the element with "
                f"{ENV}=tuple:<i>, and the labels with ,labels=<preset|a|b|file>"
            )
        raise OutputAdapterError(
            f"the model returned a tuple ({shapes}) where elements {candidates} all have "
            f"{n_labels} columns; name the logits with {ENV}=tuple:<i>"
        )

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        """Logits to per-label probabilities (multi-label: sigmoid)."""
        return torch.sigmoid(scores.float())

    def probabilities(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        output = self.forward(model, input_ids, attention_mask)
        return self.activate(self.logits(output))

    # -- files next to the model ------------------------------------------------------------

    def thresholds_folder(self, model_folder: Path | None) -> Path | None:
        """Where ``thresholds.json`` is looked for by default."""
        return model_folder

    def describe(self) -> str:
        return self._with_options(self.kind)

    def _with_options(self, head: str, **extra: Any) -> str:
        opts = {"labels": self.labels_option, **extra}
        tail = "".join(f",{k}={_fmt(v)}" for k, v in opts.items() if v is not None)
        return head + tail


class TupleOutputAdapter(OutputAdapter):
    """A custom ``AutoModel`` returning a tuple; the logits are at ``index``."""

    kind = "tuple"

    def __init__(self, index: int, labels: str | None = None) -> None:
        super().__init__(labels)
        self.index = index

    def model_class_name(self, config: dict[str, Any] | None = None) -> str:
        return BARE_MODEL

    def logits(self, output: Any) -> torch.Tensor:
        items = _as_items(output)
        if items is None:
            return super().logits(output)
        if not -len(items) <= self.index < len(items):
            raise OutputAdapterError(
                f"{ENV}=tuple:{self.index}, but the model returned {len(items)} elements"
            )
        return torch.as_tensor(items[self.index])

    def describe(self) -> str:
        return self._with_options(f"tuple:{self.index}")


class OnnxClassifierAdapter(OutputAdapter):
    """A whole classifier in ONNX: deterministic (no dropout to sample), one pass per post."""

    kind = "onnx"
    backend: Backend = "onnx"
    supports_mc = False
    options = ("labels", "activation", "output")

    def __init__(
        self,
        file: str | None = None,
        activation: Literal["sigmoid", "none"] = "sigmoid",
        output: str | None = None,
        labels: str | None = None,
    ) -> None:
        super().__init__(labels)
        self.file = file
        self.activation = activation
        self.output = output

    def onnx_file(self, folder: Path) -> Path:
        if self.file:
            path = Path(self.file).expanduser()
            return path if path.is_absolute() else folder / path
        for candidate in (folder / "model.onnx", folder / "onnx" / "model.onnx"):
            if candidate.is_file():
                return candidate
        return folder / "model.onnx"

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        if self.activation == "none":
            return scores.float().clamp(0.0, 1.0)
        return torch.sigmoid(scores.float())

    def describe(self) -> str:
        head = "onnx" + (f":{self.file}" if self.file else "")
        activation = None if self.activation == "sigmoid" else self.activation
        return self._with_options(head, activation=activation, output=self.output)


class EncoderOnnxHeadAdapter(OutputAdapter):
    """A torch encoder (MC Dropout) with an ONNX head over its sentence embeddings."""

    kind = "encoder_onnx_head"
    backend: Backend = "encoder_onnx_head"
    options = ("labels", "pooling", "normalize")

    def __init__(
        self,
        head: str,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        labels: str | None = None,
    ) -> None:
        super().__init__(labels)
        self.head = head
        self.pooling: Pooling | None = pooling
        self.normalize = normalize
        self.head_folder: Path | None = None
        self.head_output_labels: list[str] | None = None

    def model_class_name(self, config: dict[str, Any] | None = None) -> str:
        return BARE_MODEL

    def tolerated_missing(self, key: str) -> bool:
        return key.split(".")[0] == "pooler" or ".pooler." in key  # the head pools itself

    def resolve_label_names(self, model: nn.Module | None, folder: Path | None) -> list[str]:
        head_folder = self.head_folder
        if self.labels_option:
            self.label_source = f"labels={self.labels_option}"
            return resolve_labels_option(self.labels_option)
        if head_folder is not None and (head_folder / LABELS_FILE).is_file():
            self.label_source = str(head_folder / LABELS_FILE)
            return read_label_file(head_folder / LABELS_FILE)
        if self.head_output_labels:
            self.label_source = "the ONNX head's output names"
            return list(self.head_output_labels)
        if head_folder is not None and (head_folder / "config.json").is_file():
            self.label_source = str(head_folder / "config.json")
            return read_label_file(head_folder / "config.json")
        raise AdapterSpecError(
            f"the ONNX head {self.head} has one output for all labels and no {LABELS_FILE} or "
            f"config.json next to it; name the labels with {ENV}=...,labels=<preset|a|b|file>"
        )

    def logits(self, output: Any) -> torch.Tensor:
        return torch.as_tensor(output)

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.float()  # the head outputs probabilities

    def thresholds_folder(self, model_folder: Path | None) -> Path | None:
        return self.head_folder

    def describe(self) -> str:
        return self._with_options(
            f"encoder_onnx_head:{self.head}", pooling=self.pooling, normalize=self.normalize
        )


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _auto_map(config: dict[str, Any] | None) -> dict[str, Any]:
    auto_map = (config or {}).get("auto_map") or {}
    if isinstance(auto_map, list | tuple):  # an old layout: a list of auto class names
        return {str(name): None for name in auto_map}
    return dict(auto_map)


def needs_remote_code(config: dict[str, Any], class_name: str) -> str | None:
    """The checkpoint's own class the worker would have to run (``module.Class``), or None.

    A checkpoint whose ``auto_map`` names the class being loaded must run its own code, even if
    its ``model_type`` is built into transformers: loading the built-in class instead would drop
    its head silently.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    auto_map = _auto_map(config)
    if class_name in auto_map:
        return str(auto_map[class_name])
    if "AutoConfig" in auto_map and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        return str(auto_map["AutoConfig"])
    return None


def _as_items(output: Any) -> list[Any] | None:
    if isinstance(output, dict):  # also transformers' ModelOutput
        return list(output.values())
    if isinstance(output, tuple | list):
        return list(output)
    return None


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "on"}:
        return True
    if lowered in {"false", "0", "no", "off"}:
        return False
    raise AdapterSpecError(f"{name}={value!r}: expected true or false")


def parse_adapter(spec: str | None) -> OutputAdapter:
    """``EMOWORKER_MODEL__ADAPTER`` to an adapter (syntax in the module docstring)."""
    text = (spec or "").strip()
    if not text:
        return OutputAdapter()
    first, *rest = (part.strip() for part in text.split(","))
    if "=" in first and ":" not in first.split("=", 1)[0]:
        first, rest = "auto", [first, *rest]
    kind, _, arg = first.partition(":")
    kind = kind.strip().lower()
    options: dict[str, str] = {}
    for part in rest:
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise AdapterSpecError(f"adapter option {part!r}: expected name=value")
        options[key.strip().lower()] = value.strip()

    adapter: OutputAdapter
    if kind == "auto":
        if arg:
            raise AdapterSpecError("auto takes no argument")
        adapter = OutputAdapter(labels=options.get("labels"))
    elif kind == "tuple":
        try:
            index = int(arg or 1)
        except ValueError as exc:
            raise AdapterSpecError(f"tuple:{arg}: the index must be an integer") from exc
        adapter = TupleOutputAdapter(index, labels=options.get("labels"))
    elif kind == "onnx":
        activation = options.get("activation", "sigmoid").lower()
        if activation not in ("sigmoid", "none"):
            raise AdapterSpecError(f"activation={activation!r}: expected sigmoid or none")
        adapter = OnnxClassifierAdapter(
            file=arg or None,
            activation="none" if activation == "none" else "sigmoid",
            output=options.get("output"),
            labels=options.get("labels"),
        )
    elif kind == "encoder_onnx_head":
        if not arg:
            raise AdapterSpecError(
                "encoder_onnx_head needs the head: encoder_onnx_head:<head.onnx>"
            )
        pooling = options.get("pooling")
        if pooling not in (None, "cls", "mean"):
            raise AdapterSpecError(f"pooling={pooling!r}: expected cls or mean")
        normalize = options.get("normalize")
        adapter = EncoderOnnxHeadAdapter(
            arg,
            pooling="mean" if pooling == "mean" else "cls" if pooling == "cls" else None,
            normalize=None if normalize is None else _parse_bool("normalize", normalize),
            labels=options.get("labels"),
        )
    else:
        raise AdapterSpecError(
            f"unknown model adapter {text!r}: expected auto, tuple:<index>, onnx[:<file>] or "
            "encoder_onnx_head:<head.onnx>"
        )
    unknown = sorted(set(options) - set(adapter.options))
    if unknown:
        raise AdapterSpecError(
            f"{kind} does not take option(s) {', '.join(unknown)} "
            f"(it takes: {', '.join(adapter.options)})"
        )
    if adapter.labels_option:
        resolve_labels_option(adapter.labels_option)  # fail at start-up, not on the first post
    return adapter
