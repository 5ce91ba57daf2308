"""One batch's out-of-distribution scores: every signal, the combined score, the flag and the
signal that raised it (``calibration.py`` has the scale they share)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.ood.calibration import OodCalibration, Reference
from worker.ood.language import LanguageSignal, LanguageVerdict
from worker.ood.tokens import TokenSignals


@dataclass
class OodBatch:
    """Per post (first axis): the raw signals, their z, the combined score and the flag."""

    signals: dict[str, np.ndarray]  # raw value per signal, (B,) each; NaN where not measured
    z: dict[str, np.ndarray]
    score: np.ndarray  # (B,) the largest z
    flagged: np.ndarray  # (B,) bool: score above the cut
    fired: list[str | None]  # the signal with the largest z, for flagged posts
    languages: list[LanguageVerdict] | None
    cut: float
    references: dict[str, Reference]
    supported_languages: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.score)

    def high(self, signal: str) -> float:
        """The signal's in-distribution 99th percentile."""
        return self.references[signal].high


class OodScorer:
    def __init__(
        self,
        calibration: OodCalibration,
        tokenizer: Any,
        max_length: int,
        supported_languages: Sequence[str] | None = None,
        cut: float | None = None,
    ) -> None:
        self.calibration = calibration
        self.cut = calibration.cut if cut is None else cut
        self.supported_languages = tuple(supported_languages or calibration.supported_languages)
        signals = calibration.signals
        self.language = LanguageSignal(self.supported_languages) if "language" in signals else None
        self.tokens = (
            TokenSignals(tokenizer, max_length)
            if {"tokens_per_word", "unknown_share"} & set(signals)
            else None
        )
        self.feature_layer = calibration.layer if "density" in signals else 0

    def score(
        self,
        texts: Sequence[str],
        langs: Sequence[str | None],
        token_ids: Sequence[Sequence[int]],
        features: np.ndarray | None,
    ) -> OodBatch:
        cal = self.calibration
        n = len(texts)
        signals: dict[str, np.ndarray] = {}
        verdicts = None
        if self.language is not None:
            verdicts = self.language.score(texts, langs)
            signals["language"] = np.array([v.score for v in verdicts], dtype=np.float64)
        if cal.density is not None and "density" in cal.references:
            signals["density"] = (
                cal.density.distance(features)
                if features is not None and len(features) == n
                else np.full(n, np.nan)
            )
        if self.tokens is not None:
            per_word, unknown = self.tokens.score(texts, token_ids)
            signals["tokens_per_word"], signals["unknown_share"] = per_word, unknown
        signals = {k: v for k, v in signals.items() if k in cal.references}
        z = {k: cal.references[k].z(v) for k, v in signals.items()}
        if z:
            stacked = np.stack([np.nan_to_num(v, nan=-np.inf) for v in z.values()])
            best = stacked.argmax(axis=0)
            score = stacked.max(axis=0)
        else:
            best, score = np.zeros(n, dtype=np.intp), np.full(n, -np.inf)
        score = np.where(np.isfinite(score), score, 0.0)
        flagged = score > self.cut
        names = list(z)
        fired = [
            names[b] if f else None for b, f in zip(best.tolist(), flagged.tolist(), strict=True)
        ]
        return OodBatch(
            signals=signals,
            z=z,
            score=score,
            flagged=flagged,
            fired=fired,
            languages=verdicts,
            cut=self.cut,
            references=cal.references,
            supported_languages=self.supported_languages,
        )
