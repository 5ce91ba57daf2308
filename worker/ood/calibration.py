"""What the OOD signals are compared with: each signal's in-distribution reference, the cut on the
combined score, the density statistics; stored in a bundle beside the weights.

Each signal x is put on one scale by its in-distribution reference (posts like the training data:
GoEmotions dev for the default bundle):

    z = (x - median) / (high - median)      high: the reference's 99th percentile

so z = 1 means "as unusual as the 1 % most unusual in-distribution posts" for every signal. The
combined score is the largest z of the post's signals (the signal that gives it names the reason);
the cut is the combined score's quantile on the in-distribution posts at 1 - ``false_alarm_rate``.

Files in a bundle (a worker that predates them ignores them):

    ood.json            supported languages, references, cut, false-alarm rate, density layer
    ood.safetensors     density.means (C, D), density.whitening (D, D)

A model without them (any Hugging Face checkpoint) gets ``builtin_calibration``: the language
signal alone, with its reference measured on GoEmotions dev (its cut: that reference's 99th
percentile, so about 1 % of English posts flagged).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.ood.density import ClassGaussians

OOD_JSON = "ood.json"
OOD_TENSORS = "ood.safetensors"
SIGNALS = ("language", "density", "tokens_per_word", "unknown_share")
REFERENCE_QUANTILE = 0.99
# The language signal on GoEmotions dev (5,426 posts, py3langid 0.4.0, supported: en): median and
# 99th percentile of -log10 P(en) (emotion-stream calibrate on the default model, 2026-12-03).
# Used when a model carries no calibration of its own.
BUILTIN_LANGUAGE_REFERENCE = (0.0038, 1.1577)


@dataclass(frozen=True)
class Reference:
    """A signal's in-distribution median and ``REFERENCE_QUANTILE`` quantile."""

    median: float
    high: float

    def z(self, x: np.ndarray) -> np.ndarray:
        spread = self.high - self.median
        return (np.asarray(x, dtype=np.float64) - self.median) / (spread if spread > 1e-9 else 1e-9)

    @classmethod
    def of(cls, values: np.ndarray) -> Reference:
        v = np.asarray(values, dtype=np.float64)
        return cls(float(np.median(v)), float(np.quantile(v, REFERENCE_QUANTILE)))


@dataclass(frozen=True)
class OodCalibration:
    supported_languages: tuple[str, ...]
    references: dict[str, Reference]
    cut: float
    false_alarm_rate: float
    layer: int = 0  # the encoder layer the density reads (0: no density signal)
    density: ClassGaussians | None = None
    source: str = "builtin"  # "bundle" or "builtin"
    measured: dict[str, Any] = field(default_factory=dict)  # what the cut was chosen on

    def __post_init__(self) -> None:
        unknown = set(self.references) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown OOD signals {sorted(unknown)}; known: {list(SIGNALS)}")
        if ("density" in self.references) != (self.density is not None and self.layer > 0):
            raise ValueError("the density signal needs its statistics and its layer")
        if not math.isfinite(self.cut):
            raise ValueError(f"OOD cut must be a number, not {self.cut}")

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(s for s in SIGNALS if s in self.references)


def builtin_calibration(supported_languages: tuple[str, ...] = ("en",)) -> OodCalibration:
    median, high = BUILTIN_LANGUAGE_REFERENCE
    return OodCalibration(
        supported_languages=supported_languages,
        references={"language": Reference(median, high)},
        cut=1.0,
        false_alarm_rate=1.0 - REFERENCE_QUANTILE,
        source="builtin",
    )


def choose_cut(combined: np.ndarray, false_alarm_rate: float) -> float:
    """The cut that flags ``false_alarm_rate`` of the in-distribution ``combined`` scores."""
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must lie in (0, 1), not {false_alarm_rate}")
    return float(np.quantile(np.asarray(combined, dtype=np.float64), 1.0 - false_alarm_rate))


def write_calibration(folder: Path, calibration: OodCalibration) -> None:
    from safetensors.numpy import save_file

    data = {
        "supported_languages": list(calibration.supported_languages),
        "references": {
            name: {"median": r.median, "high": r.high} for name, r in calibration.references.items()
        },
        "reference_quantile": REFERENCE_QUANTILE,
        "cut": calibration.cut,
        "false_alarm_rate": calibration.false_alarm_rate,
        "layer": calibration.layer,
        "measured": calibration.measured,
    }
    (folder / OOD_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tensors = folder / OOD_TENSORS
    if calibration.density is None:
        tensors.unlink(missing_ok=True)
        return
    save_file(
        {
            "density.means": np.ascontiguousarray(calibration.density.means, dtype=np.float32),
            "density.whitening": np.ascontiguousarray(
                calibration.density.whitening, dtype=np.float32
            ),
        },
        str(tensors),
    )
    tensors.chmod(0o644)  # safetensors writes 0600: images run as another user


def read_calibration(folder: Path) -> OodCalibration | None:
    """The calibration stored in a bundle folder, or None when it has none."""
    path = folder / OOD_JSON
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    density = None
    if (folder / OOD_TENSORS).is_file():
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / OOD_TENSORS))
        density = ClassGaussians(
            means=tensors["density.means"].astype(np.float64),
            whitening=tensors["density.whitening"].astype(np.float64),
        )
    return OodCalibration(
        supported_languages=tuple(data["supported_languages"]),
        references={
            name: Reference(float(r["median"]), float(r["high"]))
            for name, r in data["references"].items()
        },
        cut=float(data["cut"]),
        false_alarm_rate=float(data["false_alarm_rate"]),
        layer=int(data.get("layer", 0)),
        density=density,
        source="bundle",
        measured=dict(data.get("measured", {})),
    )
