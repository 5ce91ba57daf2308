"""The loaded model, and inference of a batch that never fails for one post: when the batch
fails (a post the tokeniser or model cannot handle, or one the model gives NaN scores), each
post is retried alone and a post that still fails becomes a ``processing_error`` dead letter.
When every post fails for ``SYSTEMIC_FAILURES`` posts in a row, the model itself is broken: stop
(exit 4) rather than dead-letter the whole stream.

In the Kafka worker it runs in the model thread; file mode runs it in its own.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import TopicPartition

from schemas import SocialPost
from worker.decoding import DecodeFailure
from worker.exit_codes import EXIT_MODEL, FatalError
from worker.inbound import Inbound
from worker.inference.loading import Classifier, load_classifier
from worker.processing import BatchProcessor, BatchTiming, NonFiniteScores
from worker.routing.router import RoutedPost
from worker.settings import WorkerSettings

log = structlog.get_logger("worker.pipeline")

# posts in a row that fail inference one by one: the model itself is broken, not the posts
SYSTEMIC_FAILURES = 64


class FailureIsolation:
    """Inference of a batch that never fails for one post (the Kafka worker's and file
    mode's)."""

    def __init__(self, processor: BatchProcessor) -> None:
        self.processor = processor
        self.failures_in_a_row = 0  # posts that failed inference alone, in a row

    def process(
        self,
        number: int,
        posts: list[SocialPost],
        sources: list[dict[str, Any] | None],
        token_ids: list[list[int]] | None = None,
        timing: BatchTiming | None = None,
    ) -> list[RoutedPost | str]:
        """Per post, in order: its routed events, or (when it fails alone) why, in words."""
        if not posts:
            return []
        try:
            routed = self.processor.process(posts, sources, token_ids=token_ids, timing=timing)
            self.failures_in_a_row = 0
            return list(routed)
        except NonFiniteScores as exc:  # the rest of the batch was routed: retry only these
            log.warning(
                "posts with non-finite scores; retrying them one by one",
                batch=number,
                posts=len(exc.failed),
                error=str(exc)[:300],
            )
            if exc.routed:
                self.failures_in_a_row = 0
            return [
                exc.routed[i] if i in exc.routed else self._alone(post, source, timing)
                for i, (post, source) in enumerate(zip(posts, sources, strict=True))
            ]
        except Exception as exc:
            log.warning(
                "batch failed; retrying its posts one by one",
                batch=number,
                posts=len(posts),
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
        return [
            self._alone(post, source, timing) for post, source in zip(posts, sources, strict=True)
        ]

    def _alone(
        self, post: SocialPost, source: dict[str, Any] | None, timing: BatchTiming | None = None
    ) -> RoutedPost | str:
        try:
            routed = self.processor.process([post], [source], timing=timing)[0]
        except Exception as exc:
            self.failures_in_a_row += 1
            error = f"{type(exc).__name__}: {exc}"
            if self.failures_in_a_row >= SYSTEMIC_FAILURES:
                raise FatalError(
                    f"inference failed for {self.failures_in_a_row} posts in a row, each "
                    f"alone: the model cannot run ({error[:300]}); stopped before the posts "
                    "after them",
                    EXIT_MODEL,
                ) from exc
            log.warning("post dead-lettered: inference failed", **(source or {}), error=error[:300])
            return f"inference failed for this post: {error}"[:500]
        self.failures_in_a_row = 0
        return routed

    def route(
        self, number: int, items: list[Inbound], token_ids: list[list[int]] | None
    ) -> dict[tuple[TopicPartition, int], RoutedPost]:
        """The routed events of the items' valid posts, by (partition, offset); a post that
        fails alone gets ``item.failure`` instead."""
        valid = [i for i in items if i.post is not None]
        posts = [i.post for i in valid if i.post is not None]
        results = self.process(number, posts, [i.source() for i in valid], token_ids)
        by_offset: dict[tuple[TopicPartition, int], RoutedPost] = {}
        for item, result in zip(valid, results, strict=True):
            if isinstance(result, str):
                item.post = None
                item.failure = DecodeFailure("processing_error", result)
            else:
                by_offset[(item.tp, item.offset)] = result
        return by_offset


@dataclass
class Model:
    """What the stages run, loaded: the processor (tokenise, MC Dropout, route) and its
    failure isolation."""

    processor: BatchProcessor
    isolation: FailureIsolation

    @classmethod
    async def load(
        cls,
        classifier: Classifier | None,
        settings: WorkerSettings,
        processor_factory: Any,
        model_thread: Executor,
    ) -> Model:
        """Load the classifier (unless given) and build the processor, both on the model
        thread: the engine copies weights (parallel torch work), and a second thread running
        torch slows every pass down (``inference/model_thread.py``)."""
        loop = asyncio.get_running_loop()
        if classifier is None:
            log.info("loading model", model=settings.model.path)
            classifier = await loop.run_in_executor(model_thread, load_classifier, settings.model)
        processor: BatchProcessor = await loop.run_in_executor(
            model_thread, processor_factory, classifier, settings
        )
        log.info(
            "model ready",
            model=classifier.name,
            revision=classifier.revision,
            labels=len(classifier.label_names),
            adapter=classifier.adapter.describe(),
            mc_mode=processor.engine.mode,
            n_samples=processor.engine.n_samples,
        )
        return cls(processor, FailureIsolation(processor))
