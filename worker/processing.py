"""What happens to one batch of decoded messages, independent of where they came from.

Kafka mode (``pipeline.py``) and file mode (``file_mode.py``) both call this, so the same post gets
the same treatment in both: tokenise, run the MC Dropout engine, route, build the output events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from schemas import DeadLetter, DeadLetterError, RecordHeader, SocialPost
from worker.decoding import DecodeFailure, payload_for_dead_letter
from worker.inference.engine import EngineConfig, McDropoutEngine
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.calibration import builtin_calibration
from worker.ood.scorer import OodBatch, OodScorer
from worker.routing.policy import ReviewPolicy
from worker.routing.router import RoutedPost, Router
from worker.settings import WorkerSettings

CHARS_PER_TOKEN_BOUND = 16  # no token is longer: texts are cut before tokenising, never rejected


class NonFiniteScores(ValueError):
    """The model gave some posts of a batch scores that are not numbers: no event is published
    for them. ``routed`` holds the events of the batch's other posts (by position), so that only
    the ``failed`` ones are retried alone (and dead-lettered if they fail again)."""

    def __init__(self, message: str, failed: list[int], routed: dict[int, RoutedPost]) -> None:
        super().__init__(message)
        self.failed = failed
        self.routed = routed


def non_finite_posts(summary: McSummary, label_names: list[str]) -> tuple[list[int], str]:
    """The posts whose MC mean is NaN or infinite for some label (a broken checkpoint, or a
    16-bit overflow): such a post has no probability to publish; and why, in words."""
    bad = ~np.isfinite(summary.mean)
    posts = bad.any(axis=1)
    if not posts.any():
        return [], ""
    labels = [label_names[j] for j in np.flatnonzero(bad[posts][0])]
    shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    return np.flatnonzero(posts).tolist(), (
        f"the model's scores are not finite (NaN or infinite) for {int(posts.sum())} of "
        f"{len(posts)} posts (the first: {shown})"
    )


@dataclass
class BatchTiming:
    tokenize_s: float = 0.0
    inference_s: float = 0.0
    routing_s: float = 0.0


class BatchProcessor:
    """Tokenise → MC Dropout → route, for a list of valid posts. Confined to one thread."""

    def __init__(self, classifier: Classifier, settings: WorkerSettings) -> None:
        self.classifier = classifier
        self.settings = settings
        n_samples = settings.model.n_samples
        self.ood = ood_scorer(classifier, settings)
        self.engine = McDropoutEngine(
            classifier,
            EngineConfig(
                n_samples=n_samples,
                mode=settings.model.mc_mode,
                seed=settings.model.seed,
                precision=settings.model.precision,
                max_tokens_per_forward=settings.model.max_tokens_per_forward,
                feature_layer=0 if self.ood is None else self.ood.feature_layer,
            ),
        )
        self.model_info: dict[str, Any] = {
            "name": classifier.name,
            "revision": classifier.revision,
            "n_samples": self.engine.n_samples,
            "mc_mode": self.engine.mode,
            "precision": self.engine.precision,
            "rollout_version": None,  # set when the model came from a release
        }
        self.policy = ReviewPolicy(
            settings.review,
            classifier.label_names,
            classifier.thresholds,
            ood=settings.ood,
            selector=classifier.selector,
            calibration=classifier.calibration,
        )
        self.router = Router(
            self.policy,
            classifier.label_names,
            classifier.thresholds,
            self.model_info,
            settings.worker_id,
            settings.event_layout,
        )
        self.max_chars = classifier.max_length * CHARS_PER_TOKEN_BOUND

    def tokenize(self, posts: list[SocialPost]) -> list[list[int]]:
        return self.classifier.tokenize([p.text[: self.max_chars] for p in posts])

    def infer(self, token_ids: list[list[int]]) -> McSummary:
        return self.engine.predict(token_ids)

    def out_of_distribution(
        self, posts: list[SocialPost], token_ids: list[list[int]], summary: McSummary
    ) -> OodBatch | None:
        if self.ood is None:
            return None
        texts = [p.text[: self.max_chars] for p in posts]
        return self.ood.score(texts, [p.lang for p in posts], token_ids, summary.features)

    def route(
        self,
        posts: list[SocialPost],
        sources: list[dict[str, Any] | None],
        summary: McSummary,
        ood: OodBatch | None = None,
        token_counts: list[int] | None = None,
    ) -> list[RoutedPost]:
        return self.router.route(posts, sources, summary, ood, token_counts)

    def process(
        self,
        posts: list[SocialPost],
        sources: list[dict[str, Any] | None],
        token_ids: list[list[int]] | None = None,
        timing: BatchTiming | None = None,
    ) -> list[RoutedPost]:
        """Everything after decoding, for one batch (``token_ids`` when already tokenised)."""
        t0 = time.perf_counter()
        if token_ids is None:
            token_ids = self.tokenize(posts)
        t1 = time.perf_counter()
        summary = self.infer(token_ids)
        failed, why = non_finite_posts(summary, self.classifier.label_names)
        if failed:  # the other posts go on; the failed ones are the caller's to retry
            bad = set(failed)
            kept = [i for i in range(len(posts)) if i not in bad]
            posts, sources = [posts[i] for i in kept], [sources[i] for i in kept]
            token_ids, summary = [token_ids[i] for i in kept], summary.rows(kept)
        routed: list[RoutedPost] = []
        t2 = time.perf_counter()
        if posts:  # none left when every post's scores failed
            ood = self.out_of_distribution(posts, token_ids, summary)
            t2 = time.perf_counter()
            routed = self.route(posts, sources, summary, ood, [len(t) for t in token_ids])
        if timing is not None:
            timing.tokenize_s += t1 - t0
            timing.inference_s += t2 - t1
            timing.routing_s += time.perf_counter() - t2
        if failed:
            raise NonFiniteScores(why, failed, dict(zip(kept, routed, strict=True)))
        return routed


def ood_scorer(classifier: Classifier, settings: WorkerSettings) -> OodScorer | None:
    """The OOD signals for ``classifier``: its own calibration, or the language signal alone
    (``builtin_calibration``); None when ``ood.enabled`` is off."""
    ood = settings.ood
    if not ood.enabled:
        return None
    calibration = classifier.ood or builtin_calibration()
    return OodScorer(
        calibration,
        classifier.tokenizer,
        classifier.max_length,
        supported_languages=ood.supported_languages or None,
        cut=ood.cut,
    )


def dead_letter_event(
    failure: DecodeFailure,
    value: bytes | None,
    source: dict[str, Any],
    key: bytes | None,
    worker_id: str,
    keep_bytes: int,
    headers: list[RecordHeader] | None = None,
) -> dict[str, Any]:
    """A dead letter as a JSON-ready dict (validated: this path is rare and must be right)."""
    import base64

    letter = DeadLetter(
        error=DeadLetterError(kind=failure.kind, message=failure.message, field=failure.field),
        source=source,
        key_base64=None if key is None else base64.b64encode(key).decode("ascii"),
        payload=payload_for_dead_letter(value, keep_bytes),
        failed_at=datetime.now(UTC),
        worker_id=worker_id,
        headers=headers,
    )
    event = letter.model_dump(mode="json")
    if headers is None:  # file mode: no record headers
        del event["headers"]
    return event
