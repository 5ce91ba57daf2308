"""GPU benchmark: ``make bench-gpu`` (``emoworker bench-gpu``; ``python -m worker.bench.gpu``).

What a GPU needs measured beyond the method table, all on the same posts in one process:

1. the method table of ``worker/bench/inference.py`` (the same methods, agreement and quality
   measures as on the CPU), sized for a GPU (``DeviceProfile``): agreement on all the posts,
   engine methods timed on them repeated, in batches of 4,096 posts, after a warm-up;
2. full MC Dropout (bf16) at several token budgets per forward pass and several batch sizes
   (posts per ``predict``: the pipeline's batch size), with the useful arithmetic rate;
3. the same after ``torch.compile`` of the sampling model (fused elementwise work), when it
   compiles;
4. peak GPU memory for 512 posts of 128 tokens at N = 50 (the CPU's memory probe, on the GPU).

Results go to ``<output>/<date>-<gpu>.json``; nothing here needs Kafka.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.bench.bound import linear_layers_ceiling, measure_bounds, useful_flops_per_sample
from worker.bench.inference import (
    DeviceProfile,
    engine_run,
    predict_in_batches,
    run_inference_bench,
)
from worker.inference.engine import EngineConfig, McDropoutEngine, McMode, tokens_per_forward_for
from worker.inference.loading import Classifier, load_classifier
from worker.inference.uncertainty import McSummary
from worker.settings import ModelSettings
from worker.training.report import predicted_sets


def timed_run(
    classifier: Classifier,
    engine: McDropoutEngine,
    tokens: list[list[int]],
    batch: int,
    reference: McSummary | None = None,
) -> dict[str, Any]:
    """``engine`` over ``tokens`` in batches of ``batch`` posts: speed, useful arithmetic rate,
    peak GPU memory; with ``reference``, label-set agreement on its posts (the first ones)."""
    extra: dict[str, Any] = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = predict_in_batches(engine, tokens, batch)
    seconds = time.perf_counter() - started
    flops = useful_flops_per_sample(classifier, [len(t) for t in tokens]) * engine.n_samples
    if reference is not None:
        n = len(reference.mean)
        thresholds = np.asarray(classifier.thresholds)
        same = predicted_sets(summary.mean[:n], thresholds) == predicted_sets(
            reference.mean, thresholds
        )
        extra["label_set_agreement"] = round(float(same.all(axis=1).mean()), 4)
    return extra | {
        "posts": len(tokens),
        "seconds": round(seconds, 3),
        "posts_per_s": round(len(tokens) / seconds, 1),
        "useful_tflop_per_s": round(flops / seconds / 1e12, 1),
        "mean_samples": float(summary.n_samples.mean()),
        "mean_mutual_information": round(float(summary.mutual_information.mean()), 5),
        "peak_gpu_mb": _peak_gpu_mb(),
    }


def _peak_gpu_mb() -> float:
    if not torch.cuda.is_available():
        return 0.0
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def budget_and_batch_sweep(
    classifier: Classifier,
    tokens: list[list[int]],
    n_samples: int,
    budgets: list[int],
    batches: list[int],
    log: Callable[[str], Any],
) -> list[dict[str, Any]]:
    """Full MC in bf16: every budget at the largest batch, then every batch at the best budget."""

    def row(budget: int, batch: int) -> dict[str, Any]:
        config = EngineConfig(
            n_samples=n_samples, mode="full", precision="bf16", max_tokens_per_forward=budget
        )
        engine = McDropoutEngine(classifier, config)
        done = {"mode": "full", "precision": "bf16", "tokens_per_forward": budget, "batch": batch}
        done |= timed_run(classifier, engine, tokens, batch)
        log(_describe(done))
        return done

    largest = max(batches)
    rows = [row(budget, largest) for budget in budgets]
    best = max(rows, key=lambda r: r["posts_per_s"])["tokens_per_forward"]
    rows += [row(best, batch) for batch in sorted(set(batches) - {largest})]
    return rows


def compiled_runs(
    classifier: Classifier,
    tokens: list[list[int]],
    n_samples: int,
    budget: int,
    batch: int,
    unique: int,
    log: Callable[[str], Any],
) -> list[dict[str, Any]]:
    """Full and fast MC in bf16 with the sampling model under ``torch.compile`` (dynamic
    shapes); a first run on one batch compiles and is reported apart. Label sets of the first
    ``unique`` posts are compared with an uncompiled full bf16 run (MC noise: compare with the
    method table's full_vs_full)."""

    def config(mode: McMode) -> EngineConfig:
        return EngineConfig(
            n_samples=n_samples,
            mode=mode,
            precision="bf16",
            max_tokens_per_forward=budget,
            fast_dropout=False,  # the CPU's numpy mask lanes do not trace (a GPU has none)
        )

    reference = engine_run(classifier, tokens[:unique], config("full"), batch=batch)
    rows = []
    modes: tuple[McMode, ...] = ("full", "fast")
    for mode in modes:
        engine = McDropoutEngine(classifier, config(mode))
        engine.sampling_model = torch.compile(engine.sampling_model, dynamic=True)  # type: ignore[assignment]
        started = time.perf_counter()
        timed_run(classifier, engine, tokens[:batch], batch)
        row = {
            "mode": mode,
            "precision": "bf16",
            "compiled": True,
            "tokens_per_forward": budget,
            "batch": batch,
            "first_run_s": round(time.perf_counter() - started, 1),
        }
        rows.append(row | timed_run(classifier, engine, tokens, batch, reference))
        log(_describe(rows[-1]))
    return rows


def gpu_memory_probe(classifier: Classifier, n_posts: int = 512, n_samples: int = 50) -> dict:
    """Peak GPU memory while full MC (default precision and budget) runs 512 posts of 128
    tokens at N = 50 in one batch."""
    long_text = " ".join(["this is a long post that goes on and on"] * 40)
    tokens = classifier.tokenize([long_text] * n_posts)
    engine = McDropoutEngine(classifier, EngineConfig(n_samples=n_samples, mode="full", seed=0))
    row = timed_run(classifier, engine, tokens, n_posts)
    return {
        "posts": n_posts,
        "tokens_per_post": len(tokens[0]),
        "n_samples": n_samples,
        "tokens_per_forward": tokens_per_forward_for(classifier.device),
        "peak_gpu_mb": row["peak_gpu_mb"],
        "posts_per_s": row["posts_per_s"],
    }


def _describe(row: dict[str, Any]) -> str:
    compiled = " compiled" if row.get("compiled") else ""
    return (
        f"  {row['mode']} {row['precision']}{compiled}, {row['tokens_per_forward']} tokens/pass, "
        f"batch {row['batch']}: {row['posts_per_s']:.0f} posts/s, "
        f"{row['useful_tflop_per_s']} TFLOP/s useful, {row['mean_samples']:.1f} samples, "
        f"peak {row['peak_gpu_mb']:.0f} MB"
    )


def run_gpu_bench(
    data: Path,
    output: Path,
    model: str = "default",
    device: str = "cuda",
    n_samples: int = 30,
    quick: bool = False,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Everything above, written as JSON after each part (a later failure keeps the earlier)."""
    from worker.bench.results import load_posts, machine, markdown_table, write_results

    classifier = load_classifier(ModelSettings(path=model, device=device))
    n_fidelity = 64 if quick else 100_000  # all the posts of the file
    texts, targets = load_posts(data, n_fidelity)
    tokens = classifier.tokenize(texts)
    result: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "model": {"name": classifier.name, "revision": classifier.revision},
        "n_samples": 4 if quick else n_samples,
        "quick": quick,
        "device": str(classifier.device),
        "versions": _versions(),
        "posts": len(texts),
        "mean_tokens": float(np.mean([len(t) for t in tokens])),
    }
    log(f"machine: {result['machine']}; {len(texts)} posts, {result['mean_tokens']:.1f} tokens")

    def save() -> None:
        write_results(result, output, latest=False)

    def part(name: str, fn: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} failed: {type(exc).__name__}: {exc}")
        log(f"{name}: {time.perf_counter() - started:.1f} s")
        save()

    profile = DeviceProfile.for_device(classifier.device)
    if quick:
        profile.engine_batch, profile.timing_repeat = 32, 2
    n = result["n_samples"]
    part("gemm_gflops", lambda: measure_bounds(classifier.device))
    log(f"matmul bound, GFLOP/s: {result['gemm_gflops']}")
    bounds = result["gemm_gflops"] if "error" not in result["gemm_gflops"] else None
    if bounds:
        config = getattr(classifier.model, "config", None)
        part("linear_layers", lambda: linear_layers_ceiling(config, classifier.device, bounds))
        log(f"the model's linear layers alone: {result['linear_layers']}")
    part(
        "methods",
        lambda: run_inference_bench(
            classifier,
            texts,
            targets,
            n,
            16 if quick else 256,
            full_config=EngineConfig(n_samples=n, mode="full"),
            fast_config=EngineConfig(n_samples=n, mode="fast"),
            log=log,
            profile=profile,
            bounds=bounds,
        ),
    )
    if isinstance(result["methods"], list):
        log(markdown_table(result["methods"]))
    timing = tokens * profile.timing_repeat
    budgets = [256, 1024] if quick else [32_768, 131_072, 524_288]
    batches = [16, 32] if quick else [256, 1024, 4096]
    part("sweep", lambda: budget_and_batch_sweep(classifier, timing, n, budgets, batches, log))
    part("memory", lambda: gpu_memory_probe(classifier, 8 if quick else 512, 5 if quick else 50))
    log(f"memory: {result['memory']}")
    budget = tokens_per_forward_for(classifier.device)
    if classifier.device.type == "cuda":  # inductor on the CPU compiles C++ for minutes
        part(
            "compiled",
            lambda: compiled_runs(classifier, timing, n, budget, max(batches), len(texts), log),
        )
    return result


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    out = {}
    for name in ("torch", "transformers", "peft", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["cuda"] = str(torch.version.cuda)
    return out


def main(argv: list[str] | None = None) -> None:
    from worker.bench.results import DEFAULT_DEV, RESULTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-samples", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible (--device cpu --quick checks the bench itself)")
    result = run_gpu_bench(
        args.data, args.output, args.model, args.device, args.n_samples, args.quick
    )
    print(json.dumps({k: v for k, v in result.items() if k != "methods"}, indent=1, default=str))


if __name__ == "__main__":
    main()
