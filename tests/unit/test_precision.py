"""Matmul precision of the MC passes: what ``auto`` picks, and that bf16 changes numbers only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.texts import EXAMPLE_TEXTS

from worker.inference import precision as precision_module
from worker.inference.engine import EngineConfig, McDropoutEngine
from worker.inference.loading import load_classifier
from worker.inference.precision import autocast, resolve_precision
from worker.settings import ModelSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, CPU) == explicit


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        resolve_precision("int4", CPU)


def test_autocast_lowers_matmuls_only() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with autocast("bf16", CPU):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", CPU):
        assert (a @ b).dtype == torch.float32


def test_settings_reach_the_engine_and_the_events(test_model_dir: Path) -> None:
    from worker.processing import BatchProcessor
    from worker.settings import WorkerSettings

    settings = WorkerSettings.from_layers(
        {"model": {"path": str(test_model_dir), "device": "cpu", "precision": "bf16"}}, {}
    )
    classifier = load_classifier(settings.model)
    processor = BatchProcessor(classifier, settings)
    assert processor.engine.precision == "bf16"
    assert processor.model_info["precision"] == "bf16"
    assert processor.engine.config.max_tokens_per_forward == 0  # auto: the device's budget


def test_the_token_budget_setting_reaches_the_engine(
    test_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.processing import BatchProcessor
    from worker.settings import WorkerSettings

    monkeypatch.setenv("EMOWORKER_MODEL__PATH", str(test_model_dir))
    monkeypatch.setenv("EMOWORKER_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("EMOWORKER_MODEL__MAX_TOKENS_PER_FORWARD", "4096")
    settings = WorkerSettings()
    processor = BatchProcessor(load_classifier(settings.model), settings)
    assert processor.engine.config.max_tokens_per_forward == 4096


def test_seeded_bf16_samples_the_same_masks_as_fp32(test_model_dir: Path) -> None:
    """Same seed, same dropout masks: bf16 moves the MC means by far less than MC noise."""
    classifier = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    tokens = classifier.tokenize(EXAMPLE_TEXTS)
    runs = {}
    for name in ("fp32", "bf16"):
        engine = McDropoutEngine(classifier, EngineConfig(n_samples=16, seed=5, precision=name))
        assert engine.precision == name
        runs[name] = engine.predict(tokens)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    difference = np.abs(fp32.mean - bf16.mean)
    assert difference.max() > 0.0  # autocast really ran
    mc_standard_error = fp32.std / np.sqrt(16)
    assert difference.mean() < 0.1 * mc_standard_error.mean()
    assert bf16.mean.dtype == fp32.mean.dtype


def test_int8_fast_mode_stays_fp32(test_model_dir: Path) -> None:
    classifier = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    config = EngineConfig(n_samples=4, mode="fast", int8=True, precision="bf16")
    assert McDropoutEngine(classifier, config).precision == "fp32"


def test_low_precision_copy_computes_what_autocast_does(test_model_dir: Path) -> None:
    """The engine's 16-bit copy (linear weights stored in bf16) gives exactly the numbers of the
    original model under autocast, shares every other parameter, and is made once."""
    from torch import nn

    from worker.inference.engine import low_precision_copy

    classifier = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    # the copy's own layers (the fused ones round differently: tests/unit/test_fused_layers.py)
    config = EngineConfig(n_samples=6, seed=9, precision="bf16", fused_layers=False)
    engine = McDropoutEngine(classifier, config)
    twin = engine.sampling_model
    assert twin is not classifier.model
    assert twin is low_precision_copy(classifier.model, torch.bfloat16)
    linear = [m for m in twin.modules() if isinstance(m, nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(p.dtype == torch.float32 for p in classifier.model.parameters())
    original_ids = {id(p) for p in classifier.model.parameters()}
    shared = [p for p in twin.parameters() if id(p) in original_ids]
    assert shared and all(p.dtype == torch.float32 for p in shared)  # embeddings, norms

    tokens = classifier.tokenize(EXAMPLE_TEXTS)
    with_copy = engine.predict(tokens)
    engine.sampling_model = classifier.model  # autocast casts the float32 weights each call
    without = engine.predict(tokens)
    np.testing.assert_array_equal(with_copy.mean, without.mean)
    np.testing.assert_array_equal(with_copy.std, without.std)


def test_float32_engines_use_the_model_itself(test_model_dir: Path) -> None:
    classifier = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    engine = McDropoutEngine(classifier, EngineConfig(n_samples=2, precision="fp32"))
    assert engine.sampling_model is classifier.model


def test_a_model_that_cannot_be_copied_is_used_as_it_is_and_copied_once() -> None:
    """A model holding something unpicklable (an onnxruntime session, say) runs as it is under
    autocast, and the next engine does not try the failing copy again."""
    from torch import nn

    from worker.inference.engine import low_precision_copy

    attempts = []

    class Session:
        def __deepcopy__(self, memo: dict[int, object]) -> Session:
            attempts.append(1)
            raise TypeError("cannot pickle 'Session' object")

    model = nn.Sequential(nn.Linear(4, 2))
    model.session = Session()  # type: ignore[assignment]
    assert low_precision_copy(model, torch.bfloat16) is model
    assert low_precision_copy(model, torch.bfloat16) is model
    assert len(attempts) == 1
    assert model[0].weight.dtype == torch.float32
