"""The MC Dropout engine: N stochastic passes over a batch of tokenised posts.

Arrangement (what measured fastest on CPU; see ``emoworker bench``):

1. posts are sorted by length and cut into chunks of about ``max_tokens_per_forward / n``
   tokens (padded), for n samples per post: neighbours in length order, so almost no padding;
2. a forward pass carries the n copies of a chunk (at most the budget; on the bench's posts 77 %,
   85 % and 92 % of it on average for n = 30, 12 and 6; a post longer than budget / n gets fewer
   copies per pass); the copies get independent dropout masks. Measured against chunks of the
   whole budget with fewer copies (the arrangement before): 1.13-1.25x in full mode, 1.04-1.23x
   in fast mode (8 interleaved pairs, bf16 and fp32);
3. on the CPU, dropout masks come from random lanes and bit operations (``fast_dropout.py``):
   PyTorch's own per-element Bernoulli draws cost as much as the matmuls;
4. results go into running sums (``McAccumulator``), never a (N, B, L) tensor;
5. on the CPU in bfloat16, BERT-family encoder layers run on oneDNN's fused linear with packed
   weights and passes padded to a few row counts (``fused_layers.py``: 1.26x for full MC in the
   bench on an Intel Xeon with AMX); an unseeded engine measures them against the model's own
   layers at start-up and keeps the faster;
6. on the CPU, an unseeded ensemble samples its members at once, each group on a thread of one
   torch thread (``member_threads.py``: 1.18-1.26x for full MC in batches of 64 on
   2 cores).

Modes:

* ``full``: every post gets N samples with every dropout layer stochastic.
* ``fast``: adaptive sampling (optionally on an int8 copy of the linear layers on the CPU: 2x
  faster, but it moved label sets further from full MC than MC noise does, so it is off by
  default; see docs/mc-dropout.md). Every post first gets
  ``first_samples`` (12); then, in rounds that multiply the samples by ``growth`` (12, 24,
  30), only posts whose label set could still change keep sampling: a label mean within ``z``
  (0.5) standard errors of its threshold. Optionally the batch's top ``watch_top_share`` by
  mutual information samples fully (off by default: it cost a sample per post and measured no
  gain in agreement). Measured on stored samples of 1,600 dev posts: agreement on label sets
  hardly depends on ``z`` (near a threshold the full-MC reference is itself a coin toss), while
  the ranking by mutual information depends on the samples every post gets, hence many first
  samples and a low ``z`` rather than few first samples and a high one. Timed on the
  four-member ensemble, few rounds pay: each round is a pass per member over the posts left.
* ``off``: one deterministic pass (also used for models without dropout).

Precision (``precision.py``): ``fp32``, or the matmuls in bfloat16/float16 under autocast.
``auto`` (the default) is bfloat16 where the hardware has it natively, float32 elsewhere. In 16
bits the passes run on a copy of the model whose linear weights are stored in 16 bits
(``low_precision_copy``): the same results as autocast casting them on every call, without the
casts.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch
from torch import nn

from worker.inference.dropout import set_mc_dropout
from worker.inference.fast_dropout import install_fast_dropout
from worker.inference.fused_layers import (
    has_fused_layers,
    install_fused_layers,
    set_fused_layers,
)
from worker.inference.loading import Classifier
from worker.inference.member_threads import (
    LockedAccumulator,
    MemberThreads,
    SampleSink,
    member_groups,
    member_thread_count,
)
from worker.inference.precision import DTYPES, Precision, autocast, resolve_precision
from worker.inference.token_budget import (
    SEEDED_CPU_BUDGET,
    BudgetChoice,
    calibration_posts,
    measured_budget,
    measured_fused_layers,
)
from worker.inference.uncertainty import McAccumulator, McSummary
from worker.settings import McMode


@dataclass
class EngineConfig:
    n_samples: int = 30
    mode: McMode = "full"
    seed: int | None = None
    max_tokens_per_forward: int = 0  # 0: auto (measured on the CPU: token_budget.py)
    samples_per_forward: int = 0  # 0: as many as fit the token budget
    fast_dropout: bool = True  # cheaper dropout masks on the CPU (see fast_dropout.py)
    first_samples: int = 12  # fast mode: samples every post gets
    growth: float = 2.0  # fast mode: each round multiplies an undecided post's samples by this
    z: float = 0.5  # fast mode: more samples while |mean - t| < z * standard error
    watch_top_share: float = 0.0  # fast mode: the batch's top share by MI samples fully
    int8: bool = False  # fast mode: dynamically quantised linear layers on the CPU (unfaithful)
    precision: Precision = "auto"  # see precision.py
    feature_layer: int = 0  # >0: also average this encoder layer's output (HiddenStateTap)
    fused_layers: bool = True  # CPU, bfloat16: fused encoder layers where measured faster
    member_threads: bool = True  # CPU, unseeded ensembles: members sampled at once (see module)


def pad(
    token_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, seq in enumerate(token_ids):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return to_device(ids, device), to_device(mask, device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``; to a GPU through pinned memory, asynchronously: a
    plain copy from pageable memory waits for the GPU to finish all queued work (the previous
    pass) before the next pass can even be queued."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def stochastic(models: list[nn.Module]) -> Iterator[None]:
    """Every dropout layer of ``models`` on (MC sampling); back to eval mode after."""
    for model in models:
        set_mc_dropout(model, True)
    try:
        yield
    finally:
        for model in models:
            model.eval()


def length_chunks(lengths: list[int], max_tokens: int) -> Iterator[list[int]]:
    """Indices sorted by length, cut so that rows x longest length <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunk: list[int] = []
    for i in order:
        if chunk and (len(chunk) + 1) * lengths[i] > max_tokens:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


