"""Output adapters: how a model is built, where its logits are, and what its labels are called.

Standard Hugging Face sequence-classification models need no configuration. Others are named by
``EMOWORKER_MODEL__ADAPTER``:

* ``tuple:<i>`` a custom ``AutoModel`` whose output is a tuple with the logits at index ``i``
  (e.g. ``tuple:1`` for models returning ``(embeddings, logits)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class OutputAdapter:
    """Sequence-classification models: ``AutoModelForSequenceClassification``, ``.logits``."""

    supports_mc = True

    def model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def prepare(self, model: nn.Module, folder: Path | None) -> None:
        """Hook for adapters that need files next to the checkpoint."""

    def label_names(self, model: nn.Module) -> list[str]:
        config: Any = model.config
        id2label = getattr(config, "id2label", None) or {}
        n = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]

    def logits(self, output: Any) -> torch.Tensor:
        logits = getattr(output, "logits", None)
        if logits is None:
            raise TypeError(
                f"the model returned {type(output).__name__} without .logits; configure an "
                "output adapter such as EMOWORKER_MODEL__ADAPTER=tuple:1"
            )
        return torch.as_tensor(logits)

    def probabilities(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        output = model(input_ids=input_ids, attention_mask=attention_mask)
        return torch.sigmoid(self.logits(output).float())


class TupleOutputAdapter(OutputAdapter):
    """A custom ``AutoModel`` returning a tuple; the logits are at ``index``."""

    def __init__(self, index: int) -> None:
        self.index = index

    def model_class(self) -> Any:
        from transformers import AutoModel

        return AutoModel

    def logits(self, output: Any) -> torch.Tensor:
        if isinstance(output, dict):
            output = tuple(output.values())
        if not isinstance(output, tuple | list):
            return super().logits(output)
        return torch.as_tensor(output[self.index])

    def label_names(self, model: nn.Module) -> list[str]:
        return super().label_names(model)


def parse_adapter(spec: str | None) -> OutputAdapter:
    if not spec:
        return OutputAdapter()
    kind, _, arg = spec.partition(":")
    if kind == "tuple":
        return TupleOutputAdapter(int(arg or 1))
    raise ValueError(f"unknown model adapter {spec!r}: expected tuple:<index>")
