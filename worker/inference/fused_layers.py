"""Faster MC passes of BERT-family encoder layers on the CPU in bfloat16 (oneDNN's fused linear).

Profiled on an Intel Xeon with AMX (full MC, 4,096-token passes, the default ensemble), a pass
under autocast spent about a third of its time in the linear layers and the rest around them;
and the linear layers themselves ran at half the speed they reach alone, for three reasons this
module removes:

1. **a new shape costs a new kernel**: oneDNN builds (JIT-compiles) a matmul for every new row
   count, 8.7-11.5 ms against 1.7-2.1 ms for a shape it has seen (4,096 x 384 by 384 x 1,536), and
   MC passes come in many row counts (posts x copies x width), more than the 64 kernels the worker
   lets oneDNN keep (``worker/onednn.py``). Here a pass's rows are padded to a few sizes
   (``padded_rows``: at most 1/8 more rows, 8 sizes per doubling), so after warm-up passes reuse
   their kernels;
2. **weights repacked on every call**: ``F.linear`` hands oneDNN a plain weight that it reorders
   into its blocked layout each time; here each weight is packed once
   (``torch.ops.mkldnn._reorder_linear_weight``), and the bias is added inside the matmul instead
   of copied into the output first (1.1-1.5x the speed of ``F.linear`` at these shapes);
3. **element-wise passes over large tensors**: the feed-forward layer's GELU runs inside the
   matmul (its output written once, not read and written again); query, key and value come from
   one matmul (one cast of the input, not three); each residual connection adds the dropout's
   scale in the same pass as the sum.

What a pass computes is what the Hugging Face layer computes under autocast: matmuls in bfloat16
with float32 accumulation, the residual stream, layer norms and softmax in float32, and the same
dropout masks (``fast_dropout``) drawn in the same order, so a seeded run samples the same
sub-networks. Rounding differs where two steps became one (the GELU and the bias rounded once,
the attention scale applied to the query weights rather than to the scores, the dropout scale
applied in float32): within a bfloat16 rounding of the layer's output, far below the MC noise
(a test). Layers that do not have the expected shape (another architecture, cross-attention,
feed-forward chunking, an activation oneDNN cannot fuse) keep their own forward, and so does
every layer when dropout is off or the model is asked for what this forward does not return
(attention weights, head masks).
"""

from __future__ import annotations

import math
import types
import weakref
from typing import Any

import torch
from torch import nn

from worker.inference.fast_dropout import INTEGER_VIEWS, dropped_share, keep_bits_like, kept_scale

BF16 = torch.bfloat16
MIN_ROW_STEP = 16  # rows are padded to a multiple of this at least
ROW_STEPS_PER_DOUBLING = 8  # at most 1/8 more rows: this many sizes from m to 2m

# Hugging Face activation names -> oneDNN's post-op and its algorithm
ACTIVATIONS = {
    "gelu": ("gelu", "none"),  # the exact (erf) GELU
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu_new": ("gelu", "tanh"),
    "relu": ("relu", ""),
}


