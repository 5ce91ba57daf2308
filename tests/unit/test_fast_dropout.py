"""The CPU dropout masks: right keep rate, unbiased, seeded, and the same MC statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.texts import EXAMPLE_TEXTS
from torch import nn

from worker.inference.engine import EngineConfig, McDropoutEngine
from worker.inference.fast_dropout import FastDropout, fast_dropout, install_fast_dropout, keep_mask
from worker.inference.loading import load_classifier
from worker.settings import ModelSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_keep_rate_is_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of four: the last word is cut
    kept = keep_mask((n,), p, torch.device("cpu")).double().mean().item()
    standard_error = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * standard_error


def test_dropout_is_unbiased_and_zeroes_the_rest() -> None:
    torch.manual_seed(1)
    x = torch.full((2000, 384), 2.0)
    y = fast_dropout(x, 0.1)
    zeros = (y == 0).double().mean().item()
    assert abs(zeros - 0.1) < 0.003
    assert torch.allclose(y[y != 0], torch.tensor(2.0 / (1 - 6554 / 65536)))
    assert abs(y.mean().item() - 2.0) < 0.01


def test_seeded_and_fresh_each_call() -> None:
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    a, b = fast_dropout(x, 0.1), fast_dropout(x, 0.1)
    torch.manual_seed(7)
    c = fast_dropout(x, 0.1)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_module_keeps_its_type_and_eval_is_identity() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))
    install_fast_dropout(model)
    assert isinstance(model[1], nn.Dropout) and type(model[1]) is FastDropout
    model.eval()
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model[0](x))


def test_mc_statistics_match_pytorch_dropout(test_model_dir) -> None:
    """Same model, same posts, N = 64: PyTorch's dropout and the fast masks agree within MC
    noise on every post's mean and on the average spread."""
    texts = EXAMPLE_TEXTS
    reference = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    fast = load_classifier(ModelSettings(path=str(test_model_dir), device="cpu"))
    slow_engine = McDropoutEngine(reference, EngineConfig(n_samples=64, seed=3, fast_dropout=False))
    fast_engine = McDropoutEngine(fast, EngineConfig(n_samples=64, seed=4))
    assert type(next(m for m in fast.model.modules() if isinstance(m, nn.Dropout))) is FastDropout
    assert fast.model.config._attn_implementation == "emoworker_mc"
    a = slow_engine.predict(reference.tokenize(texts))
    b = fast_engine.predict(fast.tokenize(texts))
    # standard error of a difference of two 64-sample means: sqrt(2) * std / 8
    bound = 5 * np.sqrt(2) * np.maximum(a.std, b.std) / 8 + 1e-4
    assert (np.abs(a.mean - b.mean) <= bound).mean() > 0.99
    ratio = b.std.mean() / a.std.mean()
    assert 0.9 < ratio < 1.1, ratio


def test_masks_do_not_depend_on_the_dtype() -> None:
    """The same seed drops the same elements in float32, bfloat16, float16 and float64: a seeded
    bf16 run samples the same sub-networks as an fp32 one."""
    x = torch.rand(257, 33) + 0.5  # no zeros of its own
    dropped = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        torch.manual_seed(11)
        y = fast_dropout(x.to(dtype), 0.1)
        assert y.dtype == dtype and y.shape == x.shape
        dropped[dtype] = y == 0
        kept = y != 0
        scale = 1 / (1 - 3277 / 32768)
        torch.testing.assert_close(
            y[kept].double(), (x.to(dtype)[kept].double() * scale), rtol=1e-2, atol=0
        )
    reference = dropped[torch.float32]
    assert 0.08 < reference.double().mean().item() < 0.12
    for mask in dropped.values():
        assert torch.equal(mask, reference)


def test_non_contiguous_input_and_the_input_is_left_alone() -> None:
    x = torch.rand(6, 40, 12).transpose(0, 2) + 0.5
    before = x.clone()
    torch.manual_seed(3)
    y = fast_dropout(x, 0.25)
    assert torch.equal(x, before)
    assert y.shape == x.shape
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - 8192 / 32768))


def test_gradients_still_flow_where_they_are_asked_for() -> None:
    x = torch.ones(50, 20, requires_grad=True)
    y = fast_dropout(x, 0.2)
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad == 0, y.detach() == 0)  # dropped elements get no gradient


def test_mc_attention_softmax_is_float32_under_bf16_autocast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sampled attention keeps its softmax in float32 when the matmuls run in bfloat16, and
    its output goes back to the matmul precision."""
    from worker.inference import fast_dropout as module

    seen: list[tuple[torch.dtype, torch.dtype | None]] = []
    real_softmax = torch.softmax

    def recording_softmax(
        x: torch.Tensor, dim: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        seen.append((x.dtype, dtype))
        return real_softmax(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(module.torch, "softmax", recording_softmax)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = module.mc_attention(nn.Module(), q, k, v, mask, dropout=0.1)
    assert seen == [(torch.bfloat16, torch.float32)]
    assert output.shape == (2, 7, 4, 8) and output.dtype == torch.bfloat16
