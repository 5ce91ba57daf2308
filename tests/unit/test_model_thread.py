"""All model work of a worker runs on one thread (see worker/inference/model_thread.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import pytest

from worker import isolation as model_module
from worker.inference.loading import Classifier
from worker.inference.model_thread import THREAD_NAME, model_thread
from worker.pipeline import Pipeline
from worker.processing import BatchProcessor
from worker.settings import WorkerSettings


def _settings(model_dir: Path) -> WorkerSettings:
    return WorkerSettings.from_layers(
        {"model": {"path": str(model_dir), "device": "cpu"}, "http_port": 0}, {}
    )


class _Recorder:
    def __init__(self) -> None:
        self.threads: dict[str, int] = {}

    def factory(self, classifier: Classifier, settings: WorkerSettings) -> BatchProcessor:
        self.threads["engine"] = threading.get_ident()
        assert threading.current_thread().name.startswith(THREAD_NAME)
        return BatchProcessor(classifier, settings)


def test_the_worker_loads_the_model_and_builds_the_engine_on_its_model_thread(
    test_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    real_load = model_module.load_classifier

    def load(settings: Any) -> Classifier:
        recorder.threads["load"] = threading.get_ident()
        return real_load(settings)

    monkeypatch.setattr(model_module, "load_classifier", load)
    pipeline = Pipeline(_settings(test_model_dir), processor_factory=recorder.factory)
    try:
        asyncio.run(pipeline._load_model())
        batches = pipeline._model_thread.submit(threading.get_ident).result()
    finally:
        asyncio.run(pipeline._close())
    assert recorder.threads["load"] == recorder.threads["engine"] == batches
    assert batches != threading.get_ident()  # not the event loop's thread
    with pytest.raises(RuntimeError):  # the pipeline's own thread is shut down with it
        pipeline._model_thread.submit(threading.get_ident)


def test_a_model_thread_handed_in_runs_the_engine_and_outlives_the_pipeline(
    test_model_dir: Path, test_classifier: Classifier
) -> None:
    recorder = _Recorder()
    with model_thread() as executor:
        caller = executor.submit(threading.get_ident).result()
        pipeline = Pipeline(
            _settings(test_model_dir),
            classifier=test_classifier,
            processor_factory=recorder.factory,
            model_executor=executor,
        )
        asyncio.run(pipeline._load_model())
        asyncio.run(pipeline._close())
        assert recorder.threads["engine"] == caller
        assert executor.submit(threading.get_ident).result() == caller  # still running


def test_what_is_alive_once_the_model_is_ready_is_frozen_until_close(
    test_model_dir: Path, test_classifier: Classifier
) -> None:
    """The cyclic collector skips the model and libraries while the worker runs (see
    ``gc_freeze.freeze_long_lived_objects``) and sees them again once it stops."""
    gc.unfreeze()
    pipeline = Pipeline(_settings(test_model_dir), classifier=test_classifier)
    try:
        asyncio.run(pipeline._load_model())
        assert gc.get_freeze_count() > 10_000  # the model, tokenizer and libraries
    finally:
        asyncio.run(pipeline._close())
    assert gc.get_freeze_count() == 0


def test_a_host_programs_frozen_objects_stay_frozen_after_close(
    test_model_dir: Path, test_classifier: Classifier
) -> None:
    """A program that froze objects itself before embedding the pipeline keeps them frozen."""
    gc.unfreeze()
    gc.freeze()
    host_frozen = gc.get_freeze_count()
    assert host_frozen > 0
    pipeline = Pipeline(_settings(test_model_dir), classifier=test_classifier)
    try:
        asyncio.run(pipeline._load_model())
        assert gc.get_freeze_count() >= host_frozen
    finally:
        asyncio.run(pipeline._close())
        frozen_after = gc.get_freeze_count()
        gc.unfreeze()
    assert frozen_after >= host_frozen