def padded_rows(m: int) -> int:
    """``m`` rounded up to the next of a few sizes: multiples of 16, and above 128 rows
    multiples of ``2 ** (bits(m) - 4)`` (at most 1/8 more rows; 8 sizes per doubling)."""
    shift = m.bit_length() - 1 - int(math.log2(ROW_STEPS_PER_DOUBLING))
    step = max(MIN_ROW_STEP, 1 << max(0, shift))
    return -(-m // step) * step


def fused_linear_available() -> bool:
    """Whether this torch has oneDNN's fused linear for bfloat16 on this CPU, and it agrees with
    ``F.linear`` on a small probe."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(32, 64, generator=generator).to(BF16)
        weight = torch.randn(48, 64, generator=generator).to(BF16)
        bias = torch.randn(48, generator=generator).to(BF16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        fused = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        plain = nn.functional.linear(x, weight, bias)
    except (RuntimeError, TypeError, AttributeError):
        return False
    return bool(torch.equal(fused, plain))


class PackedLinear:
    """A linear layer's bfloat16 weight packed once for oneDNN, with its bias (and optionally a
    scale folded into both) and an activation applied inside the matmul."""

    def __init__(self, weights: list[nn.Linear], scales: list[float], activation: str = "") -> None:
        weight = torch.cat(
            [lin.weight.detach().float() * s for lin, s in zip(weights, scales, strict=True)]
        )
        biases = [
            lin.bias.detach().float() * s
            if lin.bias is not None
            else torch.zeros(lin.out_features, device=lin.weight.device)
            for lin, s in zip(weights, scales, strict=True)
        ]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(BF16).contiguous(), None)
        self.bias = torch.cat(biases).to(BF16)
        self.attr, self.algorithm = ACTIVATIONS[activation] if activation else ("none", "")
        self.scalars: list[Any] = [None] if self.attr == "gelu" else []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (padded rows, in) bfloat16, contiguous."""
        return torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, self.attr, self.scalars, self.algorithm
        )


