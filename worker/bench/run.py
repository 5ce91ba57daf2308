"""``make bench`` / ``emoworker bench``: every benchmark in one run, one machine, one JSON file."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from worker.bench.bound import (
    linear_layers_ceiling,
    measure_bounds,
    set_bound_fractions,
    steadier_bounds,
)
from worker.bench.compression import compact_event, compression_table
from worker.bench.inference import engine_run, predict_in_batches, run_inference_bench
from worker.bench.ood_cost import ood_cost
from worker.bench.results import (
    DEFAULT_DEV,
    REPO,
    RESULTS,
    load_posts,
    machine,
    markdown_table,
    write_results,
)
from worker.bench.streaming import (
    TrivialInferenceProcessor,
    bench_settings,
    latency_at_rate,
    post_messages,
    saturated_throughput,
)
from worker.inference.blas_threads import OneBlasThread
from worker.inference.engine import EngineConfig, McDropoutEngine, McMode, engine_precision
from worker.inference.loading import Classifier, load_classifier
from worker.inference.model_thread import model_thread
from worker.kafka.snapshot import read_to_end
from worker.onednn import CACHE_VARIABLES, DEFAULT_CAPACITY
from worker.settings import ModelSettings

OVERHEAD_ROUNDS = 3  # pipeline and raw inference pairs behind the overhead's median


def median_round(values: list[float]) -> int:
    """The index of the median of ``values`` (an odd count; the lower middle of an even one)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(values) - 1) // 2]


@dataclass
class BenchOptions:
    model: str = "default"
    data: Path = DEFAULT_DEV
    n_samples: int = 30
    fidelity_posts: int = 800
    speed_posts: int = 256
    threads: int = 0
    streaming: bool = True
    quick: bool = False  # a few posts of everything: checks that the bench runs (tests)
    output: Path = RESULTS


@contextlib.contextmanager
def kafka_for_bench() -> Iterator[tuple[str, int | None]]:
    """The bootstrap servers and, for the local broker, its JVM's pid (its CPU is measured)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield external, None
        return
    from worker.devtools.local_broker import LocalKafka

    with LocalKafka() as broker:
        yield broker.bootstrap_servers, broker.pid


def _watch_rss(
    code: str, seconds: float, env: dict[str, str] | None = None, every_s: float = 0.0
) -> tuple[float, list[float], float]:
    """Run ``code`` in a worker-like child process for at most ``seconds``; its peak RSS (MB),
    its RSS every ``every_s`` seconds (if > 0), and how long it was watched."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    peak, trace = 0.0, list[float]()
    started = time.monotonic()
    p = psutil.Process(proc.pid)
    try:
        while proc.poll() is None and time.monotonic() - started < seconds:
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss / 2**20
                peak = max(peak, rss)
                if every_s and time.monotonic() - started >= every_s * (len(trace) + 1):
                    trace.append(round(rss, 1))
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    return round(peak, 1), trace, round(min(seconds, time.monotonic() - started), 1)


def memory_probe(model: str, n_posts: int, n_samples: int, seconds: float) -> dict[str, Any]:
    """Peak RSS of a worker process while it runs MC Dropout on ``n_posts`` long posts."""
    code = (
        "import sys; from worker.bench.run import _memory_child; "
        f"_memory_child({model!r}, {n_posts}, {n_samples})"
    )
    peak, _, observed = _watch_rss(code, seconds)
    return {
        "posts": n_posts,
        "tokens_per_post": 128,
        "n_samples": n_samples,
        "observed_s": observed,
        "peak_rss_mb": peak,
    }


def _memory_child(model: str, n_posts: int, n_samples: int) -> None:
    classifier = load_classifier(ModelSettings(path=model, device="cpu"))
    long_text = " ".join(["this is a long post that goes on and on"] * 40)
    tokens = classifier.tokenize([long_text] * n_posts)
    engine_run(classifier, tokens, EngineConfig(n_samples=n_samples, seed=0), batch=n_posts)