class McDropoutEngine:
    """Runs a ``Classifier`` N times with dropout on; thread-confined (one batch at a time)."""

    def __init__(self, classifier: Classifier, config: EngineConfig) -> None:
        self.classifier = classifier
        self.config = config
        self.mode: McMode = config.mode if classifier.supports_mc else "off"
        self.device = classifier.device
        self.thresholds = torch.as_tensor(
            classifier.thresholds, dtype=torch.float64, device=self.device
        )
        self.precision = engine_precision(classifier, config, self.mode)
        # the models the samples come from: one, or an ensemble's members (N split evenly)
        self.sampling_models = [self._sampling_copy(m) for m in classifier.models]
        self.features = (
            HiddenStateTap.on(self.sampling_model, config.feature_layer)
            if config.feature_layer
            else None
        )
        self._turn = 0  # the member the next odd sample comes from (see _sample_members)
        self.budget_choice: BudgetChoice | None = None  # set when the budget was measured
        # fused encoder layers (fused_layers.py): installed on the CPU's bfloat16 copies; used
        # when a seeded engine asks for them, or when measured faster at start-up
        self.fused_layers = config.fused_layers and all(
            has_fused_layers(m) for m in self.sampling_models
        )
        self.layer_rates: dict[bool, float] | None = None  # tokens/s, fused and plain, measured
        for model in self.sampling_models:
            set_fused_layers(model, self.fused_layers)
        self.tokens_per_forward = self._token_budget()
        if self.fused_layers and self.config.seed is None:  # a configured budget measures too
            self.fused_layers = self._fused_layers_faster()
        # an unseeded ensemble on the CPU samples its members at once (member_threads.py)
        count = member_thread_count(torch.get_num_threads(), len(self.sampling_models))
        self.member_threads = (
            MemberThreads(count)
            if config.member_threads
            and count > 1
            and config.seed is None
            and self.device.type == "cpu"
            and self.mode != "off"
            else None
        )

    @property
    def sampling_model(self) -> nn.Module:
        """The (first) model the samples come from; assigning replaces it (the GPU bench puts a
        compiled twin there)."""
        return self.sampling_models[0]

    @sampling_model.setter
    def sampling_model(self, model: nn.Module) -> None:
        self.sampling_models[0] = model

    def _sampling_copy(self, model: nn.Module) -> nn.Module:
        classifier, config = self.classifier, self.config
        fast = classifier.device.type == "cpu" and config.fast_dropout and self.mode != "off"
        if fast:
            install_fast_dropout(model)
        if uses_int8(classifier, config, self.mode):
            return int8_copy(model)
        if (dtype := DTYPES.get(self.precision)) is not None:  # only with float parameters
            twin = low_precision_copy(model, dtype)
            if fast:  # a twin copied earlier for one deterministic pass has torch's dropout
                install_fast_dropout(twin)
            if dtype is torch.bfloat16 and self.device.type == "cpu" and self.mode != "off":
                install_fused_layers(twin, encoder_layers(twin))
            return twin
        return model

    def _fused_layers_faster(self) -> bool:
        """Whether full MC on the calibration posts runs faster with the fused layers than with
        the model's own (measured once per architecture and precision in a process)."""
        token_ids = calibration_posts(self.classifier.tokenize)

        def sample_with_layers(fused: bool) -> int:
            set_fused_layers(self.sampling_model, fused)
            return self._sample_calibration_batch(token_ids, self.tokens_per_forward)

        self.layer_rates = measured_fused_layers(
            self.sampling_model,
            self.precision,
            sample_with_layers,
            arrangement=(self.config.n_samples, self.config.samples_per_forward),
        )
        return self.layer_rates[True] > self.layer_rates[False]

    def _token_budget(self) -> int:
        """The tokens one pass carries: as configured; on ``auto``, measured on the CPU
        (``token_budget.py``; a seeded engine takes the fixed ``SEEDED_CPU_BUDGET``)."""
        if self.config.max_tokens_per_forward:
            return self.config.max_tokens_per_forward
        if self.device.type != "cpu":
            return tokens_per_forward_for(self.device)
        if self.config.seed is not None or self.mode == "off":
            return SEEDED_CPU_BUDGET
        if not has_float_parameters(self.sampling_model):  # e.g. ONNX: nothing to measure
            return tokens_per_forward_for(self.device)
        token_ids = calibration_posts(self.classifier.tokenize)
        self.budget_choice = measured_budget(
            self.sampling_model,
            self.precision,
            lambda budget: self._sample_calibration_batch(token_ids, budget),
            arrangement=(self.config.n_samples, self.config.samples_per_forward),
        )
        return self.budget_choice.tokens_per_forward

    def _sample_calibration_batch(self, token_ids: list[list[int]], budget: int) -> int:
        """Full MC on ``token_ids`` with ``budget`` tokens a pass, as ``predict`` samples (on
        the first model); returns the tokens sampled."""
        n = self.config.n_samples
        acc = McAccumulator(
            len(token_ids), len(self.classifier.label_names), self.thresholds, self.device
        )
        model = self.sampling_model
        device = self.classifier.device
        with torch.inference_mode(), autocast(self.precision, device), stochastic([model]):
            self._sample(model, token_ids, list(range(len(token_ids))), n, acc, budget)
        return n * sum(len(t) for t in token_ids)

    @property
    def n_samples(self) -> int:
        """Samples per post: N, or in ``off`` mode one deterministic pass per model."""
        return len(self.sampling_models) if self.mode == "off" else self.config.n_samples

    def predict(self, token_ids: list[list[int]]) -> McSummary:
        """MC statistics for each post, in input order."""
        acc = McAccumulator(
            len(token_ids), len(self.classifier.label_names), self.thresholds, self.device
        )
        if not token_ids:
            return acc.summary()
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        rows = list(range(len(token_ids)))
        for model in self.sampling_models:  # the copies may be shared with another engine
            set_fused_layers(model, self.fused_layers)
        with torch.inference_mode(), autocast(self.precision, self.classifier.device):
            if self.mode == "off":
                for model in self.sampling_models:
                    set_mc_dropout(model, False)
                    self._sample(model, token_ids, rows, 1, acc)
                return acc.summary()
            with stochastic(self.sampling_models):
                if self.mode == "full":
                    self._sample_members(token_ids, rows, self.n_samples, acc)
                else:
                    self._adaptive(token_ids, acc)
        return acc.summary()

    def _sample_members(
        self, token_ids: list[list[int]], rows: list[int], n: int, acc: McAccumulator
    ) -> None:
        """``n`` samples for each post in ``rows``, split evenly over the models; the odd ones
        go round the members in turn (so across fast mode's rounds too)."""
        k = len(self.sampling_models)
        shares = [n // k] * k
        for j in range(n % k):
            shares[(self._turn + j) % k] += 1
        self._turn = (self._turn + n % k) % k
        groups = member_groups(shares, self.member_threads.count) if self.member_threads else []
        if self.member_threads is None or len(groups) < 2:
            for model, share in zip(self.sampling_models, shares, strict=True):
                if share:
                    self._sample(model, token_ids, rows, share, acc)
            return
        shared = LockedAccumulator(acc)
        precision, device = self.precision, self.classifier.device

        def sample_group(members: list[int]) -> None:  # on a member thread
            with torch.inference_mode(), autocast(precision, device):  # both per thread
                for i in members:
                    self._sample(self.sampling_models[i], token_ids, rows, shares[i], shared)

        futures: list[Future[None]] = []
        try:
            futures += [self.member_threads.pool.submit(sample_group, g) for g in groups]
            for future in futures:
                future.result()
        finally:
            wait(futures)  # no member still sampling when this returns or raises

    def _adaptive(self, token_ids: list[list[int]], acc: McAccumulator) -> None:
        rounds = sample_rounds(self.config.first_samples, self.n_samples, self.config.growth)
        active = list(range(len(token_ids)))
        self._sample_members(token_ids, active, rounds[0], acc)
        watched = set(self.most_uncertain(acc, len(token_ids)))
        for drawn, target in itertools.pairwise(rounds):
            undecided = self.undecided(acc, active)
            active = [i for i, u in zip(active, undecided, strict=True) if u or i in watched]
            if not active:
                break
            self._sample_members(token_ids, active, target - drawn, acc)

    def undecided(self, acc: McAccumulator, rows: list[int]) -> list[bool]:
        """Posts whose predicted label set could still change with more samples."""
        index = to_device(torch.as_tensor(rows), self.device)
        mean = acc.mean()[index]
        se = acc.standard_error()[index]
        near = (mean - self.thresholds).abs() < self.config.z * se.clamp(min=1e-4)
        return near.any(dim=1).tolist()

    def most_uncertain(self, acc: McAccumulator, n_posts: int) -> list[int]:
        """The batch's top ``watch_top_share`` posts by mutual information: review candidates."""
        k = round(self.config.watch_top_share * n_posts)
        if k <= 0:
            return []
        mi = torch.as_tensor(acc.summary().mutual_information)
        return torch.topk(mi, min(k, n_posts)).indices.tolist()

    def _sample(
        self,
        model: nn.Module,
        token_ids: list[list[int]],
        rows: list[int],
        n: int,
        acc: McAccumulator | SampleSink,
        budget: int = 0,
    ) -> None:
        """Draw ``n`` samples for each post in ``rows`` into ``acc`` (``budget``: tokens a
        pass, if not the engine's)."""
        budget = budget or self.tokens_per_forward
        lengths = [len(token_ids[i]) for i in rows]
        device = self.device
        # chunks of budget / n tokens, each run once with its n copies in one pass: nearly no
        # padding, and large passes even when few posts are left (fast mode's later rounds)
        chunk_budget = budget if self.config.samples_per_forward else max(1, budget // n)
        for chunk in length_chunks(lengths, chunk_budget):
            posts = [rows[i] for i in chunk]
            ids, mask = pad([token_ids[i] for i in posts], self.classifier.pad_id, device)
            per_forward = self.config.samples_per_forward or max(1, budget // ids.numel())
            per_forward = min(per_forward, n)
            index = to_device(torch.as_tensor(posts), device)
            remaining = n
            while remaining > 0:
                k = min(per_forward, remaining)
                probs = self.classifier.adapter.probabilities(
                    model, ids.repeat(k, 1), mask.repeat(k, 1)
                )
                rows_k = index.repeat(k)
                acc.add(rows_k, probs)
                if self.features is not None and model is self.sampling_model:
                    pooled = self.features.pooled(mask.repeat(k, 1))
                    if pooled is not None:
                        acc.add_features(rows_k, pooled)
                remaining -= k


class HiddenStateTap:
    """The output of one encoder layer, caught on every forward pass: the post's representation
    for the density signal (``worker/ood/density.py``) at no extra pass.

    ``layer`` counts from 1 (the first encoder layer's output; the middle layer is what the
    density signal uses). The encoder's layers are the model's ``nn.ModuleList`` with
    ``config.num_hidden_layers`` entries; a model without one (ONNX) has no features. One tap per
    model and layer, shared by its engines (each confined to its thread, like the model's
    passes)."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        self._last: torch.Tensor | None = None
        layers = encoder_layers(model)
        self.available = layers is not None and 1 <= layer <= len(layers)
        if layers is not None and self.available:
            layers[layer - 1].register_forward_hook(self._catch)

    @classmethod
    def on(cls, model: nn.Module, layer: int) -> HiddenStateTap:
        taps = _TAPS.setdefault(model, {})
        if layer not in taps:
            taps[layer] = cls(model, layer)
        return taps[layer]

    def _catch(self, module: nn.Module, inputs: object, output: object) -> None:
        x = output[0] if isinstance(output, tuple) and output else output
        self._last = x if isinstance(x, torch.Tensor) else None

    def pooled(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The last pass's hidden states averaged over each row's tokens (``mask``: rows x
        width), (rows, D) in float32; None when the pass gave none of that shape."""
        x, self._last = self._last, None
        if x is None or x.ndim != 3 or x.shape[:2] != mask.shape:
            return None
        weights = mask.unsqueeze(-1).to(torch.float32)
        return (x.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of encoder layers, or None."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int):
        return None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    return None


_TAPS: weakref.WeakKeyDictionary[nn.Module, dict[int, HiddenStateTap]] = weakref.WeakKeyDictionary()

CPU_TOKENS_PER_FORWARD = SEEDED_CPU_BUDGET  # when not measured (seeded, off mode, no torch model)
GPU_TOKENS_PER_FORWARD = 131_072


def tokens_per_forward_for(device: torch.device) -> int:
    """The default token budget of one forward pass (padded rows x width, copies included).

    On the CPU the engine measures it on ``auto`` (``token_budget.py``) and this is the value
    when it does not; a GPU needs passes a hundred times larger to be busy (``emoworker bench``
    measures both). The budget also bounds the memory of one pass.
    """
    return GPU_TOKENS_PER_FORWARD if device.type == "cuda" else CPU_TOKENS_PER_FORWARD


def sample_rounds(first: int, n: int, growth: float) -> list[int]:
    """Fast mode: the samples an undecided post has after each round (``first``, then times
    ``growth``, rounded up, until ``n``); e.g. 12, 24, 30."""
    if growth <= 1.0:
        raise ValueError(f"growth must be above 1, not {growth}")
    counts = [max(1, min(first, n))]
    while counts[-1] < n:
        counts.append(min(n, max(counts[-1] + 1, math.ceil(counts[-1] * growth))))
    return counts


def uses_int8(classifier: Classifier, config: EngineConfig, mode: McMode) -> bool:
    """Whether the engine samples from the int8 copy (fast mode on the CPU, when asked)."""
    return classifier.device.type == "cpu" and mode == "fast" and config.int8


def has_float_parameters(model: nn.Module) -> bool:
    return any(p.is_floating_point() for p in model.parameters())


def engine_precision(classifier: Classifier, config: EngineConfig, mode: McMode) -> str:
    """The precision an engine with ``config`` really runs at (reports quote this one)."""
    if not has_float_parameters(classifier.model):
        return "fp32"  # e.g. an ONNX classifier: torch only moves its inputs
    if uses_int8(classifier, config, mode):
        return "fp32"  # the int8 layers take float32 inputs
    return resolve_precision(config.precision, classifier.device)


_LOW_PRECISION_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[torch.dtype, nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def low_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model with its linear layers' weights and biases stored in ``dtype`` (one copy per
    model and dtype; the other parameters are shared, not copied).

    Under autocast a linear layer casts its float32 weight to 16 bits on every call (measured:
    about 5 % of a bfloat16 MC pass on the CPU); autocast leaves a weight that is already 16-bit
    as it is, and the cast rounds the same way, so the copy computes exactly what the original
    does under autocast, without the casts. It is only ever run under autocast. A model that
    cannot be copied (one holding an onnxruntime session) is returned as it is.
    """
    copies = _LOW_PRECISION_COPIES.setdefault(model, {})
    if dtype not in copies:
        linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
        cast = {id(p) for m in linear for p in m.parameters(recurse=False)}
        shared: dict[int, object] = {id(p): p for p in model.parameters() if id(p) not in cast}
        try:
            twin = copy.deepcopy(model, shared)
        except (TypeError, RuntimeError, copy.Error):  # unpicklable members
            copies[dtype] = model  # remembered: the next engine does not try again
            return model
        for module in twin.modules():
            if isinstance(module, nn.Linear):
                for name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(param.detach().to(dtype), False))
        copies[dtype] = twin
    return copies[dtype]


_INT8_COPIES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def int8_copy(model: nn.Module) -> nn.Module:
    """The model with its linear layers dynamically quantised to int8 (one copy per model)."""
    if model not in _INT8_COPIES:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # deprecated in favour of torchao, still in torch 2.x
            warnings.simplefilter("ignore")
            _INT8_COPIES[model] = quantize_dynamic(
                copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
            )
    return _INT8_COPIES[model]