def rows_in_bf16(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` flattened to (m, features) and cast to bfloat16 into a buffer of ``rows`` rows (the
    padding rows zero)."""
    m, features = x.numel() // x.shape[-1], x.shape[-1]
    out = torch.empty(rows, features, dtype=BF16, device=x.device)
    out[m:].zero_()
    out[:m].view(x.shape).copy_(x)
    return out


def drop_(x: torch.Tensor, p: float) -> float:
    """Dropout's mask applied to ``x`` in place (dropped elements +0.0), drawn as
    ``fast_dropout`` draws it; returns the scale the kept elements still need."""
    if p <= 0.0:
        return 1.0
    if dropped_share(p) >= 1.0:
        x.zero_()
        return 0.0
    x.view(INTEGER_VIEWS[x.element_size()]).bitwise_and_(keep_bits_like(x, p))
    return kept_scale(p)


class FusedEncoderLayer:
    """One BERT-family encoder layer's sampling forward on packed bfloat16 weights."""

    def __init__(self, layer: Any, activation: str) -> None:  # duck-typed: fusable_activation
        self.enabled = True  # off: the layer's own forward (set_fused_layers)
        attention, out = layer.attention.self, layer.attention.output
        self.heads = int(attention.num_attention_heads)
        self.head_size = int(attention.attention_head_size)
        scaling = float(getattr(attention, "scaling", self.head_size**-0.5))
        self.qkv = PackedLinear(
            [attention.query, attention.key, attention.value], [scaling, 1.0, 1.0]
        )
        self.attention_dropout: nn.Module = attention.dropout
        self.attention_out = PackedLinear([out.dense], [1.0])
        self.attention_out_dropout: nn.Module = out.dropout
        self.attention_norm: nn.Module = out.LayerNorm
        ffn_in, ffn_out = layer.intermediate.dense, layer.output.dense
        self.intermediate = PackedLinear([ffn_in], [1.0], activation)
        self.output = PackedLinear([ffn_out], [1.0])
        self.output_dropout: nn.Module = layer.output.dropout
        self.output_norm: nn.Module = layer.output.LayerNorm

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, width, size = hidden.shape
        m = batch * width
        rows = padded_rows(m)
        heads, head_size = self.heads, self.head_size
        qkv = self.qkv(rows_in_bf16(hidden, rows))[:m]
        q, k, v = qkv.view(batch, width, 3, heads, head_size).permute(2, 0, 3, 1, 4).contiguous()
        scores = torch.matmul(q, k.transpose(-1, -2))  # the scale is in the query weights
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(BF16)
        scale = drop_(probs, p_of(self.attention_dropout))
        if scale != 1.0:
            probs.mul_(scale)
        context = torch.empty(rows, size, dtype=BF16, device=hidden.device)
        context[m:].zero_()
        context[:m].view(batch, width, heads, head_size).copy_(
            torch.matmul(probs, v).transpose(1, 2)
        )
        attended = self.attention_out(context)[:m]
        scale = drop_(attended, p_of(self.attention_out_dropout))
        hidden = self.attention_norm(torch.add(hidden, attended.view_as(hidden), alpha=scale))
        inner = self.intermediate(rows_in_bf16(hidden, rows))
        out = self.output(inner)[:m]
        scale = drop_(out, p_of(self.output_dropout))
        return self.output_norm(torch.add(hidden, out.view_as(hidden), alpha=scale))


def p_of(dropout: nn.Module) -> float:
    """The dropout rate a dropout module applies now (0 when it is off)."""
    return float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0


def fusable_activation(layer: Any, config: Any) -> str | None:
    """The activation to fuse if ``layer`` has the BERT encoder layer's shape, else None."""
    try:
        attention = layer.attention.self
        parts = [
            attention.query,
            attention.key,
            attention.value,
            layer.attention.output.dense,
            layer.intermediate.dense,
            layer.output.dense,
        ]
        norms = [layer.attention.output.LayerNorm, layer.output.LayerNorm]
        dropouts = [
            attention.dropout,
            layer.attention.output.dropout,
            layer.output.dropout,
        ]
        heads, head_size = int(attention.num_attention_heads), int(attention.attention_head_size)
    except (AttributeError, TypeError, ValueError):
        return None
    activation = getattr(config, "hidden_act", None)
    if (
        not all(isinstance(p, nn.Linear) and p.weight.dtype == BF16 for p in parts)
        or not all(isinstance(n, nn.LayerNorm) for n in norms)
        or not all(isinstance(d, nn.Dropout) for d in dropouts)
        or heads * head_size != parts[0].out_features
        or getattr(layer, "add_cross_attention", False)
        or getattr(config, "is_decoder", False)
        or getattr(layer, "chunk_size_feed_forward", 0)
        or not isinstance(activation, str)
        or activation not in ACTIVATIONS
        or parts[0].weight.device.type != "cpu"
    ):
        return None
    return activation


def install_fused_layers(model: nn.Module, layers: nn.ModuleList | None) -> int:
    """Give each fusable layer of ``model`` (a bfloat16 copy on the CPU) the fused sampling
    forward; returns how many got it. The layer's own forward still runs when its dropout is off
    or when called with anything this forward does not handle."""
    if layers is None or not fused_linear_available():
        return 0
    config = getattr(model, "config", None)
    if getattr(config, "output_attentions", False):
        return 0
    count = 0
    for layer in layers:
        activation = fusable_activation(layer, config)
        if activation is None or layer in _FUSED:
            continue
        _FUSED[layer] = FusedEncoderLayer(layer, activation)
        layer.forward = types.MethodType(_sampling_forward, layer)
        count += 1
    return count


def set_fused_layers(model: nn.Module, enabled: bool) -> None:
    """Use (or not) the fused forward in ``model``'s fused layers."""
    for module in model.modules():
        if (fused := _FUSED.get(module)) is not None:
            fused.enabled = enabled


def has_fused_layers(model: nn.Module) -> bool:
    return any(module in _FUSED for module in model.modules())


def _sampling_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    fused = _FUSED.get(self)
    sampling = fused is not None and fused.enabled and fused.attention_out_dropout.training
    plain = all(a is None for a in args)
    extra = any(v is not None and k not in _IGNORED_KWARGS for k, v in kwargs.items())
    if fused is not None and sampling and plain and not extra and hidden_states.dim() == 3:
        return fused(hidden_states, attention_mask)
    return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)


# keyword arguments the encoder passes that change nothing in an encoder layer's self-attention
_IGNORED_KWARGS = frozenset({"past_key_values", "use_cache", "position_ids", "cache_position"})

_FUSED: weakref.WeakKeyDictionary[nn.Module, FusedEncoderLayer] = weakref.WeakKeyDictionary()