def steady_memory_probe(
    model: str, data: Path, seconds: float, n_samples: int = 30, batch: int = 64
) -> dict[str, Any]:
    """RSS of a worker process running the default engine over real posts, batch after batch
    (lengths vary, so pass shapes do): with oneDNN's kernel caches as the worker bounds them
    (``worker/onednn.py``) and at the libraries' own 1,024 entries."""
    code = (
        "from worker.bench.run import _steady_memory_child; "
        f"_steady_memory_child({model!r}, {str(data)!r}, {n_samples}, {batch})"
    )
    out: dict[str, Any] = {"seconds": seconds, "batch": batch, "n_samples": n_samples}
    for label, capacity in (("bounded", DEFAULT_CAPACITY), ("library_default", 1024)):
        env = os.environ | {name: str(capacity) for name in CACHE_VARIABLES}
        peak, trace, _ = _watch_rss(code, seconds, env, every_s=seconds / 6)
        out[label] = {"cache_capacity": capacity, "rss_mb_every_sixth": trace, "peak_rss_mb": peak}
    return out


def _steady_memory_child(model: str, data: str, n_samples: int, batch: int) -> None:
    classifier = load_classifier(ModelSettings(path=model, device="cpu"))
    texts, _ = load_posts(Path(data), 100_000)
    tokens = classifier.tokenize(texts)
    engine = McDropoutEngine(classifier, EngineConfig(n_samples=n_samples))
    while True:  # until the parent has seen enough (no summaries kept: not predict_in_batches)
        for start in range(0, len(tokens), batch):
            engine.predict(tokens[start : start + batch])


