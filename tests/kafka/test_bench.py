"""``emoworker bench --quick`` (inference part): the result file has the shape the README and
tooling read, with every method measured and the agreement fields against the first full run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.texts import EXAMPLE_TEXTS

from worker.bench.run import BenchOptions, run_bench
from worker.inference.engine import CPU_TOKENS_PER_FORWARD
from worker.inference.precision import native_bf16
from worker.inference.token_budget import CANDIDATES, SEEDED_CPU_BUDGET

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
    loops = ["emcoder_card", "emcoder_sorted", "emcoder_loop_unsorted", "sorted_loop"]
    expected = [*loops, "full", "full_vs_full", "fast", "fast_int8"]
    if native_bf16(torch.device("cpu")):
        expected += ["full_bf16", "full_bf16_same_seed", "fast_bf16", "full_bf16_plain_layers"]
        expected += ["full_bf16_member_threads", "fast_bf16_member_threads"]
    assert names == [*expected, "deterministic"]
    fields = {
        "posts_per_s", "ratio_to_loop", "label_set_agreement", "review_agreement", "spearman",
        "macro_f1", "aurc", "peak_rss_mb", "precision", "useful_gflops", "bound_fraction",
    }  # fmt: skip
    bounds = written["gemm_gflops"]
    assert bounds["fp32"] > 0 and ("bf16" in bounds) == native_bf16(torch.device("cpu"))
    runs = written["gemm_gflops_runs"]  # measured before and after the methods: the higher
    assert bounds == {p: max(runs["before"][p], runs["after"][p]) for p in runs["before"]}
    ceiling = written["linear_layers"]  # the model's linear layers alone, per precision
    assert set(ceiling) == set(bounds)
    for precision, linear in ceiling.items():
        assert linear["rows"] == 4096 and linear["gflops"] > 0
        assert linear["bound_fraction"] == pytest.approx(linear["gflops"] / bounds[precision], 0.01)
    for method in written["methods"]:
        assert fields <= method.keys(), method["name"]
        assert method["posts_per_s"] > 0 and method["useful_gflops"] > 0
        bound = bounds.get(method["precision"])
        if bound is None:  # int8: no bound measured
            assert method["bound_fraction"] is None
        else:
            assert method["bound_fraction"] == pytest.approx(method["useful_gflops"] / bound, 0.01)
    cost = written["ood_cost"]  # the signals' price, per post and on the default engine
    assert cost["posts"] == 32 and cost["per_post_us"]["language_us"] > 0
    assert len(cost["posts_per_s_with"]) == len(cost["posts_per_s_without"]) == 1
    by_name = {m["name"]: m for m in written["methods"]}
    # ratios are to the faster of the card's two arrangements
    card = max(by_name["emcoder_card"]["posts_per_s"], by_name["emcoder_sorted"]["posts_per_s"])
    for method in written["methods"]:
        expected_ratio = method["posts_per_s"] / card
        assert method["ratio_to_loop"] == pytest.approx(expected_ratio, abs=0.002)
    assert max(by_name[n]["ratio_to_loop"] for n in ("emcoder_card", "emcoder_sorted")) == 1.0
    assert by_name["full"]["precision"] == "fp32" and by_name["fast_int8"]["precision"] == "int8"
    full = by_name["full"]  # the reference agrees with itself exactly
    assert full["label_set_agreement"] == full["review_agreement"] == 1.0
    assert full["mean_abs_difference"] == 0.0
    assert by_name["deterministic"]["mean_samples"] == 1.0
    # the engine rows ran at the budget an unseeded engine measures (token_budget.py)
    assert by_name["full"]["tokens_per_forward"] in CANDIDATES
    assert by_name["emcoder_card"]["tokens_per_forward"] is None
    # each row records what its engine ran at: one pass alone never measures (a fixed budget),
    # and the same-seed row keeps the fp32 reference's arrangement
    assert by_name["deterministic"]["tokens_per_forward"] == SEEDED_CPU_BUDGET
    if "full_bf16_same_seed" in by_name:
        assert by_name["full_bf16_same_seed"]["tokens_per_forward"] == full["tokens_per_forward"]
        # the fused encoder layers: where the engine measured them faster, and never in the row
        # that times the model's own layers
        assert isinstance(by_name["full_bf16"]["fused_layers"], bool)
        assert by_name["full_bf16_plain_layers"]["fused_layers"] is False
        plain = by_name["full_bf16_plain_layers"]["tokens_per_forward"]
        assert plain == by_name["full_bf16"]["tokens_per_forward"]
        # members at once only unseeded, on the same budget as the seeded row
        assert by_name["full_bf16"]["member_threads"] is False
        members = by_name["full_bf16_member_threads"]
        assert isinstance(members["member_threads"], bool)
        assert members["tokens_per_forward"] == by_name["full_bf16"]["tokens_per_forward"]
    # full and fast MC in the default precision and the noise reference: quality over their
    # seed and two more
    seeded = ("full_bf16", "fast_bf16") if "full_bf16" in by_name else ("fast",)
    seeded = ("full_vs_full", *seeded)
    for name in seeded:
        over = by_name[name]["quality_over_seeds"]
        assert len(over["seeds"]) == len(set(over["seeds"])) == 3
        for figure in ("macro_f1", "aurc", "label_set_agreement"):
            assert over[figure][0] == pytest.approx(by_name[name][figure], abs=1e-4)
            assert over[f"{figure}_mean"] == pytest.approx(np.mean(over[figure]), abs=1e-4)
    assert "quality_over_seeds" not in by_name["full"]
    # the fast mode's goal: its mean agreement against the noise reference's mean
    goal = written["fast_agreement_vs_noise"]
    assert goal["fast"] == seeded[-1] and goal["reference"] == "full_vs_full"
    for figure in ("label_set_agreement", "review_agreement", "spearman"):
        fast_mean = by_name[seeded[-1]]["quality_over_seeds"][f"{figure}_mean"]
        noise_mean = by_name["full_vs_full"]["quality_over_seeds"][f"{figure}_mean"]
        assert goal[figure]["gap"] == pytest.approx(noise_mean - fast_mean, abs=1e-4)
    assert 1.0 <= by_name["fast"]["mean_samples"] <= 4.0
    assert written["memory"]["peak_rss_mb"] > 0
    steady = written["memory"]["steady"]  # the default engine batch after batch, in a child
    assert steady["bounded"]["cache_capacity"] == 64
    assert steady["library_default"]["cache_capacity"] == 1024
    for probe in (steady["bounded"], steady["library_default"]):
        assert probe["rss_mb_every_sixth"] and probe["peak_rss_mb"] >= max(
            probe["rss_mb_every_sixth"]
        )


@pytest.mark.kafka
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
    broker_pid = kafka.broker.pid if kafka.broker is not None else None  # a JVM of this machine
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
            broker_pid=broker_pid,
        )
    )
    assert result["posts"] == 300
    assert result["seconds"] > 0 and result["posts_per_s"] == pytest.approx(300 / result["seconds"])
    # every batch's time on the model thread, summed: some, and within the timed run (its
    # start is seen by polling every 10 ms)
    assert 0 < result["model_busy_seconds"] < result["seconds"] + 0.05
    # where the CPU went: each of the three processes used some, per post, and the shares add
    # up to the cores they kept busy
    cpu = result["cpu_us_per_post"]
    assert cpu["worker"] > 0 and cpu["reader"] > 0
    assert (cpu["broker"] is None) == (broker_pid is None)
    assert cpu["broker"] is None or cpu["broker"] > 0
    total = sum(v for v in cpu.values() if v is not None)
    assert result["cores_busy"] == pytest.approx(total * 300 / 1e6 / result["seconds"])
    assert result["cpu_bound_posts_per_s"] == pytest.approx(result["cores"] * 1e6 / total)
    assert result["worker_alone_posts_per_s"] == pytest.approx(1e6 / cpu["worker"])


@pytest.mark.kafka
def test_default_engine_overhead_runs_both_sides_on_the_same_passes(
    kafka: Any, test_model_dir: Path, tmp_path: Path
) -> None:
    """The overhead of the worker's default engine (full MC, unseeded): the pipeline is given
    the raw engine's token budget, and each round's overhead is 1 - pipeline / the mean of the
    raw runs on either side of it."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    from worker.bench.run import default_engine_overhead
    from worker.inference.loading import load_classifier
    from worker.settings import ModelSettings

    classifier = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    options = BenchOptions(model=str(test_model_dir), data=tmp_path / "unused.tsv", quick=True)
    lines: list[str] = []
    with ThreadPoolExecutor(1) as executor:
        result = asyncio.run(
            default_engine_overhead(
                kafka.bootstrap_servers,
                classifier,
                list(EXAMPLE_TEXTS) * 4,
                executor,
                options,
                2,
                str(time.time_ns()),
                True,
                lines.append,
            )
        )
    assert result["mc_mode"] == "full" and result["seeded"] is False
    assert result["posts"] == 4 * len(EXAMPLE_TEXTS) and result["rounds"] == 2
    assert result["tokens_per_forward"] in CANDIDATES  # measured by the unseeded raw engine
    raw, piped = result["raw_inference_runs"], result["pipeline_runs_posts_per_s"]
    assert len(raw) == 3 and len(piped) == 2 and min(raw + piped) > 0
    expected = [1 - p / ((raw[i] + raw[i + 1]) / 2) for i, p in enumerate(piped)]
    assert result["overhead_runs"] == pytest.approx(expected)
    assert result["overhead"] == pytest.approx(float(np.median(expected)))
    # busy seconds against a run timed from a 10 ms poll of readiness: a little slack above 1
    assert all(0 < share < 1.1 for share in result["model_busy_share_runs"])
    assert len(lines) == 3 and "median of 2" in lines[-1]


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


