"""MC Dropout on the real test model: which modules sample, and what the engine returns."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from support.texts import EXAMPLE_TEXTS
from torch import nn

from worker.inference.dropout import (
    has_dropout,
    mc_dropout,
    mc_dropout_modules,
    set_mc_dropout,
)
from worker.inference.engine import (
    CPU_TOKENS_PER_FORWARD,
    GPU_TOKENS_PER_FORWARD,
    EngineConfig,
    McDropoutEngine,
    length_chunks,
    pad,
    sample_rounds,
    tokens_per_forward_for,
)
from worker.inference.loading import Classifier

TEXTS = EXAMPLE_TEXTS

# Two MC means of the same posts from different seeds differ by sampling noise only. Measured on
# this model with N = 8: per-sample std <= 0.05 for every label, so the standard error of a mean
# is <= 0.05 / sqrt(8) = 0.018 and that of a difference of two independent means <= 0.025; the
# largest observed difference was 0.036. 0.1 is four standard errors of the worst label.
MEAN_TOLERANCE = 0.1
# The deterministic pass of a post is the same whatever else is in its padded chunk, up to float
# rounding (different matmul shapes): far below any meaningful probability difference.
ORDER_TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def classifier(test_classifier: Classifier) -> Iterator[Classifier]:
    """The shared classifier, back in plain eval mode after each test."""
    test_classifier.model.eval()
    yield test_classifier
    test_classifier.model.eval()


@pytest.fixture(scope="module")
def token_ids(test_classifier: Classifier) -> list[list[int]]:
    ids = test_classifier.tokenize(TEXTS)
    assert len({len(t) for t in ids}) > 4, "the posts should have different lengths"
    return ids


def engine(classifier: Classifier, **config: object) -> McDropoutEngine:
    return McDropoutEngine(classifier, EngineConfig(**config))  # type: ignore[arg-type]


def expected_mc_modules(model: nn.Module) -> list[nn.Module]:
    """By hand: dropout layers with p > 0, plus the self-attention modules (they own the
    attention-probability dropout), in model order."""
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Dropout) and m.p > 0) or type(m).__name__ == "BertSelfAttention"
    ]


# -- which modules -------------------------------------------------------------------------------


def test_mc_modules_are_the_dropouts_and_the_self_attentions(classifier: Classifier) -> None:
    model = classifier.model
    chosen = mc_dropout_modules(model)
    expected = expected_mc_modules(model)
    assert [id(m) for m in chosen] == [id(m) for m in expected], "same modules, model order"

    names = {type(m).__name__ for m in chosen}
    # the fast CPU masks swap nn.Dropout for its subclass FastDropout once the engine has run
    assert names in ({"Dropout", "BertSelfAttention"}, {"FastDropout", "BertSelfAttention"})
    n_layers = model.config.num_hidden_layers
    assert sum(type(m).__name__ == "BertSelfAttention" for m in chosen) == n_layers
    # embeddings + (attention probs, attention output, feed-forward output) per layer + head
    assert sum(isinstance(m, nn.Dropout) for m in chosen) == 1 + 3 * n_layers + 1
    for m in chosen:
        assert not isinstance(m, nn.LayerNorm | nn.Linear | nn.Embedding)
        assert type(m).__name__ not in {"BertAttention", "BertSelfOutput", "BertLayer"}
    assert has_dropout(model)


def test_set_mc_dropout_switches_exactly_those_modules(classifier: Classifier) -> None:
    model = classifier.model
    chosen = {id(m) for m in expected_mc_modules(model)}
    returned = set_mc_dropout(model, True)
    assert {id(m) for m in returned} == chosen
    on = {id(m) for m in model.modules() if m.training}
    assert on == chosen
    # the attention projections stay in eval mode (no .train() recursion)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.LayerNorm | nn.Embedding):
            assert not m.training

    set_mc_dropout(model, False)
    assert not any(m.training for m in model.modules())


def test_mc_dropout_context_restores_eval_mode(classifier: Classifier) -> None:
    model = classifier.model
    with mc_dropout(model) as modules:
        assert modules and all(m.training for m in modules)
    assert not any(m.training for m in model.modules())


def test_mc_modules_on_a_toy_model() -> None:
    class MyAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.dropout = nn.Dropout(0.1)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = MyAttention()
            self.norm = nn.LayerNorm(4)
            self.drop = nn.Dropout(0.2)
            self.off = nn.Dropout(0.0)
            self.feature = nn.Dropout2d(0.3)

    class NoAttentionWrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner_dropout = nn.Dropout(0.0)

    toy = nn.Sequential(Block(), NoAttentionWrapper(), nn.Linear(4, 2))
    block = toy[0]
    chosen = mc_dropout_modules(toy)
    assert [id(m) for m in chosen] == [
        id(block.attn),  # parent of an attention dropout
        id(block.attn.dropout),
        id(block.drop),
        id(block.feature),
    ]
    assert not has_dropout(NoAttentionWrapper())
    set_mc_dropout(toy, True)
    assert {id(m) for m in toy.modules() if m.training} == {id(m) for m in chosen}
    assert not block.attn.proj.training


# -- sampling --------------------------------------------------------------------------------------


def forward(classifier: Classifier, token_ids: list[list[int]]) -> torch.Tensor:
    ids, mask = pad(token_ids, classifier.pad_id, classifier.device)
    with torch.inference_mode():
        return classifier.probabilities(ids, mask)


def test_two_mc_passes_differ(classifier: Classifier, token_ids: list[list[int]]) -> None:
    set_mc_dropout(classifier.model, True)
    a, b = forward(classifier, token_ids), forward(classifier, token_ids)
    assert a.shape == (len(TEXTS), len(classifier.label_names))
    assert not torch.equal(a, b)
    assert (a - b).abs().max().item() > 1e-3


def test_attention_dropout_samples_only_through_its_parent(
    classifier: Classifier, token_ids: list[list[int]]
) -> None:
    """Why the parent attention module is switched: the child's flag alone changes nothing."""
    model = classifier.model
    attentions = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]

    model.eval()
    for attention in attentions:
        attention.dropout.training = True  # the child only
    a, b = forward(classifier, token_ids), forward(classifier, token_ids)
    assert torch.equal(a, b)

    model.eval()
    for attention in attentions:
        attention.training = True  # the parent only
    a, b = forward(classifier, token_ids), forward(classifier, token_ids)
    assert not torch.equal(a, b)