async def streaming_benches(
    classifier: Classifier,
    texts: list[str],
    options: BenchOptions,
    log: Callable[[str], Any],
    executor: ThreadPoolExecutor,
) -> dict[str, Any]:
    """Through the local broker; ``executor`` is the thread that runs all model work (raw
    inference and the pipelines' batches)."""
    out: dict[str, Any] = {}
    quick = options.quick
    mode: McMode = "fast"
    with kafka_for_bench() as (bootstrap, broker_pid):
        stamp = str(int(time.time()))
        # 1. transport ceiling (trivial inference; bench only)
        n_transport = 2_000 if quick else 60_000
        messages = post_messages(texts, repeat=n_transport // len(texts) + 1)[:n_transport]
        # the worker as configured by default (OOD signals on), the same with exactly-once, and
        # without the OOD signals: what they cost a worker whose inference is nearly free
        # and with zstd outputs (its cost on the event loop; these events' constant
        # probabilities compress far better than real ones: the bytes come from section 2)
        # and with the compact event layout, alone and with zstd
        variants = (
            (False, True, "", "none", "full"),
            (True, True, "_exactly_once", "none", "full"),
            (False, False, "_without_ood", "none", "full"),
            (False, True, "_zstd", "zstd", "full"),
            (False, True, "_compact", "none", "compact"),
            (False, True, "_compact_zstd", "zstd", "compact"),
        )
        for exactly_once, ood, key, codec, layout in variants:
            settings = bench_settings(
                bootstrap, f"transport{key}-{stamp}", batch_size=512, max_in_flight_batches=8,
                exactly_once=exactly_once, ood={"enabled": ood},
                kafka={"producer_compression": codec}, event_layout=layout,
            )  # fmt: skip
            transport = await saturated_throughput(
                settings,
                classifier,
                messages,
                executor,
                processor_factory=TrivialInferenceProcessor,
                broker_pid=broker_pid,
            )
            out[f"transport_ceiling_trivial_inference{key}"] = transport
            cpu = transport["cpu_us_per_post"]
            broker_us = "?" if cpu["broker"] is None else f"{cpu['broker']:.0f}"
            log(
                f"transport ceiling (trivial inference, bench only{key.replace('_', ', ')}): "
                f"{transport['posts_per_s']:.0f} posts/s; CPU a post: worker "
                f"{cpu['worker']:.0f} µs, broker {broker_us}, reader {cpu['reader']:.0f}; "
                f"{transport['cores_busy']:.2f} of {transport['cores']} cores busy"
            )

        # 2. pipeline vs raw inference on the same posts, same engine settings
        n_pipe = 64 if quick else 512
        posts = texts[:n_pipe]
        batch = 64
        n_samples = 4 if quick else options.n_samples
        model_settings = {
            "path": options.model,
            "n_samples": n_samples,
            "mc_mode": mode,
            "seed": 5,
        }
        tokens = classifier.tokenize(posts)
        config = EngineConfig(n_samples=n_samples, mode=mode, seed=5)

        def timed_engine_run() -> float:
            started = time.perf_counter()
            engine_run(classifier, tokens, config, batch=batch)
            return n_pipe / (time.perf_counter() - started)

        async def raw_inference() -> float:
            return await asyncio.get_running_loop().run_in_executor(executor, timed_engine_run)

        # raw inference before, between and after the pipeline runs; each pipeline run is
        # compared with the raw runs on either side of it (this machine's speed drifts), and the
        # pair of runs is repeated: one comparison swung 2-7 % between bench runs
        rounds = 1 if quick else OVERHEAD_ROUNDS
        if not quick:  # the first timed round was the worst in every run before: one untimed
            warm = bench_settings(
                bootstrap,
                f"pipeline-warm-{stamp}",
                batch_size=batch,
                batch_max_wait_ms=100,
                model=model_settings,
            )
            await saturated_throughput(warm, classifier, post_messages(posts), executor)
        raw_runs = [await raw_inference()]
        overheads: dict[bool, list[float]] = {False: [], True: []}
        rates: dict[bool, list[float]] = {False: [], True: []}
        busy: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(rounds):
            for exactly_once, tag in ((False, "pipeline"), (True, "pipeline-eos")):
                settings = bench_settings(
                    bootstrap,
                    f"{tag}{round_}-{stamp}",
                    batch_size=batch,
                    batch_max_wait_ms=100,
                    model=model_settings,
                    exactly_once=exactly_once,
                )
                piped = await saturated_throughput(
                    settings, classifier, post_messages(posts), executor
                )
                if not exactly_once:
                    pipeline_settings = settings
                raw_runs.append(await raw_inference())
                raw_around, busy_share, overhead = against_raw(piped, raw_runs)
                rates[exactly_once].append(piped["posts_per_s"])
                busy[exactly_once].append(busy_share)
                overheads[exactly_once].append(overhead)
                log(
                    f"pipeline ({mode}{', exactly-once' if exactly_once else ''}, round "
                    f"{round_ + 1}/{rounds}): {piped['posts_per_s']:.2f} posts/s through Kafka "
                    f"vs {raw_around:.2f} raw inference ({raw_runs[-2]:.2f} before, "
                    f"{raw_runs[-1]:.2f} after): overhead "
                    f"{100 * overheads[exactly_once][-1]:.1f}%, model thread busy "
                    f"{100 * busy[exactly_once][-1]:.1f}% of the run"
                )
        # what each codec makes of the real events just published (bytes, build time)
        enriched, _ = await read_to_end(pipeline_settings.kafka, pipeline_settings.topics.enriched)
        events = [r.value for records in enriched.values() for r in records if r.value]
        # and of the same events in the compact layout
        for key, layout_events in (
            ("compression", events),
            ("compression_compact", [compact_event(e) for e in events]),
        ):
            out[key] = compression_table(layout_events)
            log(
                f"{key.replace('_', ' ')} of real enriched events (bytes per event, µs to "
                "build): "
                + ", ".join(
                    f"{codec} {row['bytes_per_event']:.0f} B ({row['ratio']:.1f}x) "
                    f"{row['build_us']:.1f} µs"
                    for codec, row in out[key].items()
                )
            )
        out["pipeline"] = {
            "mc_mode": mode,
            "precision": engine_precision(classifier, config, mode),
            "posts": n_pipe,
            "rounds": rounds,
            "untimed_rounds": 0 if quick else 1,  # a pipeline run before the timed rounds
            "raw_inference_posts_per_s": sum(raw_runs) / len(raw_runs),
            "raw_inference_runs": raw_runs,
            # the round of the median overhead, its rate with it
            "pipeline_posts_per_s": rates[False][median_round(overheads[False])],
            "overhead": statistics.median(overheads[False]),
            "overhead_runs": overheads[False],
            "pipeline_runs_posts_per_s": rates[False],
            # the model thread's share of each run busy on batches (see saturated_throughput)
            "model_busy_share_runs": busy[False],
            "exactly_once_posts_per_s": rates[True][median_round(overheads[True])],
            "exactly_once_overhead": statistics.median(overheads[True]),
            "exactly_once_overhead_runs": overheads[True],
            "exactly_once_runs_posts_per_s": rates[True],
            "exactly_once_model_busy_share_runs": busy[True],
        }
        log(
            f"pipeline overhead, median of {rounds}: {100 * out['pipeline']['overhead']:.1f}% "
            f"(exactly-once {100 * out['pipeline']['exactly_once_overhead']:.1f}%)"
        )

        # 2b. the same comparison for the engine the worker runs by default (full MC, unseeded:
        # an ensemble's members sampled at once); the fast seeded one above is kept because
        # earlier runs measured it
        out["pipeline_default_engine"] = await default_engine_overhead(
            bootstrap, classifier, posts, executor, options, rounds, stamp, quick, log
        )

        # 3. latency at half the sustainable rate, and the batch/max-wait trade-off
        sustainable = out["pipeline"]["pipeline_posts_per_s"]
        grid = [(64, 100)] if quick else [(16, 20), (16, 200), (64, 20), (64, 200)]
        latency_rows = []
        for batch_size, wait_ms in grid:
            n_lat = 40 if quick else int(max(60, sustainable * 0.5 * 40))
            settings = bench_settings(
                bootstrap,
                f"latency-{batch_size}-{wait_ms}-{stamp}",
                batch_size=batch_size,
                batch_max_wait_ms=wait_ms,
                model=model_settings,
            )
            row = await latency_at_rate(
                settings, classifier, post_messages(texts[:n_lat]), executor, sustainable * 0.5
            )
            row |= {"batch_size": batch_size, "max_wait_ms": wait_ms}
            latency_rows.append(row)
            log(
                f"latency at {row['rate']:.1f} posts/s, batch {batch_size}, wait {wait_ms} ms: "
                f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms"
            )
        out["latency"] = latency_rows
    return out


def against_raw(piped: dict[str, float], raw_runs: list[float]) -> tuple[float, float, float]:
    """A pipeline run against the raw inference runs on either side of it (the last two of
    ``raw_runs``): the raw rate around it, the model thread's busy share of the run, and the
    pipeline's overhead over that raw rate."""
    raw_around = (raw_runs[-2] + raw_runs[-1]) / 2
    busy_share = piped["model_busy_seconds"] / piped["seconds"]
    return raw_around, busy_share, 1 - piped["posts_per_s"] / raw_around


async def default_engine_overhead(
    bootstrap: str,
    classifier: Classifier,
    posts: list[str],
    executor: ThreadPoolExecutor,
    options: BenchOptions,
    rounds: int,
    stamp: str,
    quick: bool,
    log: Callable[[str], Any],
) -> dict[str, Any]:
    """Pipeline against raw inference for the worker's default engine: full MC, unseeded (members
    at once), batches of 64. The raw engine is built once, outside the timing (an unseeded engine
    measures its token budget and fused layers at start), and the pipeline is given its token
    budget, so both sides run the same passes; the pipeline still measures its fused layers."""
    batch, n_samples = 64, 4 if quick else options.n_samples
    tokens = classifier.tokenize(posts)
    loop = asyncio.get_running_loop()
    config = EngineConfig(n_samples=n_samples, mode="full")
    engine = await loop.run_in_executor(executor, McDropoutEngine, classifier, config)

    def timed_raw() -> float:
        started = time.perf_counter()
        predict_in_batches(engine, tokens, batch)
        return len(tokens) / (time.perf_counter() - started)

    model_settings = {
        "path": options.model,
        "n_samples": n_samples,
        "mc_mode": "full",
        "max_tokens_per_forward": engine.tokens_per_forward,
    }

    def settings_for(tag: str) -> Any:
        return bench_settings(
            bootstrap, f"{tag}-{stamp}", batch_size=batch, batch_max_wait_ms=100,
            model=model_settings,
        )  # fmt: skip

    if not quick:  # one untimed run first, as for the fast engine
        await saturated_throughput(
            settings_for("default-warm"), classifier, post_messages(posts), executor
        )
    raw_runs = [await loop.run_in_executor(executor, timed_raw)]
    overheads: list[float] = []
    rates: list[float] = []
    busy: list[float] = []
    for round_ in range(rounds):
        piped = await saturated_throughput(
            settings_for(f"default{round_}"), classifier, post_messages(posts), executor
        )
        raw_runs.append(await loop.run_in_executor(executor, timed_raw))
        raw_around, busy_share, overhead = against_raw(piped, raw_runs)
        rates.append(piped["posts_per_s"])
        busy.append(busy_share)
        overheads.append(overhead)
        log(
            f"pipeline (default engine: full, unseeded, round {round_ + 1}/{rounds}): "
            f"{piped['posts_per_s']:.2f} posts/s through Kafka vs {raw_around:.2f} raw inference: "
            f"overhead {100 * overheads[-1]:.1f}%, model thread busy {100 * busy[-1]:.1f}%"
        )
    overhead = statistics.median(overheads)
    result: dict[str, Any] = {
        "mc_mode": "full",
        "seeded": False,
        "precision": engine.precision,
        "tokens_per_forward": engine.tokens_per_forward,
        "raw_fused_layers": engine.fused_layers,
        "member_threads": engine.member_threads is not None,
        "posts": len(posts),
        "batch_size": batch,
        "rounds": rounds,
        "raw_inference_runs": raw_runs,
        "pipeline_runs_posts_per_s": rates,
        "overhead": overhead,
        "overhead_runs": overheads,
        "model_busy_share_runs": busy,
    }
    log(f"pipeline overhead, default engine, median of {rounds}: {100 * overhead:.1f}%")
    return result


AGREEMENT_FIGURES = ("label_set_agreement", "review_agreement", "spearman")


def fast_agreement_vs_noise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fast mode's goal as the bench measures it: its agreement with the first full run,
    against a second full run's (the noise of MC Dropout itself), each the mean over its seeds
    (``quality_over_seeds``: one draw of either moves by a point or two on 800 posts). ``gap``:
    how far the fast mode's mean lies below the noise reference's (points, as fractions)."""
    by_name = {row["name"]: row for row in rows}
    fast = by_name.get("fast_bf16") or by_name["fast"]
    noise = by_name["full_vs_full"]
    out: dict[str, Any] = {"fast": fast["name"], "reference": noise["name"]}
    for figure in AGREEMENT_FIGURES:
        fast_mean = fast["quality_over_seeds"][f"{figure}_mean"]
        noise_mean = noise["quality_over_seeds"][f"{figure}_mean"]
        out[figure] = {
            "fast_mean": fast_mean,
            "reference_mean": noise_mean,
            "gap": round(noise_mean - fast_mean, 4),
        }
    return out


def run_bench(options: BenchOptions, log: Callable[[str], Any] = print) -> dict[str, Any]:
    # every step that runs the model runs on one thread, the pipelines' included: a second
    # thread running torch would slow both down (worker/inference/model_thread.py); numpy's
    # OpenBLAS on one thread, as in the worker (worker/inference/blas_threads.py)
    with model_thread() as executor, OneBlasThread():
        return _run_bench(options, log, executor)


def _run_bench(
    options: BenchOptions, log: Callable[[str], Any], executor: ThreadPoolExecutor
) -> dict[str, Any]:
    if options.threads:  # on the model thread, like all model work
        executor.submit(torch.set_num_threads, options.threads).result()
    quick = options.quick
    model = ModelSettings(path=options.model, device="auto")
    classifier = executor.submit(load_classifier, model).result()
    n_fidelity = 48 if quick else options.fidelity_posts
    n_speed = 16 if quick else options.speed_posts
    n_samples = 4 if quick else options.n_samples
    texts, targets = load_posts(options.data, n_fidelity)
    result: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "model": {"name": classifier.name, "revision": classifier.revision},
        "n_samples": n_samples,
        "quick": quick,
    }
    log(f"machine: {result['machine']}")
    # the machine's limit in this run, on the model thread like the methods: before them and
    # after them, the higher of the two (bound.py: steadier_bounds)
    bound_seconds = 0.2 if quick else 2.0
    before = executor.submit(measure_bounds, classifier.device, bound_seconds).result()
    log(f"matmul bound at the model's shapes, GFLOP/s, before the methods: {before}")
    result["methods"] = executor.submit(
        run_inference_bench,
        classifier,
        texts,
        targets,
        n_samples,
        n_speed,
        full_config=EngineConfig(n_samples=n_samples, mode="full"),
        fast_config=EngineConfig(n_samples=n_samples, mode="fast"),
        log=log,
    ).result()
    after = executor.submit(measure_bounds, classifier.device, bound_seconds).result()
    result["gemm_gflops"] = steadier_bounds(before, after)
    result["gemm_gflops_runs"] = {"before": before, "after": after}
    set_bound_fractions(result["methods"], result["gemm_gflops"])
    log(f"matmul bound, after the methods: {after}; used: {result['gemm_gflops']}")
    result["linear_layers"] = executor.submit(
        linear_layers_ceiling,
        getattr(classifier.model, "config", None),
        classifier.device,
        result["gemm_gflops"],
        bound_seconds,
    ).result()
    log(f"the model's linear layers alone (the ceiling of any fusion): {result['linear_layers']}")
    result["fast_agreement_vs_noise"] = fast_agreement_vs_noise(result["methods"])
    log(f"fast mode against the noise of full MC: {result['fast_agreement_vs_noise']}")
    log(markdown_table(result["methods"]))
    default_engine = EngineConfig(n_samples=n_samples, mode="full", precision="auto")
    result["ood_cost"] = executor.submit(
        ood_cost, classifier, texts[: 32 if quick else 256], default_engine, 1 if quick else 3
    ).result()
    log(f"OOD signals: {result['ood_cost']}")
    if options.streaming:
        texts_all, _ = load_posts(options.data, 2000)
        result["streaming"] = asyncio.run(
            streaming_benches(classifier, texts_all, options, log, executor)
        )
    result["memory"] = memory_probe(
        options.model, 64 if quick else 512, 5 if quick else 50, 10 if quick else 60
    )
    log(f"memory: 512 posts x 128 tokens at N = 50: peak RSS {result['memory']['peak_rss_mb']} MB")
    steady = steady_memory_probe(options.model, options.data, 8 if quick else 120, n_samples)
    result["memory"]["steady"] = steady
    for label in ("bounded", "library_default"):
        log(
            f"memory, default engine on the posts in batches of {steady['batch']}, oneDNN caches "
            f"{steady[label]['cache_capacity']}: RSS {steady[label]['rss_mb_every_sixth']} MB "
            f"every {steady['seconds'] / 6:.0f} s, peak {steady[label]['peak_rss_mb']} MB"
        )
    result["gpu"] = (
        "the method table above ran on the GPU; `make bench-gpu` adds the token-budget and "
        "batch sweep, torch.compile and GPU memory"
        if classifier.device.type == "cuda"
        else "no GPU on this machine: not measured (`make bench-gpu` on a machine with one)"
    )
    write_results(result, options.output)
    return result
