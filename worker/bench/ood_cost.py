"""What the out-of-distribution signals cost: each signal's time per post, and the default
engine's throughput with and without them (the density features ride on the MC passes; the
other signals run after them, on the model thread), in interleaved runs on the same posts."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from worker.bench.inference import engine_run
from worker.inference.engine import EngineConfig
from worker.inference.loading import Classifier
from worker.ood.calibration import builtin_calibration
from worker.ood.scorer import OodScorer


def ood_cost(
    classifier: Classifier, texts: list[str], config: EngineConfig, pairs: int = 3
) -> dict[str, Any]:
    tokens = classifier.tokenize(texts)
    scorer = OodScorer(
        classifier.ood or builtin_calibration(), classifier.tokenizer, classifier.max_length
    )
    with_features = replace(config, feature_layer=scorer.feature_layer)
    summary = engine_run(classifier, tokens, with_features)  # warm, and the features
    per_post: dict[str, float] = {}
    langs: list[str | None] = [None] * len(texts)
    started = time.perf_counter()
    if scorer.language is not None:
        scorer.language.score(texts, langs)
    per_post["language_us"] = (time.perf_counter() - started) / len(texts) * 1e6
    if scorer.tokens is not None:
        started = time.perf_counter()
        scorer.tokens.score(texts, tokens)
        per_post["tokens_us"] = (time.perf_counter() - started) / len(texts) * 1e6
    density = scorer.calibration.density
    if density is not None and summary.features is not None:
        started = time.perf_counter()
        density.distance(summary.features)
        per_post["density_us"] = (time.perf_counter() - started) / len(texts) * 1e6
    without, withs = [], []
    for _ in range(pairs):  # interleaved: the machine's drift hits both alike
        started = time.perf_counter()
        engine_run(classifier, tokens, config)
        without.append(len(texts) / (time.perf_counter() - started))
        started = time.perf_counter()
        result = engine_run(classifier, tokens, with_features)
        scorer.score(texts, langs, tokens, result.features)
        withs.append(len(texts) / (time.perf_counter() - started))
    return {
        "posts": len(texts),
        "per_post_us": {k: round(v, 1) for k, v in per_post.items()},
        "posts_per_s_without": [round(x, 2) for x in without],
        "posts_per_s_with": [round(x, 2) for x in withs],
        "ratio_with_to_without": round(float(np.median(np.array(withs) / np.array(without))), 3),
    }