def test_eval_pass_is_deterministic(classifier: Classifier, token_ids: list[list[int]]) -> None:
    first = engine(classifier, mode="off").predict(token_ids)
    second = engine(classifier, mode="off").predict(token_ids)
    np.testing.assert_array_equal(first.mean, second.mean)
    np.testing.assert_array_equal(first.n_samples, [1] * len(TEXTS))
    np.testing.assert_array_equal(first.std, np.zeros_like(first.std))
    np.testing.assert_array_equal(first.mutual_information, np.zeros(len(TEXTS)))
    assert not any(m.training for m in classifier.model.modules())


def test_same_seed_same_result_different_seed_close(
    classifier: Classifier, token_ids: list[list[int]]
) -> None:
    n = 8
    a = engine(classifier, mode="full", n_samples=n, seed=1).predict(token_ids)
    b = engine(classifier, mode="full", n_samples=n, seed=1).predict(token_ids)
    c = engine(classifier, mode="full", n_samples=n, seed=2).predict(token_ids)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.std, b.std)
    np.testing.assert_array_equal(a.mutual_information, b.mutual_information)

    assert not np.array_equal(a.mean, c.mean)
    assert np.abs(a.mean - c.mean).max() < MEAN_TOLERANCE
    assert (a.std > 0).all() and (c.std > 0).all(), "dropout varies every label"
    assert a.std.max() < 0.15, "MC spread on this model is small (measured max ~0.05)"
    assert not any(m.training for m in classifier.model.modules()), "eval mode afterwards"


def test_full_mode_gives_every_post_n_samples(
    classifier: Classifier, token_ids: list[list[int]]
) -> None:
    n = 5
    e = engine(classifier, mode="full", n_samples=n, seed=4, max_tokens_per_forward=64)
    summary = e.predict(token_ids)
    assert e.n_samples == n
    np.testing.assert_array_equal(summary.n_samples, [n] * len(TEXTS))
    assert summary.mean.shape == (len(TEXTS), len(classifier.label_names))
    assert ((summary.mean > 0) & (summary.mean < 1)).all()


