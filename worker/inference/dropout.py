"""Which modules carry dropout, and switching them (and only them) into sampling mode.

Two kinds of dropout live in Hugging Face encoders:

* ``nn.Dropout`` modules on hidden states and embeddings: their own ``training`` flag decides;
* attention-probability dropout: the attention module passes ``dropout_p`` to
  ``scaled_dot_product_attention`` (or ``nn.functional.dropout``) depending on *its own*
  ``training`` flag, and only reads ``self.dropout.p`` from its child. Switching the child alone
  leaves attention deterministic, so the parent attention module is switched too. Attention modules
  have no other behaviour that depends on ``training``.

* dropout inside ``torch.nn`` transformer layers (custom checkpoints such as EmCoder):
  ``nn.MultiheadAttention`` keeps its attention dropout as a float and applies it when its own
  ``training`` flag is set, and ``nn.TransformerEncoderLayer`` in eval mode without gradients
  takes a fused inference kernel that skips every dropout inside the layer, whatever its children
  say. Such layers and attention modules are switched too (their own flag only).

Everything else (layer norms, the rest of the model) stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


FLOAT_DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "attn_dropout", "dropout_p")


def _float_dropout(module: nn.Module) -> float:
    for name in FLOAT_DROPOUT_ATTRIBUTES:
        value = module.__dict__.get(name)
        if isinstance(value, float) and value > 0.0:
            return value
    return 0.0


def _has_dropout_child(module: nn.Module) -> bool:
    return any(
        isinstance(child, DROPOUT_TYPES) and getattr(child, "p", 0.0) > 0.0
        for child in module.children()
    )


def fused_dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose own ``training`` flag decides dropout that ``nn.Dropout`` flags do not."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            if _has_dropout_child(module) or _float_dropout(module.self_attn) > 0.0:
                found.append(module)
        elif isinstance(module, nn.MultiheadAttention):
            if module.dropout > 0.0:
                found.append(module)
        elif (
            "attention" in type(module).__name__.lower()
            and not isinstance(module, DROPOUT_TYPES)
            and not _has_dropout_child(module)
            and _float_dropout(module) > 0.0
        ):
            found.append(module)  # e.g. Hugging Face attention with a float attention_dropout
    return found


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def mc_dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose ``training`` flag turns dropout on, with rate > 0, in model order."""
    parents: dict[str, nn.Module] = dict(model.named_modules())
    chosen: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, DROPOUT_TYPES) or getattr(module, "p", 0.0) <= 0.0:
            continue
        chosen[id(module)] = module
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = parents.get(parent_name)
        if parent is not None and parent is not model and _is_attention(parent):
            chosen[id(parent)] = parent
    for module in fused_dropout_modules(model):
        chosen[id(module)] = module
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(chosen.values(), key=lambda m: order[id(m)])


def has_dropout(model: nn.Module) -> bool:
    return bool(mc_dropout_modules(model))


def set_mc_dropout(model: nn.Module, active: bool) -> list[nn.Module]:
    """Eval mode everywhere, then the dropout carriers in train mode when ``active``."""
    model.eval()
    modules = mc_dropout_modules(model)
    if active:
        for module in modules:
            module.training = True  # not .train(): children (e.g. attention projections) stay eval
    return modules


@contextmanager
def mc_dropout(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Sampling mode inside the block, plain eval mode after it."""
    modules = set_mc_dropout(model, True)
    try:
        yield modules
    finally:
        model.eval()
