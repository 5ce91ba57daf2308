"""The model the worker's stages use, replaced by each new release between batches.

At start, once Kafka is reachable and before the first batch, the control topic's current release
(if any) replaces the configured model. While running, ``apply`` loads a newer release on the
model thread (the batch in inference finishes first; the next waits for the load, seconds for a
bundle), then the stages take the new model for every batch prepared after it; a batch already
tokenised finishes with the model that tokenised it. A release that fails to load is logged, and
the model in use stays.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

import numpy as np
import structlog

from schemas import BundleRelease
from worker.feedback.rollout import follow_rollouts, read_rollout
from worker.inference.loading import Classifier, load_classifier
from worker.isolation import Model
from worker.settings import WorkerSettings

log = structlog.get_logger("worker.pipeline")


def use_release_thresholds(classifier: Classifier, release: BundleRelease) -> None:
    """The release's thresholds in place of the bundle's (labels it does not name keep theirs)."""
    if release.thresholds:
        t = release.thresholds
        names = classifier.label_names
        classifier.thresholds = np.array(
            [t.get(n, float(x)) for n, x in zip(names, classifier.thresholds, strict=True)]
        )


class ModelSwitch:
    def __init__(
        self,
        settings: WorkerSettings,
        classifier: Classifier | None,
        processor_factory: Any,
        model_thread: Executor,
    ) -> None:
        self.settings = settings
        self._classifier = classifier
        self._factory = processor_factory
        self._thread = model_thread
        self.current: Model | None = None
        self.version: int | None = None  # the release in use (None: the configured model)
        self.start_offset = 0  # where following the control topic starts
        self._lock = asyncio.Lock()

    async def load_initial(self) -> Model:
        """The configured model (``catch_up`` then swaps to the current release, if any)."""
        self.current = await Model.load(
            self._classifier, self.settings, self._factory, self._thread
        )
        return self.current

    async def catch_up(self) -> None:
        """Before the first batch: swap to the control topic's current release, if there is one
        (Kafka is reachable by now); following starts after it."""
        if not self.settings.follow_rollouts:
            return
        try:
            rollout, self.start_offset = await asyncio.wait_for(
                read_rollout(self.settings.kafka, self.settings.topics.control), 30
            )
        except Exception as exc:  # the follower reads it from the start once it can
            log.warning("control topic not read at start", error=f"{type(exc).__name__}: {exc}")
            return
        if rollout is not None:
            await self.apply(rollout.current)

    @property
    def model(self) -> Model:
        """The model in use (loaded before the stages start)."""
        assert self.current is not None
        return self.current

    async def follow(self) -> None:
        """Swap to each release announced on the control topic, until cancelled."""
        s = self.settings
        await follow_rollouts(s.kafka, s.topics.control, self.start_offset, self.apply)

    async def apply(self, release: BundleRelease) -> None:
        """Swap to ``release`` unless it is the one in use."""
        if self.version is not None and release.version <= self.version:
            return
        async with self._lock:
            try:
                await self._load(release)
            except Exception as exc:
                log.error(
                    "release failed to load: the model in use stays",
                    version=release.version,
                    model=release.model_path,
                    error=f"{type(exc).__name__}: {exc}",
                )

    async def _load(self, release: BundleRelease) -> Model:
        settings = self.settings.model_copy(deep=True)
        settings.model.path = release.model_path
        loop = asyncio.get_running_loop()
        classifier = await loop.run_in_executor(self._thread, load_classifier, settings.model)
        use_release_thresholds(classifier, release)
        model = await Model.load(classifier, settings, self._factory, self._thread)
        model.processor.model_info["rollout_version"] = release.version
        previous = self.version
        self.current, self.version = model, release.version
        log.info(
            "model swapped",
            version=release.version,
            previous_version=previous,
            model=release.model_path,
            revision=classifier.revision,
            reason=release.reason,
        )
        return model