@pytest.mark.parametrize("mode", ["off", "full"])
def test_results_are_in_input_order(
    classifier: Classifier, token_ids: list[list[int]], mode: str
) -> None:
    """The engine sorts by length internally; results come back in input order."""
    budget = 48  # several chunks: the sort and the chunking both matter
    assert len(list(length_chunks([len(t) for t in token_ids], budget))) > 2
    permutation = list(range(len(token_ids)))
    random.Random(5).shuffle(permutation)
    shuffled = [token_ids[i] for i in permutation]

    config = {"mode": mode, "n_samples": 3, "seed": 9, "max_tokens_per_forward": budget}
    original = engine(classifier, **config).predict(token_ids)
    reordered = engine(classifier, **config).predict(shuffled)
    if mode == "off":
        np.testing.assert_allclose(
            reordered.mean, original.mean[permutation], rtol=0, atol=ORDER_TOLERANCE
        )
    else:  # random: each post's mean must still be its own (closer to it than to any other)
        np.testing.assert_array_equal(reordered.n_samples, [3] * len(TEXTS))
        for row, source in enumerate(permutation):
            distances = np.abs(original.mean - reordered.mean[row]).max(axis=1)
            assert distances[source] < MEAN_TOLERANCE


def test_each_post_matches_its_single_post_result(
    classifier: Classifier, token_ids: list[list[int]]
) -> None:
    batch = engine(classifier, mode="off", max_tokens_per_forward=48).predict(token_ids)
    for i in (0, 2, 5):
        alone = engine(classifier, mode="off").predict([token_ids[i]])
        np.testing.assert_allclose(batch.mean[i], alone.mean[0], rtol=0, atol=ORDER_TOLERANCE)


def test_samples_per_forward_does_not_change_the_statistics(
    classifier: Classifier, token_ids: list[list[int]]
) -> None:
    n = 8
    one = engine(classifier, mode="full", n_samples=n, seed=1, samples_per_forward=1)
    four = engine(classifier, mode="full", n_samples=n, seed=1, samples_per_forward=4)
    a, b = one.predict(token_ids), four.predict(token_ids)
    np.testing.assert_array_equal(a.n_samples, [n] * len(TEXTS))
    np.testing.assert_array_equal(b.n_samples, [n] * len(TEXTS))
    assert np.abs(a.mean - b.mean).max() < MEAN_TOLERANCE
    # the copies in one forward pass get independent masks: the spread is of the same size
    assert (b.std > 0).all()
    assert 0.5 < b.std.mean() / a.std.mean() < 2.0


def test_fast_mode_stops_early_far_from_every_threshold(
    classifier: Classifier, token_ids: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier, "thresholds", np.full(len(classifier.label_names), 0.99))
    e = engine(classifier, mode="fast", n_samples=16, first_samples=4, seed=1,
               watch_top_share=0.0)  # fmt: skip
    summary = e.predict(token_ids)
    assert summary.mean.max() < 0.9, "every mean is far below the 0.99 thresholds"
    np.testing.assert_array_equal(summary.n_samples, [4] * len(TEXTS))


