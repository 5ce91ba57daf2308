"""Fused encoder layers (worker/inference/fused_layers.py): the same sub-networks as the Hugging
Face layers under autocast, within bfloat16 rounding; their own forward where they do not apply;
an engine keeps them only where they measured faster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from support.texts import EXAMPLE_TEXTS

from worker.inference import engine as engine_module
from worker.inference import fused_layers
from worker.inference.dropout import set_mc_dropout
from worker.inference.engine import (
    EngineConfig,
    McDropoutEngine,
    encoder_layers,
    low_precision_copy,
)
from worker.inference.fast_dropout import install_fast_dropout
from worker.inference.fused_layers import (
    FusedEncoderLayer,
    fused_linear_available,
    install_fused_layers,
    padded_rows,
)
from worker.inference.loading import Classifier, load_classifier
from worker.settings import ModelSettings

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not fused_linear_available(), reason="no oneDNN bfloat16 fused linear"),
]


def tiny_bert(heads: int = 4, act: str = "gelu", seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=128,
        hidden_act=act,
        max_position_embeddings=64,
        initializer_range=0.1,  # scores large enough that the attention scale matters
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    install_fast_dropout(model)
    return low_precision_copy(model, torch.bfloat16)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (6, 13), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate([13, 13, 11, 9, 5, 2]):  # padded rows, as a chunk has
        mask[row, length:] = 0
    return ids, mask


def run(model: torch.nn.Module, seed: int, sampling: bool = True) -> torch.Tensor:
    ids, mask = batch()
    set_mc_dropout(model, sampling)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(seed)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    return out[mask.bool()]  # the real tokens


@pytest.mark.parametrize("heads", [4, 2])  # attention scale 1/4 (a power of two), 1/sqrt(32)
def test_fused_layers_sample_the_same_sub_networks_within_bf16_rounding(heads: int) -> None:
    model = tiny_bert(heads)
    plain = run(model, seed=3)
    other_masks = run(model, seed=4)
    assert install_fused_layers(model, encoder_layers(model)) == 2
    fused = run(model, seed=3)
    # the same seed draws the same masks: the outputs differ by bfloat16 rounding only (measured:
    # 0.003 on average, 0.02 at most; a bfloat16 step at 1 is 0.008), while other masks move
    # them 0.46 on average; scores 10 % off (a wrong attention scale) moved them 0.012, a
    # missing dropout scale 0.09
    rounding = (fused - plain).abs()
    assert rounding.mean() < 0.006 and rounding.max() < 0.05, (rounding.mean(), rounding.max())
    assert (other_masks - plain).abs().mean() > 50 * rounding.mean()


def test_the_layers_own_forward_runs_without_dropout_and_when_disabled() -> None:
    model = tiny_bert()
    deterministic, sampled = run(model, seed=5, sampling=False), run(model, seed=5)
    install_fused_layers(model, encoder_layers(model))
    assert torch.equal(run(model, seed=5, sampling=False), deterministic)  # not fused: exact
    fused_layers.set_fused_layers(model, False)
    assert torch.equal(run(model, seed=5), sampled)
    fused_layers.set_fused_layers(model, True)
    assert not torch.equal(run(model, seed=5), sampled)


def test_layers_of_another_shape_keep_their_forward() -> None:
    silu = tiny_bert(act="silu")
    assert install_fused_layers(silu, encoder_layers(silu)) == 0  # oneDNN cannot fuse silu here
    from transformers import BertConfig, BertModel

    float32 = BertModel(BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128))
    assert install_fused_layers(float32, encoder_layers(float32)) == 0  # not a bfloat16 copy


def test_rows_are_padded_to_few_sizes_with_little_waste() -> None:
    sizes = {padded_rows(m) for m in range(1, 200_001)}
    assert len(sizes) <= 100  # every pass shape maps to one of these
    for m in range(1, 20_000):
        rows = padded_rows(m)
        assert rows >= m and rows % 16 == 0
        assert m < 128 or rows <= m * 1.125
    # the full passes of a 4,096-token budget (77-92 % full): 3 kernel shapes per linear layer
    assert len({padded_rows(m) for m in range(3150, 3770)}) == 3


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls: list[int] = []
    call = FusedEncoderLayer.__call__

    def counting(self: FusedEncoderLayer, *args: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        return call(self, *args)

    monkeypatch.setattr(FusedEncoderLayer, "__call__", counting)
    yield calls


def test_a_seeded_bf16_engine_uses_them_with_the_same_statistics(
    test_classifier: Classifier, fused_calls: list[int]
) -> None:
    token_ids = test_classifier.tokenize(EXAMPLE_TEXTS[:8])

    def summary(fused: bool) -> np.ndarray:
        config = EngineConfig(n_samples=8, seed=11, precision="bf16", fused_layers=fused)
        return McDropoutEngine(test_classifier, config).predict(token_ids).mean

    plain = summary(False)
    assert not fused_calls
    fused = summary(True)
    layers = len(encoder_layers(test_classifier.model) or [])
    assert fused_calls and len(fused_calls) % layers == 0  # every layer of every pass
    assert np.abs(fused - plain).max() < 0.02  # MC standard error here: about 0.05


def test_an_unseeded_engine_keeps_the_layers_that_measured_faster(
    test_classifier: Classifier, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[int] = []

    def plain_faster(model: object, precision: str, sample: object, arrangement: object) -> dict:
        measured.append(1)
        return {True: 900.0, False: 1000.0}

    monkeypatch.setattr(engine_module, "measured_fused_layers", plain_faster)
    monkeypatch.setattr(engine_module, "measured_budget", _fixed_budget)
    engine = McDropoutEngine(test_classifier, EngineConfig(n_samples=4, precision="bf16"))
    assert measured == [1] and not engine.fused_layers
    engine.predict(test_classifier.tokenize(EXAMPLE_TEXTS[:4]))
    assert not fused_calls

    monkeypatch.setattr(
        engine_module, "measured_fused_layers", lambda *a, **k: {True: 1100.0, False: 1000.0}
    )
    engine = McDropoutEngine(test_classifier, EngineConfig(n_samples=4, precision="bf16"))
    assert engine.fused_layers
    engine.predict(test_classifier.tokenize(EXAMPLE_TEXTS[:4]))
    assert fused_calls


def _fixed_budget(*args: object, **kwargs: object) -> engine_module.BudgetChoice:
    return engine_module.BudgetChoice(2048, {2048: 1.0}, 0.0)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_in_bf16(family: str, tmp_path: Path, fused_calls: list[int]) -> None:
    """RoBERTa's layers have BERT's shape and get the fused forward (the same statistics within
    rounding); DistilBERT's do not and keep their own."""
    from support.families import builders

    folder = getattr(builders, f"build_{family}")(tmp_path / family)
    classifier = load_classifier(ModelSettings(path=str(folder), device="cpu"))
    token_ids = classifier.tokenize(EXAMPLE_TEXTS[:6])

    def means(fused: bool) -> np.ndarray:
        config = EngineConfig(n_samples=6, seed=5, precision="bf16", fused_layers=fused)
        return McDropoutEngine(classifier, config).predict(token_ids).mean

    plain = means(False)
    fused = means(True)
    assert bool(fused_calls) == (family == "roberta")
    assert np.abs(fused - plain).max() < 0.02


