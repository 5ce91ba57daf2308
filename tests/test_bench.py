"""``emoworker bench --quick`` (inference part): the result file has the shape the README and
tooling read, with every method measured and the agreement fields against the first full run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from texts import EXAMPLE_TEXTS

from worker.bench.run import BenchOptions, run_bench
from worker.inference.precision import native_bf16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quick_bench_writes_every_method(test_model_dir: Path, tmp_path: Path) -> None:
    import torch

    data = tmp_path / "posts.tsv"
    lines = [
        f"{EXAMPLE_TEXTS[i % len(EXAMPLE_TEXTS)]}\t{i % 28},{(i * 7) % 28}\tid{i}"
        for i in range(60)
    ]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results"
    options = BenchOptions(
        model=str(test_model_dir), data=data, streaming=False, quick=True, output=out
    )
    result = run_bench(options, log=lambda _: None)

    files = list(out.glob("*-quick.json"))
    assert len(files) == 1 and not (out / "latest.json").exists()  # quick runs never replace it
    written = json.loads(files[0].read_text())
    assert written["n_samples"] == result["n_samples"] == 4
    assert isinstance(written["machine"], str)
    names = [m["name"] for m in written["methods"]]
    expected = ["emcoder_loop", "sorted_loop", "full", "full_vs_full", "fast", "fast_int8"]
    if native_bf16(torch.device("cpu")):
        expected += ["full_bf16", "full_bf16_same_seed", "fast_bf16"]
    assert names == [*expected, "deterministic"]
    fields = {
        "posts_per_s", "ratio_to_loop", "label_set_agreement", "review_agreement", "spearman",
        "macro_f1", "aurc", "peak_rss_mb",
    }  # fmt: skip
    for method in written["methods"]:
        assert fields <= method.keys(), method["name"]
        assert method["posts_per_s"] > 0
    by_name = {m["name"]: m for m in written["methods"]}
    assert by_name["emcoder_loop"]["ratio_to_loop"] == 1.0
    full = by_name["full"]  # the reference agrees with itself exactly
    assert full["label_set_agreement"] == full["review_agreement"] == 1.0
    assert full["mean_abs_difference"] == 0.0
    assert by_name["deterministic"]["mean_samples"] == 1.0
    assert 1.0 <= by_name["fast"]["mean_samples"] <= 4.0
    assert written["memory"]["peak_rss_mb"] > 0


def test_transport_bench_counts_every_post_through_its_reader_process(
    kafka: Any, test_model_dir: Path
) -> None:
    """The streaming benches' harness: the worker with the bench-only trivial inference, its
    enriched topic read by a separate reader process that must see every post."""
    import asyncio
    import time

    from worker.bench.streaming import (
        TrivialInferenceProcessor,
        bench_settings,
        post_messages,
        saturated_throughput,
    )
    from worker.inference.loading import load_classifier
    from worker.settings import ModelSettings

    classifier = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    messages = post_messages(list(EXAMPLE_TEXTS), repeat=300 // len(EXAMPLE_TEXTS) + 1)[:300]
    settings = bench_settings(
        kafka.bootstrap_servers, f"harness-{time.time_ns()}", batch_size=64
    ).model_copy(update={"model": ModelSettings(path=str(test_model_dir), device="cpu")})
    result = asyncio.run(
        saturated_throughput(
            settings,
            classifier,
            messages,
            processor_factory=TrivialInferenceProcessor,
            partitions=2,
            timeout_s=120,
        )
    )
    assert result["posts"] == 300
    assert result["seconds"] > 0 and result["posts_per_s"] == pytest.approx(300 / result["seconds"])


def test_fidelity_of_one_deterministic_pass_has_no_spearman() -> None:
    """Constant mutual information (one pass) has no ranking: NaN, without scipy's warning."""
    import warnings

    import numpy as np

    from worker.bench.inference import fidelity
    from worker.inference.uncertainty import summarise_samples

    rng = np.random.default_rng(0)
    thresholds = np.full(4, 0.5)
    targets = (rng.random((40, 4)) > 0.5).astype(np.int8)
    sampled = summarise_samples(rng.random((8, 40, 4)), thresholds)
    single = summarise_samples(rng.random((1, 40, 4)), thresholds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fidelity(single, sampled, thresholds, targets)
    assert np.isnan(result["spearman"])
    assert 0.0 <= result["label_set_agreement"] <= 1.0
    assert fidelity(sampled, sampled, thresholds, targets)["spearman"] == pytest.approx(1.0)