def test_fast_mode_samples_the_review_candidates_fully(
    classifier: Classifier, token_ids: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Far from every threshold, only the batch's most uncertain quarter keeps sampling."""
    monkeypatch.setattr(classifier, "thresholds", np.full(len(classifier.label_names), 0.99))
    e = engine(classifier, mode="fast", n_samples=16, first_samples=4, seed=1,
               watch_top_share=0.25)  # fmt: skip
    summary = e.predict(token_ids)
    assert sorted(summary.n_samples.tolist()) == [4] * (len(TEXTS) - 2) + [16, 16]


def test_fast_mode_samples_undecided_posts_up_to_n(
    classifier: Classifier, token_ids: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    n, first = 16, 4
    reference = engine(classifier, mode="full", n_samples=n, seed=3).predict(token_ids)
    # thresholds right at post 0's means: its decisions are as open as they can be
    monkeypatch.setattr(classifier, "thresholds", reference.mean[0].copy())
    e = engine(classifier, mode="fast", n_samples=n, first_samples=first, seed=1, growth=1.5)
    summary = e.predict(token_ids)
    assert summary.n_samples[0] == n
    # every post stops at the end of a round: 4, 6, 9, 14, 16 (x 1.5, rounded up)
    assert sample_rounds(first, n, e.config.growth) == [4, 6, 9, 14, 16]
    assert set(summary.n_samples.tolist()) <= {4, 6, 9, 14, 16}
    assert ((summary.n_samples >= first) & (summary.n_samples <= n)).all()


def test_sample_rounds_grow_geometrically_up_to_n() -> None:
    config = EngineConfig()
    assert sample_rounds(config.first_samples, config.n_samples, config.growth) == [12, 24, 30]
    assert sample_rounds(12, 30, 1.5) == [12, 18, 27, 30]
    assert sample_rounds(8, 30, 2.0) == [8, 16, 30]
    assert sample_rounds(1, 4, 1.1) == [1, 2, 3, 4]  # at least one more sample a round
    assert sample_rounds(8, 3, 1.5) == [3]  # n below the first round
    with pytest.raises(ValueError, match="growth"):
        sample_rounds(8, 30, 1.0)


def test_fast_mode_with_n_below_first_samples(
    classifier: Classifier, token_ids: list[list[int]]
) -> None:
    summary = engine(classifier, mode="fast", n_samples=3, first_samples=8, seed=1).predict(
        token_ids
    )
    np.testing.assert_array_equal(summary.n_samples, [3] * len(TEXTS))


def test_empty_input_gives_an_empty_summary(classifier: Classifier) -> None:
    summary = engine(classifier, mode="full", n_samples=4).predict([])
    assert len(summary) == 0
    assert summary.mean.shape == (0, len(classifier.label_names))


def test_off_mode_reports_one_sample(classifier: Classifier) -> None:
    e = engine(classifier, mode="off", n_samples=30)
    assert e.n_samples == 1
    assert e.mode == "off"


def test_length_chunks_respect_the_token_budget() -> None:
    lengths = [5, 30, 12, 12, 7, 100, 3, 64]
    chunks = list(length_chunks(lengths, 64))
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        longest = max(lengths[i] for i in chunk)
        assert len(chunk) * longest <= 64 or len(chunk) == 1
        assert [lengths[i] for i in chunk] == sorted(lengths[i] for i in chunk)


@pytest.fixture
def pass_shapes(classifier: Classifier, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(rows, width) of every forward pass the classifier runs in the test."""
    shapes: list[tuple[int, int]] = []
    probabilities = classifier.adapter.probabilities

    def recording(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(ids.shape))
        return probabilities(model, ids, mask)

    monkeypatch.setattr(classifier.adapter, "probabilities", recording)
    return shapes


def test_each_chunk_runs_its_samples_in_one_pass(
    classifier: Classifier, token_ids: list[list[int]], pass_shapes: list[tuple[int, int]]
) -> None:
    """Chunks of budget / n tokens, each run once with its n copies: every pass stays within the
    budget, every post gets exactly n samples, and little padding is computed."""
    budget, n = 256, 8
    e = engine(classifier, mode="full", n_samples=n, seed=2, max_tokens_per_forward=budget)
    summary = e.predict(token_ids)
    np.testing.assert_array_equal(summary.n_samples, [n] * len(token_ids))
    chunks = list(length_chunks([len(t) for t in token_ids], budget // n))
    assert len(pass_shapes) == len(chunks)  # one pass per chunk
    assert all(rows * width <= budget or rows == n for rows, width in pass_shapes)
    padded = sum(rows * width for rows, width in pass_shapes)
    assert padded <= 1.3 * n * sum(len(t) for t in token_ids)


def test_the_default_token_budget_depends_on_the_device(
    classifier: Classifier, token_ids: list[list[int]], pass_shapes: list[tuple[int, int]]
) -> None:
    """0 (the default) with a seed means the fixed budget: every CPU pass within 2,048 tokens,
    in as few passes as that budget allows; a GPU's budget is far larger (one pass must fill
    it)."""
    assert tokens_per_forward_for(torch.device("cpu")) == CPU_TOKENS_PER_FORWARD == 2048
    assert tokens_per_forward_for(torch.device("cuda")) == GPU_TOKENS_PER_FORWARD >= 64 * 1024
    n = 30
    many = token_ids * 8
    e = engine(classifier, mode="full", n_samples=n, seed=3)
    assert e.tokens_per_forward == 2048
    summary = e.predict(many)
    np.testing.assert_array_equal(summary.n_samples, [n] * len(many))
    assert all(rows * width <= 2048 for rows, width in pass_shapes)
    assert len(pass_shapes) == len(list(length_chunks([len(t) for t in many], 2048 // n)))


def test_an_unseeded_cpu_engine_measures_its_budget_and_keeps_the_smallest_near_the_fastest(
    classifier: Classifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a seed the budget is measured once per model and precision: a small batch is
    sampled the engine's own way (dropout on, the candidate's chunks) with each candidate, and
    the smallest within 3 % of the fastest wins; torch's random state is left as it was."""
    from worker.inference import token_budget

    rates = {1024: 100.0, 2048: 180.0, 4096: 200.0}
    budgets: list[int] = []
    passes: list[tuple[int, int, bool]] = []  # (budget, tokens, dropout on) of every pass
    sample = McDropoutEngine._sample
    probabilities = classifier.adapter.probabilities

    def recording_sample(self: McDropoutEngine, *args: Any) -> None:
        budgets.append(args[-1])
        sample(self, *args)

    def recording_pass(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dropout_on = any(m.training for m in model.modules() if isinstance(m, nn.Dropout))
        passes.append((budgets[-1], ids.numel(), dropout_on))
        return probabilities(model, ids, mask)

    monkeypatch.setattr(McDropoutEngine, "_sample", recording_sample)
    monkeypatch.setattr(classifier.adapter, "probabilities", recording_pass)
    # each run measures its candidate's rate (the clock is not what is under test)
    monkeypatch.setattr(token_budget, "_rate", lambda tokens, seconds: rates[budgets[-1]])
    monkeypatch.setattr(token_budget, "_CHOICES", {})  # restored after the test
    state = torch.get_rng_state()
    first = engine(classifier, mode="full", n_samples=10)
    assert first.tokens_per_forward == 4096
    assert first.budget_choice is not None and first.budget_choice.tokens_per_s == rates
    assert torch.equal(torch.get_rng_state(), state)
    assert sorted(set(budgets)) == [1024, 2048, 4096]
    assert all(on for _, _, on in passes)
    assert all(tokens <= budget or tokens <= 10 * 40 for budget, tokens, _ in passes)
    runs = len(budgets)
    assert engine(classifier, mode="full", n_samples=10).tokens_per_forward == 4096
    assert len(budgets) == runs  # measured once per architecture and precision
    assert engine(classifier, mode="full", n_samples=10, seed=1).tokens_per_forward == 2048
    rates[4096] = 176.0  # within 3 % of the fastest (2048 at 180), but larger
    token_budget._CHOICES.clear()
    assert engine(classifier, mode="full", n_samples=10).tokens_per_forward == 2048
    explicit = engine(classifier, mode="full", n_samples=10, max_tokens_per_forward=300)
    assert explicit.tokens_per_forward == 300 and explicit.budget_choice is None


def test_the_budget_is_measured_once_per_architecture_not_per_model_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model swap to other weights of the same architecture (a rollout of retrained adapters)
    reuses the measurement; another precision or another architecture measures again."""
    import copy

    from worker.inference import token_budget

    rates = {1024: 1.0, 2048: 2.0, 4096: 2.0}
    monkeypatch.setattr(token_budget, "_rate", lambda tokens, seconds: rates[tokens])
    calls: list[int] = []

    def sample(budget: int) -> int:
        calls.append(budget)
        return budget

    monkeypatch.setattr(token_budget, "_CHOICES", {})  # this test's choices stay in it
    released = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1))
    retrained = copy.deepcopy(released)
    with torch.no_grad():
        retrained[0].weight.add_(1.0)
    first = token_budget.measured_budget(released, "fp32", sample)
    runs = len(calls)
    assert first.tokens_per_forward == 2048  # the smallest within 3 % of the fastest
    assert runs == len(token_budget.CANDIDATES) * (1 + token_budget.ROUNDS)  # warm-up + rounds
    assert token_budget.measured_budget(retrained, "fp32", sample) is first
    assert len(calls) == runs
    token_budget.measured_budget(retrained, "bf16", sample)
    assert len(calls) == 2 * runs
    wider = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1))
    token_budget.measured_budget(wider, "fp32", sample)
    assert len(calls) == 3 * runs
    other_rate = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2))  # no parameter differs
    token_budget.measured_budget(other_rate, "fp32", sample)
    assert len(calls) == 4 * runs
    token_budget.measured_budget(retrained, "fp32", sample, arrangement=(10, 0))
    assert len(calls) == 5 * runs  # other samples per post shape the calibration runs
