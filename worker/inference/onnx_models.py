"""ONNX models as ``nn.Module``s the engine can run.

* ``OnnxSequenceClassifier``: a whole classifier exported to ONNX (token ids in, logits out). It
  has no dropout the worker can switch, so it runs one deterministic pass per post
  (``n_samples`` = 1, uncertainty fields null in the events).
* ``EncoderWithOnnxHead``: a torch encoder (its dropout gives the MC samples), pooling and L2
  normalisation in torch, then an ONNX head on the sentence embeddings, run by onnxruntime on
  every sampled embedding (the head itself is deterministic). The head is SamLowe's layout: one
  output per label, each (B, 2) = [P(negative), P(positive)], or a single (B, labels) output.

onnxruntime sessions run on the CPU (``CPUExecutionProvider``; CUDA when the worker runs on CUDA
and onnxruntime-gpu is installed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Pooling = Literal["cls", "mean"]

ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxModelError(ValueError):
    """An ONNX file does not have the inputs or outputs its adapter expects."""


def open_session(path: Path, threads: int = 0, device: str = "cpu") -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def _to_numpy(t: torch.Tensor, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu").numpy().astype(dtype, copy=False))


class OnnxSequenceClassifier(nn.Module):
    """A classifier exported to ONNX: ``input_ids`` and ``attention_mask`` (and, when the graph
    wants them, zero ``token_type_ids``) in; the ``logits`` output (or the only output) out."""

    config: Any = None  # label names from a config.json next to the file, when there is one

    def __init__(self, session: Any, output: str | None = None) -> None:
        super().__init__()
        self.session = session
        self.inputs = {i.name: ONNX_TO_NUMPY.get(i.type, np.int64) for i in session.get_inputs()}
        if "input_ids" not in self.inputs:
            raise OnnxModelError(
                f"the ONNX classifier has inputs {sorted(self.inputs)}, expected input_ids "
                "(and attention_mask)"
            )
        known = {"input_ids", "attention_mask", "token_type_ids"}
        unknown = sorted(set(self.inputs) - known)
        if unknown:
            raise OnnxModelError(
                f"the ONNX classifier needs inputs the worker cannot give: {unknown}"
            )
        names = [o.name for o in session.get_outputs()]
        if output is None:
            output = "logits" if "logits" in names else names[0]
        if output not in names:
            raise OnnxModelError(f"the ONNX classifier has no output {output!r} (outputs: {names})")
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed: dict[str, np.ndarray] = {"input_ids": _to_numpy(input_ids, self.inputs["input_ids"])}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = _to_numpy(attention_mask, self.inputs["attention_mask"])
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"]).astype(
                self.inputs["token_type_ids"]
            )
        (logits,) = self.session.run([self.output], feed)
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)).to(input_ids.device)


@dataclass
class HeadLayout:
    input_name: str
    dim: int | None
    outputs: list[str]
    per_label: bool  # one output per label (B, 2) / (B, 1) / (B,), else one (B, labels) output


class OnnxHead:
    """A classification head over sentence embeddings, run by onnxruntime."""

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise OnnxModelError(
                f"{path}: an ONNX head takes one input (the sentence embeddings), this one takes "
                f"{[i.name for i in inputs]}"
            )
        shape = inputs[0].shape
        dim = shape[-1] if shape and isinstance(shape[-1], int) else None
        outputs = [o.name for o in session.get_outputs()]
        self.input_dtype = ONNX_TO_NUMPY.get(inputs[0].type, np.float32)
        self.layout = HeadLayout(inputs[0].name, dim, outputs, per_label=len(outputs) > 1)

    @property
    def output_labels(self) -> list[str] | None:
        """Label names when the head has one output per label (the output names)."""
        return list(self.layout.outputs) if self.layout.per_label else None

    def run(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (rows, labels), float32."""
        results = self.session.run(
            self.layout.outputs, {self.layout.input_name: embeddings.astype(self.input_dtype)}
        )
        if not self.layout.per_label:
            return np.asarray(results[0], dtype=np.float32).reshape(len(embeddings), -1)
        columns = []
        for name, value in zip(self.layout.outputs, results, strict=True):
            array = np.asarray(value, dtype=np.float32).reshape(len(embeddings), -1)
            if array.shape[1] > 2:
                raise OnnxModelError(
                    f"{self.path}: output {name!r} has {array.shape[1]} columns; a per-label "
                    "output holds [P(negative), P(positive)] or P(positive)"
                )
            columns.append(array[:, -1])  # the positive column
        return np.stack(columns, axis=1)


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling, normalize: bool
) -> torch.Tensor:
    """Sentence embeddings (B, H) from the last hidden state (B, T, H)."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if normalize:
        pooled = nn.functional.normalize(pooled.float(), p=2.0, dim=-1)
    return pooled


class EncoderWithOnnxHead(nn.Module):
    """Encoder (torch, MC Dropout) → pooling → L2 normalisation → ONNX head; outputs probabilities.

    Every row of a forward pass (each stochastic sample of each post) gets its own head pass, in
    one onnxruntime call.
    """

    def __init__(self, encoder: nn.Module, head: OnnxHead, pooling: Pooling, normalize: bool):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.config = getattr(encoder, "config", None)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0] if isinstance(output, tuple | list) else output
        return pool(torch.as_tensor(hidden), attention_mask, self.pooling, self.normalize)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self.embed(input_ids, attention_mask)
        probs = self.head.run(_to_numpy(embeddings.float(), np.float32))
        return torch.from_numpy(probs).to(input_ids.device)


def sentence_transformers_pooling(
    files: dict[str, Path | None],
) -> tuple[Pooling | None, bool | None]:
    """Pooling and normalisation from a sentence-transformers layout (1_Pooling/config.json,
    modules.json), when present."""
    pooling: Pooling | None = None
    normalize: bool | None = None
    config_path = files.get("1_Pooling/config.json")
    if config_path is not None:
        data = json.loads(config_path.read_text(encoding="utf-8"))
        if data.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif data.get("pooling_mode_mean_tokens"):
            pooling = "mean"
    modules_path = files.get("modules.json")
    if modules_path is not None:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        normalize = any("Normalize" in str(m.get("type", "")) for m in modules)
    return pooling, normalize
