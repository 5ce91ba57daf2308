"""numpy's OpenBLAS runs on one thread while the worker runs (worker/inference/blas_threads.py)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from threadpoolctl import ThreadpoolController

from schemas import SocialPost
from worker.decoding import DecodeLimits
from worker.file_mode import classify_stream
from worker.inference.blas_threads import OneBlasThread
from worker.inference.loading import Classifier
from worker.pipeline import Pipeline
from worker.processing import BatchProcessor
from worker.settings import WorkerSettings

assert np  # OpenBLAS is loaded with numpy


def openblas_threads() -> set[int]:
    """The thread counts of the OpenBLAS libraries loaded (numpy's, scipy's when loaded)."""
    return {
        lib.num_threads
        for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers
    }


@pytest.fixture
def two_openblas_threads() -> Iterator[None]:
    """A host program's own setting: two OpenBLAS threads (whatever the machine's default)."""
    with ThreadpoolController().select(internal_api="openblas").limit(limits=2):
        if openblas_threads() != {2}:
            pytest.skip(f"OpenBLAS threads cannot be set to 2 here: {openblas_threads()}")
        yield


def _settings(model_dir: Path) -> WorkerSettings:
    return WorkerSettings.from_layers(
        {
            "model": {"path": str(model_dir), "n_samples": 2, "seed": 1, "device": "cpu"},
            "http_port": 0,
        },
        {},
    )


def test_one_thread_between_start_and_stop_then_the_hosts_setting_again(
    two_openblas_threads: None,
) -> None:
    torch_threads = torch.get_num_threads()
    limit = OneBlasThread()
    limit.start()
    limit.start()  # a second start changes nothing: stop still gives back the host's 2
    assert openblas_threads() == {1}
    assert torch.get_num_threads() == torch_threads  # torch's threads are not OpenBLAS's
    limit.stop()
    assert openblas_threads() == {2}
    limit.stop()  # stopping again is harmless
    assert openblas_threads() == {2}
    with OneBlasThread():
        assert openblas_threads() == {1}
    assert openblas_threads() == {2}


def test_two_holders_in_one_process_keep_one_thread_until_the_last_stops(
    two_openblas_threads: None,
) -> None:
    """Two pipelines in one process, the first stopping while the second runs: the second keeps
    one thread; the host's two come back with the last stop."""
    first, second = OneBlasThread(), OneBlasThread()
    first.start()
    second.start()
    first.stop()
    assert openblas_threads() == {1}
    second.stop()
    assert openblas_threads() == {2}


def test_the_pipeline_runs_openblas_on_one_thread_from_the_models_load_to_close(
    two_openblas_threads: None, test_model_dir: Path, test_classifier: Classifier
) -> None:
    pipeline = Pipeline(_settings(test_model_dir), classifier=test_classifier)
    try:
        asyncio.run(pipeline._load_model())
        assert openblas_threads() == {1}
        in_model_thread = pipeline._model_thread.submit(openblas_threads).result()
        assert in_model_thread == {1}
    finally:
        asyncio.run(pipeline._close())
    assert openblas_threads() == {2}


class _Recording(BatchProcessor):
    seen: list[set[int]]

    def process(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(openblas_threads())
        return super().process(*args, **kwargs)


def test_file_mode_runs_every_batch_with_openblas_on_one_thread(
    two_openblas_threads: None, test_model_dir: Path, test_classifier: Classifier
) -> None:
    settings = _settings(test_model_dir)
    processor = _Recording(test_classifier, settings)
    processor.seen = []
    lines = b"".join(
        orjson.dumps(SocialPost(id=f"p{i}", text=f"post number {i} is great").model_dump()) + b"\n"
        for i in range(5)
    )
    enriched = io.BytesIO()
    stats = classify_stream(
        io.BytesIO(lines),
        "mem.jsonl",
        processor,
        DecodeLimits.of(settings),
        enriched.write,
        io.BytesIO().write,
        batch_size=2,
    )
    assert stats.enriched == 5
    assert processor.seen == [{1}, {1}, {1}]  # three batches: 2, 2 and 1 posts
    assert openblas_threads() == {2}
