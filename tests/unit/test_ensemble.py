"""Ensemble bundles: combining keeps every member, the members' samples pool into one post's
statistics (checked against a hand computation), and N is split evenly over the members."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from support.model_fixtures import tiny_dataset

from worker.bundle import BundleManifest
from worker.inference.engine import EngineConfig, McDropoutEngine
from worker.inference.loading import Classifier, load_classifier
from worker.settings import ModelSettings
from worker.training.ensemble import combine_bundles
from worker.training.export import WeightsKind
from worker.training.run import run_training
from worker.training.train import TrainConfig, default_base_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["thank you so much!", "this is awful and I hate it", "ok", "what happened here?"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("ensemble")
    data = tiny_dataset(root / "data")
    members = []
    for seed, (rank, kind) in enumerate([(4, "lora"), (0, "delta")]):
        config = TrainConfig(
            base_model=default_base_model(),
            lora_rank=rank,
            learning_rate=5e-4 if rank else 1e-4,
            max_steps=3,
            batch_size=8,
            seed=seed,
        )
        folder = root / f"member-{seed}"
        weights: WeightsKind = kind  # type: ignore[assignment]
        run_training(data, folder, config, weights, n_samples=2, log=lambda _: None)
        members.append(folder)
    output = root / "ensemble"
    combine_bundles(members, output, data, n_samples=4, log=lambda _: None)
    return output, members


def test_combining_keeps_every_member_and_the_bundle_round_trips(
    ensemble: tuple[Path, list[Path]],
) -> None:
    output, members = ensemble
    manifest = BundleManifest.read(output)
    assert manifest.weights == "ensemble" and manifest.format_version == 2
    assert [(m.path, m.weights) for m in manifest.members] == [
        ("member-1", "lora"),
        ("member-2", "delta"),
    ]
    assert (output / "member-1" / "adapter_model.safetensors").is_file()
    assert (output / "member-2" / "delta.safetensors").is_file()
    assert (output / "thresholds.json").is_file() and (output / "ood.json").is_file()
    assert (output / "calibration.json").is_file()
    routing = BundleManifest.read(output).metrics["routing"]
    # the learned score ships only when its cross-fitted figures beat the calibrated risk's
    assert (output / "selector.json").is_file() is routing["learned_shipped"]
    assert BundleManifest.read(output).to_json() == manifest.to_json()
    classifier = load_classifier(ModelSettings(path=str(output), device="cpu"))
    assert len(classifier.models) == 2 and classifier.models[0] is classifier.model
    assert classifier.ood is not None and classifier.ood.density is not None
    assert classifier.calibration is not None
    # each member is the model its own bundle loads
    for member, path in zip(classifier.models, members, strict=True):
        alone = load_classifier(ModelSettings(path=str(path), device="cpu"))
        for (name, a), (_, b) in zip(
            member.state_dict().items(), alone.model.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(a, b, msg=name)


def hand_probabilities(classifier: Classifier, model: torch.nn.Module) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        rows = []
        for ids in classifier.tokenize(TEXTS):
            x = torch.tensor([ids])
            rows.append(torch.sigmoid(model(input_ids=x).logits)[0].numpy())
    return np.array(rows, dtype=np.float64)


def test_pooled_statistics_equal_a_hand_computation(ensemble: tuple[Path, list[Path]]) -> None:
    output, _ = ensemble
    classifier = load_classifier(ModelSettings(path=str(output), device="cpu"))
    engine = McDropoutEngine(classifier, EngineConfig(mode="off", precision="fp32"))
    summary = engine.predict(classifier.tokenize(TEXTS))
    p = np.stack([hand_probabilities(classifier, m) for m in classifier.models])  # (K, B, L)
    assert engine.n_samples == 2 and summary.n_samples.tolist() == [2] * len(TEXTS)
    np.testing.assert_allclose(summary.mean, p.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(summary.std, p.std(axis=0, ddof=1), atol=1e-5)
    q = np.clip(p, 1e-12, 1 - 1e-12)
    entropy = -(q * np.log(q) + (1 - q) * np.log1p(-q)).sum(axis=2)  # (K, B)
    np.testing.assert_allclose(summary.expected_entropy, entropy.mean(axis=0), atol=1e-5)
    assert (summary.mutual_information > 0).all(), "two different members disagree"


@pytest.mark.parametrize(("n", "shares"), [(30, [15, 15]), (5, [3, 2]), (1, [1, 0])])
def test_the_samples_are_split_evenly_over_the_members(
    ensemble: tuple[Path, list[Path]], n: int, shares: list[int]
) -> None:
    output, _ = ensemble
    classifier = load_classifier(ModelSettings(path=str(output), device="cpu"))
    engine = McDropoutEngine(classifier, EngineConfig(n_samples=n, mode="full", seed=1))
    drawn = dict.fromkeys(range(len(engine.sampling_models)), 0)
    original = engine._sample

    def counting(model: torch.nn.Module, token_ids: list[list[int]], rows, k, acc) -> None:  # type: ignore[no-untyped-def]
        drawn[next(i for i, m in enumerate(engine.sampling_models) if m is model)] += k
        original(model, token_ids, rows, k, acc)

    engine._sample = counting  # type: ignore[method-assign]
    summary = engine.predict(classifier.tokenize(TEXTS))
    assert list(drawn.values()) == shares
    assert summary.n_samples.tolist() == [n] * len(TEXTS)
    # the density features come from the first member alone
    with_features = McDropoutEngine(
        classifier, EngineConfig(n_samples=n, mode="full", seed=1, feature_layer=3)
    ).predict(classifier.tokenize(TEXTS))
    assert with_features.features is not None and with_features.features.shape == (4, 384)
    first = dataclasses.replace(classifier, members=[])
    alone = McDropoutEngine(first, EngineConfig(mode="off", feature_layer=3, precision="fp32"))
    deterministic = alone.predict(classifier.tokenize(TEXTS)).features
    assert deterministic is not None
    # the MC mean of the first member's features lies near its deterministic features
    assert np.abs(with_features.features - deterministic).mean() < 0.1