def test_gpu_bench_runs_its_parts_on_the_cpu_in_quick_mode(
    test_model_dir: Path, tmp_path: Path
) -> None:
    """``python -m worker.bench.gpu --quick --device cpu``: the method table sized by the
    device profile (engine methods timed on the posts repeated), the budget and batch sweep, the
    memory probe; each part written as it ends; the CPU's latest.json never replaced."""
    from worker.bench.gpu import run_gpu_bench

    data = tmp_path / "posts.tsv"
    lines = [f"{EXAMPLE_TEXTS[i % len(EXAMPLE_TEXTS)]}\t{i % 28}\tid{i}" for i in range(40)]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results"
    result = run_gpu_bench(data, out, str(test_model_dir), "cpu", quick=True, log=lambda _: None)

    files = list(out.glob("*-quick.json"))
    assert len(files) == 1 and not (out / "latest.json").exists()
    written = json.loads(files[0].read_text())
    assert written["posts"] == 40 and written["n_samples"] == 4
    by_name = {m["name"]: m for m in written["methods"]}
    assert by_name["full"]["posts_timed"] == 80  # 40 posts, twice (quick profile)
    assert by_name["full"]["posts_compared"] == 40
    assert by_name["emcoder_card"]["posts_timed"] == 16
    assert set(written["gemm_gflops"]) >= {"fp32"}
    assert set(written["linear_layers"]) == set(written["gemm_gflops"])
    assert by_name["full"]["label_set_agreement"] == 1.0
    sweep = written["sweep"]
    assert [(r["tokens_per_forward"], r["batch"]) for r in sweep[:2]] == [(256, 32), (1024, 32)]
    best = max(sweep[:2], key=lambda r: r["posts_per_s"])["tokens_per_forward"]
    assert [(r["tokens_per_forward"], r["batch"]) for r in sweep[2:]] == [(best, 16)]
    assert all(r["posts"] == 80 and r["mean_samples"] == 4.0 for r in sweep)
    assert written["memory"]["posts"] == 8
    assert written["memory"]["tokens_per_forward"] == CPU_TOKENS_PER_FORWARD
    assert "compiled" not in written  # GPU only
    assert result["sweep"] == sweep


def test_useful_flops_count_projections_and_attention() -> None:
    """Per token and layer 2 (4 h^2 + 2 h i) + 4 L h: h = 4, i = 8, 2 layers, posts of 3 and 1
    tokens: (2 * (64 + 64) * 3 + 4 * 9 * 4) + (2 * (64 + 64) + 4 * 4) = 912 + 272, twice."""
    from types import SimpleNamespace

    from worker.bench.bound import useful_flops_per_sample

    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2)
    classifier = SimpleNamespace(model=SimpleNamespace(config=config))
    assert useful_flops_per_sample(classifier, [3, 1]) == 2 * (912 + 272)  # type: ignore[arg-type]


def test_gpu_bench_without_a_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from worker.bench.gpu import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
