"""Ensemble bundles: combining keeps every member, the members' samples pool into one post's
statistics (checked against a hand computation), and N is split evenly over the members."""

from __future__ import annotations

import dataclasses
import threading
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


def without_noise(classifier: Classifier) -> None:
    """Every dropout layer at a rate the masks round to 0: MC passes that are all alike (the
    engine still samples; it would not at p = 0)."""
    for model in classifier.models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 1e-9


@pytest.mark.usefixtures("two_torch_threads")
def test_an_unseeded_ensemble_samples_its_members_at_once_with_the_same_statistics(
    ensemble: tuple[Path, list[Path]],
) -> None:
    """The members' passes run on two threads (one each) and their samples pool as they do one
    after another: with passes that are all alike, the same means, counts and features."""
    output, _ = ensemble
    classifier = load_classifier(ModelSettings(path=str(output), device="cpu"))
    without_noise(classifier)
    config = EngineConfig(n_samples=6, mode="full", precision="fp32", feature_layer=3)
    one_by_one = McDropoutEngine(classifier, dataclasses.replace(config, member_threads=False))
    at_once = McDropoutEngine(classifier, config)
    assert one_by_one.member_threads is None
    assert at_once.member_threads is not None and at_once.member_threads.count == 2
    threads: dict[int, set[str]] = {0: set(), 1: set()}
    original = at_once._sample

    def recording(model: torch.nn.Module, token_ids: list[list[int]], rows, k, acc) -> None:  # type: ignore[no-untyped-def]
        member = next(i for i, m in enumerate(at_once.sampling_models) if m is model)
        threads[member].add(threading.current_thread().name)
        original(model, token_ids, rows, k, acc)

    at_once._sample = recording  # type: ignore[method-assign]
    ids = classifier.tokenize(TEXTS)
    expected, got = one_by_one.predict(ids), at_once.predict(ids)
    assert all(len(names) == 1 for names in threads.values())
    assert threads[0] != threads[1], "each member on a thread of its own"
    assert all(n.startswith("emoworker-members") for names in threads.values() for n in names)
    assert got.n_samples.tolist() == expected.n_samples.tolist() == [6] * len(TEXTS)
    np.testing.assert_allclose(got.mean, expected.mean, atol=1e-6)
    np.testing.assert_allclose(got.std, expected.std, atol=1e-6)  # between the members
    assert got.features is not None and expected.features is not None
    np.testing.assert_allclose(got.features, expected.features, atol=1e-6)
    # fast mode's rounds too
    fast = McDropoutEngine(classifier, dataclasses.replace(config, mode="fast"))
    assert fast.member_threads is not None
    np.testing.assert_allclose(fast.predict(ids).mean, expected.mean, atol=1e-6)


@pytest.mark.usefixtures("two_torch_threads")
def test_member_threads_only_for_unseeded_ensembles_on_several_threads(
    ensemble: tuple[Path, list[Path]],
) -> None:
    output, _ = ensemble
    classifier = load_classifier(ModelSettings(path=str(output), device="cpu"))
    assert McDropoutEngine(classifier, EngineConfig(n_samples=4, seed=1)).member_threads is None
    assert McDropoutEngine(classifier, EngineConfig(mode="off")).member_threads is None
    first = dataclasses.replace(classifier, members=[])
    assert McDropoutEngine(first, EngineConfig(n_samples=4)).member_threads is None
    torch.set_num_threads(1)
    assert McDropoutEngine(classifier, EngineConfig(n_samples=4)).member_threads is None


@pytest.mark.usefixtures("two_torch_threads")
def test_a_member_that_fails_fails_the_batch_and_the_engine_goes_on(
    ensemble: tuple[Path, list[Path]],
) -> None:
    """The failure reaches the caller (which dead-letters or retries post by post), after the
    other member finished; the next batch samples normally."""
    output, _ = ensemble
    classifier = load_classifier(ModelSettings(path=str(output), device="cpu"))
    engine = McDropoutEngine(classifier, EngineConfig(n_samples=4, mode="full"))
    original = engine._sample
    second = engine.sampling_models[1]

    def failing(model: torch.nn.Module, token_ids: list[list[int]], rows, k, acc) -> None:  # type: ignore[no-untyped-def]
        if model is second:
            raise RuntimeError("member 2 broke")
        original(model, token_ids, rows, k, acc)

    engine._sample = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="member 2 broke"):
        engine.predict(classifier.tokenize(TEXTS))
    engine._sample = original  # type: ignore[method-assign]
    summary = engine.predict(classifier.tokenize(TEXTS))
    assert summary.n_samples.tolist() == [4] * len(TEXTS)
    assert np.isfinite(summary.mean).all()