def test_a_configured_budget_still_measures_the_layers(
    test_classifier: Classifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        engine_module, "measured_fused_layers", lambda *a, **k: {True: 900.0, False: 1000.0}
    )
    config = EngineConfig(n_samples=4, precision="bf16", max_tokens_per_forward=1024)
    engine = McDropoutEngine(test_classifier, config)
    assert engine.budget_choice is None and engine.layer_rates is not None
    assert not engine.fused_layers


def test_an_mc_engine_samples_with_the_fast_masks_after_a_deterministic_one(
    test_model_dir: Path, fused_calls: list[int]
) -> None:
    """The bfloat16 twin is copied once per model: when one deterministic pass (mode off, which
    installs no fast dropout) made it first, as ``emoworker train`` does before its MC run, the
    MC engines after it still sample through the fast masks, the same with and without the fused
    layers (a twin left with torch's dropout drew other masks: means 0.075 apart)."""
    classifier = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    token_ids = classifier.tokenize(EXAMPLE_TEXTS[:8])
    McDropoutEngine(classifier, EngineConfig(mode="off", precision="bf16")).predict(token_ids)

    def summary(fused: bool) -> np.ndarray:
        config = EngineConfig(n_samples=8, seed=11, precision="bf16", fused_layers=fused)
        return McDropoutEngine(classifier, config).predict(token_ids).mean

    plain = summary(False)
    twin = low_precision_copy(classifier.model, torch.bfloat16)
    assert not [m for m in twin.modules() if type(m) is torch.nn.Dropout]
    fused = summary(True)
    assert fused_calls
    assert np.abs(fused - plain).max() < 0.02  # as in the test above
