"""Inference benchmark: MC Dropout arrangements side by side, on the same posts, in one run.

Methods (all at the same N):

* ``emcoder_card`` — the EmCoder card's own usage: one post at a time, its N samples in forwards
  of 10 rows (the post repeated, no padding);
* ``emcoder_sorted`` — the card's ``mc_forward`` over length-sorted batches of 32: each batch
  (padded to its longest) repeated N times, run in sub-batches of 10 rows;
* ``emcoder_loop_unsorted`` — the same over batches of 32 in input order (padded to the longest
  of 32 random posts: the arrangement earlier runs called the baseline, kept for comparison);
  the ratios (``ratio_to_loop``) are taken against the faster of the first two, measured in
  the same run: the strongest reasonable use of the card;
* ``sorted_loop`` — the same N passes over length-sorted batches, one sample per pass;
* ``full`` — the engine's full MC Dropout (every dropout layer stochastic, exact semantics);
* ``full_vs_full`` — ``full`` again with another seed: the noise reference for agreement;
* ``fast`` — the engine's fast mode;
* ``full_bf16``, ``fast_bf16`` — the same two modes with bfloat16 matmuls (autocast), another
  seed; rows only where the hardware has native bfloat16 (``auto`` picks it there);
* ``full_bf16_same_seed`` — bfloat16 with the first ``full`` run's seed and token budget (the
  same dropout masks): its agreement with that run is the effect of the precision alone (and,
  where the budgets differ, its speed against ``full_bf16`` the effect of the budget);
* ``full_bf16_plain_layers`` — ``full_bf16`` (its seed and budget) on the model's own encoder
  layers instead of the fused ones (``fused_layers.py``): their speed-up, in the same run;
* ``full_bf16_member_threads``, ``fast_bf16_member_threads`` — ``full_bf16`` and ``fast_bf16``
  (their budget and layers) unseeded, as the worker runs them: an ensemble's members sampled at
  once on threads of their own (``member_threads.py``; a seeded engine samples them in turn), a
  new draw each run;
* ``deterministic`` — one eval-mode pass (no uncertainty), for scale.

Full and fast MC in the default precision and ``full_vs_full`` (the noise reference) also carry
``quality_over_seeds``: their quality and agreement figures over their own seed and two more
(untimed runs), with the means.

The loops, ``full``, ``full_vs_full``, ``fast`` and ``deterministic`` run in float32.

Agreement is measured against the first ``full`` run: identical predicted label sets, identical
review flags (top share by the review score), Spearman correlation of mutual information. Each
method's thresholds are calibrated for it (cross-fitted: tuned on one half of the posts, applied
to the other), so macro-F1 and AURC are honest per method.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from worker.bench.bound import set_bound_fractions, useful_gflop
from worker.inference.dropout import set_mc_dropout
from worker.inference.engine import EngineConfig, McDropoutEngine, pad
from worker.inference.loading import Classifier
from worker.inference.precision import Precision, native_bf16
from worker.inference.uncertainty import McAccumulator, McSummary
from worker.routing.policy import review_scores
from worker.training.evaluation import concat_summaries
from worker.training.metrics import binarize, macro_f1, tune_thresholds
from worker.training.report import per_post_f1, predicted_sets, risk_coverage, top_label_wrong


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emcoder_loop(
    classifier: Classifier,
    token_ids: list[list[int]],
    n_samples: int,
    batch_size: int = 32,
    max_batch_size: int = 10,
    seed: int = 0,
    sort: bool = False,
) -> McSummary:
    """The EmCoder card's ``mc_forward``: repeat each padded batch N times, run 10 rows at a
    time; batches of ``batch_size`` posts in input order, or in length order with ``sort``
    (``batch_size=1``: one post at a time, the card's own usage)."""
    order = list(range(len(token_ids)))
    if sort:
        order.sort(key=lambda i: len(token_ids[i]))
    torch.manual_seed(seed)
    model = classifier.model
    acc = McAccumulator(
        len(token_ids), len(classifier.label_names), torch.as_tensor(classifier.thresholds)
    )
    set_mc_dropout(model, True)
    try:
        with torch.inference_mode():
            for start in range(0, len(token_ids), batch_size):
                rows = order[start : start + batch_size]
                ids, mask = pad([token_ids[i] for i in rows], classifier.pad_id, classifier.device)
                ids, mask = ids.repeat(n_samples, 1), mask.repeat(n_samples, 1)
                index = torch.as_tensor(rows).repeat(n_samples)
                for s in range(0, len(ids), max_batch_size):
                    probs = classifier.probabilities(
                        ids[s : s + max_batch_size], mask[s : s + max_batch_size]
                    )
                    acc.add(index[s : s + max_batch_size], probs)
    finally:
        model.eval()
    return acc.summary()


@dataclass
class MethodRun:
    name: str
    summary: McSummary
    seconds: float
    posts: int
    peak_rss_mb: float
    lengths: list[int]  # the timed posts' tokens (useful work: ``bound.py``)

    @property
    def posts_per_s(self) -> float:
        return self.posts / self.seconds


def timed(name: str, tokens: list[list[int]], fn: Callable[[], McSummary]) -> MethodRun:
    started = time.perf_counter()
    summary = fn()
    seconds = time.perf_counter() - started
    return MethodRun(name, summary, seconds, len(tokens), peak_rss_mb(), [len(t) for t in tokens])


def method_precision(name: str) -> str:
    """The precision a method's matmuls run in (the bound it is measured against)."""
    for precision in ("bf16", "fp16", "int8"):
        if precision in name:
            return precision
    return "fp32"


BASELINES = ("emcoder_card", "emcoder_sorted")  # ratios are to the faster of these


def engine_run(
    classifier: Classifier, token_ids: list[list[int]], config: EngineConfig, batch: int = 256
) -> McSummary:
    return predict_in_batches(McDropoutEngine(classifier, config), token_ids, batch)


def predict_in_batches(
    engine: McDropoutEngine, token_ids: list[list[int]], batch: int
) -> McSummary:
    parts = []
    for start in range(0, len(token_ids), batch):
        parts.append(engine.predict(token_ids[start : start + batch]))
    return concat_summaries(parts)


def cross_fitted_predictions(targets: np.ndarray, probs: np.ndarray, seed: int = 0) -> np.ndarray:
    """Predicted sets with thresholds tuned on the other half of the posts."""
    order = np.random.default_rng(seed).permutation(len(targets))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    predictions = np.zeros_like(targets, dtype=np.int8)
    for tune, apply in (halves, halves[::-1]):
        thresholds = tune_thresholds(targets[tune], probs[tune])
        predictions[apply] = predicted_sets(probs[apply], thresholds)
    return predictions


def fidelity(
    run: McSummary,
    reference: McSummary,
    thresholds: np.ndarray,
    targets: np.ndarray,
    review_rate: float = 0.10,
    score: str = "expected_risk",  # the product's default review score
) -> dict[str, float]:
    """Agreement of ``run`` with ``reference`` on the same posts, plus honest quality figures."""
    n = len(reference.mean)
    run = _head(run, n)
    same_sets = np.all(
        predicted_sets(run.mean, thresholds) == predicted_sets(reference.mean, thresholds), axis=1
    )
    k = max(1, round(review_rate * n))

    def flags(summary: McSummary) -> np.ndarray:
        s = review_scores(score, summary, thresholds)
        flag = np.zeros(n, dtype=bool)
        flag[np.argsort(-s, kind="stable")[:k]] = True
        return flag

    constant = np.ptp(run.mutual_information) == 0 or np.ptp(reference.mutual_information) == 0
    # one deterministic pass has no mutual information to rank: no correlation (and no warning)
    rho = (
        float("nan")
        if constant
        else spearmanr(run.mutual_information, reference.mutual_information).statistic
    )
    predictions = cross_fitted_predictions(targets[:n], run.mean)
    post_f1 = per_post_f1(targets[:n], predictions)
    wrong = top_label_wrong(targets[:n], run.mean)
    aurc = risk_coverage(score, review_scores(score, run, thresholds), post_f1, wrong).aurc
    return {
        "label_set_agreement": float(same_sets.mean()),
        "review_agreement": float((flags(run) == flags(reference)).mean()),
        "spearman": float(rho) if np.isfinite(rho) else float("nan"),
        "macro_f1": macro_f1(targets[:n], predictions),
        "macro_f1_at_model_thresholds": macro_f1(targets[:n], binarize(run.mean, thresholds)),
        "aurc": aurc,
        "mean_samples": float(run.n_samples.mean()),
        "mean_abs_difference": float(np.abs(run.mean - reference.mean).mean()),
    }


def _head(summary: McSummary, n: int) -> McSummary:
    return summary.head(n)


@dataclass
class DeviceProfile:
    """How the engine methods are sized and timed on a device.

    On the CPU (the defaults) the engine methods are timed on the fidelity posts themselves, in
    batches of 256. A GPU does those in a fraction of a second: it is timed on them repeated
    (``timing_repeat`` times), in larger batches; agreement is still measured on the first copy.
    Every timed arrangement first runs untimed on ``warmup_posts`` posts (libraries' handles
    made, kernels compiled, allocator filled), as a long-running worker has long done: in ten
    earlier CPU runs without it, the first timed ``full`` run was the slower of the two
    identical ``full`` runs eight times (by 5 % on average).
    """

    engine_batch: int = 256
    timing_repeat: int = 1
    warmup_posts: int = 16
    tokens_per_forward: int = 0  # 0: the engine's default for the device

    @classmethod
    def for_device(cls, device: torch.device) -> DeviceProfile:
        if device.type == "cuda":
            return cls(engine_batch=4096, timing_repeat=4, warmup_posts=4096)
        return cls()


def run_inference_bench(
    classifier: Classifier,
    texts: list[str],
    targets: np.ndarray,
    n_samples: int,
    speed_posts: int,
    full_config: EngineConfig,
    fast_config: EngineConfig,
    log: Callable[[str], Any] = print,
    profile: DeviceProfile | None = None,
    bounds: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Time the loops on the first ``speed_posts`` texts and the engine's methods on all
    ``texts`` (repeated, on a GPU: ``DeviceProfile``); fidelity on all ``texts``. ``bounds``:
    matmul GFLOP/s per precision (``bound.py``), for each method's share of it."""
    device = classifier.device
    profile = profile or DeviceProfile.for_device(device)
    tokens = classifier.tokenize(texts)
    timed_tokens = tokens * profile.timing_repeat
    speed_tokens = tokens[:speed_posts]
    thresholds = np.asarray(classifier.thresholds)
    log(
        f"{len(texts)} posts, {np.mean([len(t) for t in speed_tokens]):.1f} tokens on average "
        f"in the first {speed_posts}; N = {n_samples}; engine methods timed on "
        f"{len(timed_tokens)} posts in batches of {profile.engine_batch}"
    )
    full_config = _with(full_config, max_tokens_per_forward=profile.tokens_per_forward)
    fast_config = _with(fast_config, max_tokens_per_forward=profile.tokens_per_forward)

    budgets: dict[str, int] = {}  # per precision: the engine's tokens per pass, set below
    fused: dict[str, bool] = {}  # per precision: whether the engine kept the fused layers

    def full(seed: int, precision: Precision = "fp32", budget_of: str = "") -> EngineConfig:
        return _with(
            full_config,
            seed=seed,
            n_samples=n_samples,
            precision=precision,
            max_tokens_per_forward=budgets[budget_of or precision],
            fused_layers=fused.get(precision, True),
        )

    warm_tokens = tokens[: profile.warmup_posts]
    if warm_tokens:  # the loop before any engine exists (an engine installs its fast dropout)
        emcoder_loop(classifier, warm_tokens[:32], n_samples, seed=0)

    runs: list[MethodRun] = []
    loops: list[tuple[str, dict[str, Any]]] = [
        ("emcoder_card", {"batch_size": 1}),
        ("emcoder_sorted", {"sort": True}),
        ("emcoder_loop_unsorted", {}),
    ]
    for name, arrangement in loops:
        runs.append(
            timed(
                name,
                speed_tokens,
                lambda a=arrangement: emcoder_loop(  # type: ignore[misc]
                    classifier, speed_tokens, n_samples, seed=1, **a
                ),
            )
        )
        log(f"  {name:<22}{runs[-1].posts_per_s:6.2f} posts/s")
    # the precisions and variants the table times (rows below), each run once untimed first
    precisions: list[Precision] = ["fp32"]
    if native_bf16(device):
        precisions.append("bf16")
    if device.type == "cuda":  # float16 matmuls are native on GPUs only
        precisions.append("fp16")
    with_int8 = device.type == "cpu"  # int8 layers are a CPU path
    # the seeded runs below take the budget an unseeded (production) engine measures at start
    for precision in precisions:
        budgets[precision] = profile.tokens_per_forward
        if not budgets[precision]:
            engine = McDropoutEngine(classifier, EngineConfig(n_samples, precision=precision))
            budgets[precision] = engine.tokens_per_forward
            fused[precision] = engine.fused_layers
            if engine.budget_choice is not None:
                rates = {k: round(v) for k, v in engine.budget_choice.tokens_per_s.items()}
                log(f"  token budget measured ({precision}), tokens/s by budget: {rates}")
            if engine.layer_rates is not None:
                layers = {
                    ("fused" if k else "plain"): round(v) for k, v in engine.layer_rates.items()
                }
                log(f"  encoder layers measured ({precision}), tokens/s: {layers}")
    log(f"  tokens per forward pass, by precision: {budgets}; fused layers: {fused}")
    fast_config = _with(fast_config, max_tokens_per_forward=budgets["fp32"])
    warm_configs = [
        _with(
            config,
            n_samples=n_samples,
            precision=precision,
            max_tokens_per_forward=budgets[precision],
            fused_layers=fused.get(precision, True),
        )
        for precision in precisions
        for config in (full_config, fast_config)
    ]
    if with_int8:
        warm_configs.append(_with(fast_config, n_samples=n_samples, precision="fp32", int8=True))
    for config in warm_configs if warm_tokens else []:
        engine_run(classifier, warm_tokens, config, profile.engine_batch)
    sorted_loop = EngineConfig(
        n_samples=n_samples,
        seed=1,
        samples_per_forward=1,
        max_tokens_per_forward=32 * 64,
        precision="fp32",
    )
    runs.append(
        timed(
            "sorted_loop", speed_tokens, lambda: engine_run(classifier, speed_tokens, sorted_loop)
        )
    )
    log(f"  sorted_loop         {runs[-1].posts_per_s:7.2f} posts/s")
    # per engine row: the tokens per pass its engine ran with
    ran_at: dict[str, int] = {"sorted_loop": sorted_loop.max_tokens_per_forward}
    ran_fused: dict[str, bool] = {}  # per engine row: whether it ran the fused layers
    ran_members: dict[str, bool] = {}  # per engine row: whether its members ran at once
    configs: dict[str, EngineConfig] = {}  # per engine row: its engine's configuration

    def engine_method(name: str, config: EngineConfig) -> None:
        engines: list[McDropoutEngine] = []
        configs[name] = config

        def run() -> McSummary:  # the engine's set-up is timed too, as in engine_run
            engines.append(McDropoutEngine(classifier, config))
            return predict_in_batches(engines[0], timed_tokens, profile.engine_batch)

        runs.append(timed(name, timed_tokens, run))
        ran_at[name] = engines[0].tokens_per_forward
        ran_fused[name] = engines[0].fused_layers
        ran_members[name] = engines[0].member_threads is not None
        log(f"  {name:<20}{runs[-1].posts_per_s:8.2f} posts/s")

    engine_method("full", full(11))
    engine_method("full_vs_full", full(22))
    fast = _with(fast_config, seed=33, n_samples=n_samples, precision="fp32")
    engine_method("fast", fast)
    if with_int8:
        engine_method("fast_int8", _with(fast, int8=True))
    if "bf16" in precisions:
        engine_method("full_bf16", full(44, "bf16"))
        # the seed of the reference run: the same dropout masks, so only the precision differs
        # the same masks need the same arrangement: the reference's budget
        engine_method("full_bf16_same_seed", full(11, "bf16", budget_of="fp32"))
        engine_method(
            "fast_bf16",
            _with(
                fast,
                seed=55,
                precision="bf16",
                max_tokens_per_forward=budgets["bf16"],
                fused_layers=fused.get("bf16", True),
            ),
        )
        engine_method("full_bf16_plain_layers", _with(full(44, "bf16"), fused_layers=False))
        # unseeded, as the worker runs: an ensemble's members sampled at once (member_threads.py)
        engine_method("full_bf16_member_threads", _with(full(44, "bf16"), seed=None))
        engine_method(
            "fast_bf16_member_threads",
            _with(
                fast,
                seed=None,
                precision="bf16",
                max_tokens_per_forward=budgets["bf16"],
                fused_layers=fused.get("bf16", True),
            ),
        )
    if "fp16" in precisions:
        engine_method("full_fp16", full(66, "fp16"))
        engine_method(
            "fast_fp16",
            _with(fast, seed=77, precision="fp16", max_tokens_per_forward=budgets["fp16"]),
        )
    engine_method("deterministic", EngineConfig(n_samples=1, mode="off", precision="fp32"))

    reference = next(run.summary for run in runs if run.name == "full")
    # the rows whose quality is also measured over more seeds: full and fast MC in the default
    # precision (bfloat16 where native), and the noise reference full_vs_full (its agreement with
    # the first run is one draw too: the fast mode's goal compares means, not two draws)
    seeded_rows = ("full_bf16", "fast_bf16") if "bf16" in precisions else ("fast",)
    seeded_rows = ("full_vs_full", *seeded_rows)
    loop_rate = max(run.posts_per_s for run in runs if run.name in BASELINES)
    model_config = classifier.model.config
    rows = []
    for run in runs:
        run_precision = method_precision(run.name)
        samples = run.summary.n_samples[: run.posts].astype(float).tolist()
        work = useful_gflop(model_config, run.lengths, samples) / run.seconds
        row: dict[str, Any] = {
            "name": run.name,
            "posts_per_s": round(run.posts_per_s, 3),
            "ratio_to_loop": round(run.posts_per_s / loop_rate, 3),
            "precision": run_precision,
            "useful_gflops": round(work, 1),
            "bound_fraction": None,  # set_bound_fractions, below
            "tokens_per_forward": ran_at.get(run.name),  # None for the card's loops
            "fused_layers": ran_fused.get(run.name),  # None for the card's loops
            "member_threads": ran_members.get(run.name),
            "peak_rss_mb": round(run.peak_rss_mb, 1),
            "posts_timed": run.posts,
        }
        agreement_n = min(len(run.summary.mean), len(reference.mean), len(tokens))
        row.update(
            fidelity(
                _head(run.summary, agreement_n),
                _head(reference, agreement_n),
                thresholds,
                targets[:agreement_n],
            )
        )
        row["posts_compared"] = agreement_n
        if run.name in seeded_rows:  # quality over more seeds: one seed's figures move by 0.02
            row["quality_over_seeds"] = quality_over_seeds(
                classifier,
                tokens[:agreement_n],
                configs[run.name],
                row,
                _head(reference, agreement_n),
                thresholds,
                targets[:agreement_n],
                profile.engine_batch,
            )
            log(f"  {run.name} over seeds {row['quality_over_seeds']}")
        rows.append(row)
    set_bound_fractions(rows, bounds or {})
    return rows


QUALITY_FIGURES = ("macro_f1", "aurc", "label_set_agreement", "review_agreement", "spearman")


def quality_over_seeds(
    classifier: Classifier,
    tokens: list[list[int]],
    config: EngineConfig,
    first: dict[str, Any],
    reference: McSummary,
    thresholds: np.ndarray,
    targets: np.ndarray,
    batch: int,
    extra_seeds: int = 2,
) -> dict[str, Any]:
    """A row's quality and agreement figures over its own seed and ``extra_seeds`` more (untimed
    runs of the same engine), each figure's list and mean: whether the fast mode's macro-F1 and
    AURC are worse than full MC's is a question about their means, not about one seed."""
    seeds = [config.seed]
    figures = [first]
    for k in range(1, extra_seeds + 1):
        seed = (config.seed or 0) + 1000 * k
        engine = McDropoutEngine(classifier, _with(config, seed=seed))
        summary = predict_in_batches(engine, tokens, batch)
        figures.append(fidelity(summary, reference, thresholds, targets))
        seeds.append(seed)
    out: dict[str, Any] = {"seeds": seeds}
    for name in QUALITY_FIGURES:
        values = [float(f[name]) for f in figures]
        out[name] = [round(v, 4) for v in values]
        out[f"{name}_mean"] = round(float(np.mean(values)), 4)
    return out


def _with(config: EngineConfig, **changes: Any) -> EngineConfig:
    from dataclasses import replace

    return replace(config, **changes)
