"""Language identification: is a post written in a language the model was trained on?

py3langid (a maintained, numpy-only fork of langid.py: 140 languages, n-gram naive Bayes) gives
every language a probability. The signal is ``-log10 P(supported languages)``: 0 for a post the
identifier is sure is supported, 30 (the cap) for one it is sure is not. Measured on GoEmotions dev
(short, informal English): 2.5 % of the posts have another most probable language and P(English)
is below 0.025 for 1 % of them, so this is one signal among several (``scorer.py``), never a
verdict by itself.

A post with fewer than ``MIN_LETTERS`` letters is too short to identify ("lol" came out Sesotho
at P(English) = 0.006), and one with no n-gram the identifier knows comes out about uniform: both
score 0, language ``und``. The identifier's
own class for text without linguistic content (``zxx``: emoji, symbols) counts as supported: such
a post is not in another language (the tokenizer signals judge it).

The producer knows better than a guess: a post whose ``lang`` field is set is scored from it (0
for a supported language, the cap otherwise), and the identifier is not run. ``lang`` is read as a
BCP 47 tag: ``en``, ``en-US`` and ``EN_gb`` are English; ``und``, ``mul`` and ``zxx`` count as
not set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from worker.ood.language_batch import BatchLanguageIdentifier

UNSET_TAGS = frozenset({"", "und", "mul", "zxx", "mis"})
UNDETERMINED = "und"
NO_LANGUAGE = "zxx"  # py3langid's class for text without linguistic content (emoji, symbols)
MIN_LETTERS = 10  # fewer letters than this: too short to identify ("lol", "haha", "ok")
NO_EVIDENCE_FACTOR = 3.0  # a top probability under 3 / languages: the identifier had no n-grams
MAX_SCORE = 30.0  # -log10 of a probability the identifier cannot tell from zero (float32)


def primary_subtag(tag: str | None) -> str | None:
    """``en-US`` -> ``en``; None for an unset or undetermined tag."""
    if tag is None:
        return None
    primary = tag.strip().replace("_", "-").split("-", 1)[0].lower()
    return None if primary in UNSET_TAGS else primary


@cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@cache
def _batch_identifier() -> BatchLanguageIdentifier:
    """The same model, a batch at a time (read-only after construction: safe across threads)."""
    return BatchLanguageIdentifier(_identifier())


def known_languages() -> frozenset[str]:
    return frozenset(_identifier().nb_classes)


@dataclass(frozen=True)
class LanguageVerdict:
    score: float  # -log10 P(supported), in [0, MAX_SCORE]
    language: str  # the most probable language (or the producer's)
    source: str  # "producer" (the post's lang field) or "detected"


class LanguageSignal:
    """Scores posts against ``supported`` languages (ISO 639-1 codes)."""

    def __init__(self, supported: Sequence[str]) -> None:
        self.supported = frozenset(code.lower() for code in supported)
        if not self.supported:
            raise ValueError("at least one supported language is needed")
        unknown = sorted(self.supported - known_languages())
        if unknown:
            raise ValueError(f"languages the identifier does not know: {unknown}")
        # built now (~0.2 s: the automaton's table), not in the first batch
        classes = _batch_identifier().classes
        self._supported_columns = [
            i for i, code in enumerate(classes) if code in self.supported or code == NO_LANGUAGE
        ]

    def score(self, texts: Sequence[str], langs: Sequence[str | None]) -> list[LanguageVerdict]:
        out: list[LanguageVerdict | None] = []
        to_identify: list[int] = []
        for text, lang in zip(texts, langs, strict=True):
            declared = primary_subtag(lang)
            if declared is not None:
                supported = declared in self.supported
                out.append(LanguageVerdict(0.0 if supported else MAX_SCORE, declared, "producer"))
            elif sum(ch.isalpha() for ch in text[: MIN_LETTERS * 4]) < MIN_LETTERS:
                out.append(LanguageVerdict(0.0, UNDETERMINED, "detected"))  # too short to tell
            else:
                to_identify.append(len(out))
                out.append(None)
        if to_identify:
            identifier = _batch_identifier()
            probabilities = identifier.probabilities([texts[i] for i in to_identify])
            inside = probabilities[:, self._supported_columns].sum(axis=1)
            top = probabilities.argmax(axis=1)
            no_evidence = NO_EVIDENCE_FACTOR / len(identifier.classes)
            for i, p_top, column, p_inside in zip(
                to_identify,
                probabilities.max(axis=1).tolist(),
                top.tolist(),
                inside.tolist(),
                strict=True,
            ):
                if p_top < no_evidence:  # about uniform: nothing to go on
                    out[i] = LanguageVerdict(0.0, UNDETERMINED, "detected")
                    continue
                score = min(MAX_SCORE, -math.log10(p_inside)) if p_inside > 0 else MAX_SCORE
                language = identifier.classes[column]
                out[i] = LanguageVerdict(round(max(0.0, score), 4), language, "detected")
        return [v for v in out if v is not None]
