"""Tiny checkpoints with the architecture of each model family the worker serves, built offline.

Each builder writes a folder laid out like the published hub repository (random weights, hidden
size 32, 2 layers, a ~200-word vocabulary):

=========================  =============================================================
``build_roberta``          SamLowe/roberta-base-go_emotions: RobertaForSequenceClassification
``build_distilbert``       BruceIC/emoticare: DistilBertForSequenceClassification
``build_emcoder``          yezdata/EmCoder: remote code (``auto_map``), an ``nn.TransformerEncoder``
                           with ``mc_forward``; ``thresholds.json`` as ``{"label": {"p": t}}``
``build_hidden_states``    Hidden-States/roberta-base-semeval: remote code returning
                           ``(embeddings, logits)`` over the 11 SemEval-2018 E-c labels
``build_bge_encoder`` +    BAAI/bge-small-en-v1.5 (a BertModel) and SamLowe's ONNX head: input
``build_onnx_head``        ``logits`` (B, 384), one (B, 2) output per label named after it
``build_onnx_classifier``  an exported sequence classifier: ``model.onnx`` with input_ids and
                           attention_mask in, ``logits`` out, no torch weights
=========================  =============================================================
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from schemas.labels import GOEMOTIONS_LABELS
from schemas.labels import SEMEVAL_2018_EC_LABELS as SEMEVAL_LABELS

HIDDEN = 32
LAYERS = 2
HEADS = 2
FFN = 64
MAX_POSITIONS = 160  # the tests run with max_length <= 128 (+2 for RoBERTa's padding offset)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_WORDS = """
i love this so much thank you terrible and am furious ok what did not expect that at all wow
sorry for your loss is heartbreaking meh whatever say guess sure it matters to anyone here
honestly great job everyone why would do confused a bit scared made my day can't believe they
again annoying see coming the saddest thing have read week lol hilarious think good idea really
nervous about tomorrow's interview proud of miss grandmother every single day happy sad angry
afraid hope trust joy fear anger surprise disgust calm worried excited amazing awful best worst
he she we they me him her them our their be was were been being not no yes maybe please thanks
"""


def vocabulary() -> list[str]:
    words = sorted(set(re.findall(r"[a-z']+|[^\sa-z']", _WORDS.lower())))
    return SPECIALS + [w for w in words if w not in SPECIALS] + list("!?.,'…")


def save_tokenizer(folder: Path, model_max_length: int = 128) -> int:
    """A WordLevel tokenizer (BERT-style specials) saved as tokenizer.json; returns its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(folder))
    return len(vocab)


def _label_maps(labels: tuple[str, ...]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {n: i for i, n in enumerate(labels)},
        "problem_type": "multi_label_classification",
    }


def _spread_head(linear: torch.nn.Linear) -> None:
    """Larger head weights so that probabilities spread across (0, 1) and differ per post."""
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.8)
        linear.bias.normal_(-0.5, 0.5)


def write_thresholds(folder: Path, payload: Any) -> None:
    (folder / "thresholds.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")


# -- standard Hugging Face classes -----------------------------------------------------------------


def build_roberta(folder: Path, seed: int = 1) -> Path:
    """RobertaForSequenceClassification with per-label thresholds (SamLowe's published model)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    config = RobertaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS + 2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **_label_maps(GOEMOTIONS_LABELS),
    )
    model = RobertaForSequenceClassification(config)
    _spread_head(model.classifier.out_proj)
    model.save_pretrained(str(folder))
    write_thresholds(folder, {n: 0.5 if i % 3 else 0.3 for i, n in enumerate(GOEMOTIONS_LABELS)})
    return folder


def build_distilbert(folder: Path, seed: int = 2) -> Path:
    """DistilBertForSequenceClassification (EmotiCare); no thresholds file: 0.5 for all."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    config = DistilBertConfig(
        vocab_size=vocab,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FFN,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        **_label_maps(GOEMOTIONS_LABELS),
    )
    model = DistilBertForSequenceClassification(config)
    _spread_head(model.classifier)
    model.save_pretrained(str(folder))
    return folder


# -- remote code ----------------------------------------------------------------------------------

EMCODER_CONFIGURATION = """
from transformers import PretrainedConfig


class EmCoderConfig(PretrainedConfig):
    model_type = "emcoder"

    def __init__(self, vocab_size=100, max_seq_len=160, d_model=32, n_head=2, n_layers=2,
                 d_ffn=64, dropout=0.1, **kwargs):
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.d_model = d_model
        self.n_head = n_head
        self.n_layers = n_layers
        self.d_ffn = d_ffn
        self.dropout = dropout
        super().__init__(**kwargs)
"""

# The published EmCoder: nn.TransformerEncoder (pre-norm, GELU), masked mean pooling, an MLP head
# with dropout, forward returning a plain logits tensor, and its own mc_forward.
EMCODER_MODELING = """
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_emcoder import EmCoderConfig


class EmCoderCore(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.embed_norm = nn.LayerNorm(config.d_model)
        layer = nn.TransformerEncoderLayer(
            d_model=config.d_model, nhead=config.n_head, dim_feedforward=config.d_ffn,
            dropout=config.dropout, activation="gelu", norm_first=True, batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=config.n_layers,
                                             enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.pos_embedding(positions)[None]
        x = self.dropout(self.embed_norm(x))
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.final_norm(x)


class EmCoderModel(PreTrainedModel):
    config_class = EmCoderConfig
    base_model_prefix = "emcoder"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = EmCoderCore(config)
        self.classifier = nn.Sequential(
            nn.Linear(config.d_model, config.d_model),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.d_model, config.num_labels),
        )
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, 0.3)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, 1.0)

    @staticmethod
    def _masked_mean_pooling(features, mask):
        mask = mask.unsqueeze(-1).to(features.dtype)
        return (features * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def _set_mc_dropout(self, active=True):
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.train(active)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features = self.encoder(input_ids, attention_mask)
        return self.classifier(self._masked_mean_pooling(features, attention_mask))

    def mc_forward(self, input_ids, attention_mask, n_samples, max_batch_size=None):
        self._set_mc_dropout(True)
        rows = input_ids.shape[0]
        ids = input_ids.repeat(n_samples, 1)
        mask = attention_mask.repeat(n_samples, 1)
        step = (max_batch_size or n_samples) * rows
        logits = torch.cat([self.forward(ids[i:i + step], mask[i:i + step])
                            for i in range(0, len(ids), step)])
        return logits.view(n_samples, rows, -1)
"""

HIDDEN_STATES_MODELING = '''
import torch
from torch import nn
from transformers import RobertaModel, RobertaPreTrainedModel


class RobertaSemEvalModel(RobertaPreTrainedModel):
    """A RoBERTa encoder, a projection for the contrastive objective and a linear classifier."""

    def __init__(self, config):
        super().__init__(config)
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cls = self.dropout(hidden[:, 0])
        embeddings = nn.functional.normalize(self.projection(cls), dim=-1)
        return embeddings, self.classifier(cls)
'''


def _remote_code_model(folder: Path, seed: int) -> Any:
    """Instantiate the checkpoint's own code the way a user with trust_remote_code would."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    torch.manual_seed(seed)
    return AutoModel.from_config(config, trust_remote_code=True)


def _save_remote_code_model(model: Any, folder: Path, config_json: dict[str, Any]) -> None:
    model.save_pretrained(str(folder))
    # save_pretrained rewrites config.json; keep the hand-written auto_map and fields
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    saved.update(config_json)
    (folder / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")


def build_emcoder(folder: Path, seed: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    (folder / "configuration_emcoder.py").write_text(EMCODER_CONFIGURATION, encoding="utf-8")
    (folder / "modeling_emcoder.py").write_text(EMCODER_MODELING, encoding="utf-8")
    config_json: dict[str, Any] = {
        "model_type": "emcoder",
        "architectures": ["EmCoderModel"],
        "auto_map": {
            "AutoConfig": "configuration_emcoder.EmCoderConfig",
            "AutoModel": "modeling_emcoder.EmCoderModel",
        },
        "vocab_size": vocab,
        "max_seq_len": MAX_POSITIONS,
        "d_model": HIDDEN,
        "n_head": HEADS,
        "n_layers": LAYERS,
        "d_ffn": FFN,
        "dropout": 0.1,
        **_label_maps(GOEMOTIONS_LABELS),
    }
    config_json["id2label"] = {str(k): v for k, v in config_json["id2label"].items()}
    (folder / "config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
    _save_remote_code_model(_remote_code_model(folder, seed), folder, config_json)
    write_thresholds(  # the published file's layout: {"label": {"p": threshold, "f1": ...}}
        folder,
        {n: {"p": 0.5 if i % 4 else 0.3857, "f1": 0.5} for i, n in enumerate(GOEMOTIONS_LABELS)},
    )
    return folder


def build_hidden_states(folder: Path, seed: int = 4, with_label_names: bool = False) -> Path:
    """A RoBERTa config (model_type ``roberta``) whose ``auto_map`` names custom code returning
    ``(embeddings, logits)``. Like the published card, the label names live in the README, not in
    ``config.json`` (unless ``with_label_names``)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    (folder / "modeling_semeval.py").write_text(HIDDEN_STATES_MODELING, encoding="utf-8")
    config_json: dict[str, Any] = {
        "model_type": "roberta",
        "architectures": ["RobertaSemEvalModel"],
        "auto_map": {"AutoModel": "modeling_semeval.RobertaSemEvalModel"},
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FFN,
        "max_position_embeddings": MAX_POSITIONS + 2,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    if with_label_names:
        maps = _label_maps(SEMEVAL_LABELS)
        config_json["id2label"] = {str(k): v for k, v in maps["id2label"].items()}
        config_json["label2id"] = maps["label2id"]
    else:
        config_json["id2label"] = {str(i): f"LABEL_{i}" for i in range(len(SEMEVAL_LABELS))}
        config_json["label2id"] = {f"LABEL_{i}": i for i in range(len(SEMEVAL_LABELS))}
    (folder / "config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
    model = _remote_code_model(folder, seed)
    _spread_head(model.classifier)
    _save_remote_code_model(model, folder, config_json)
    return folder


# -- BGE encoder + ONNX head ----------------------------------------------------------------------


def build_bge_encoder(folder: Path, seed: int = 5) -> Path:
    """A BertModel with sentence-transformers' CLS pooling files (like BAAI/bge-small-en-v1.5)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(str(folder))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": True}),
        encoding="utf-8",
    )
    return folder


def build_onnx_head(
    folder: Path,
    labels: tuple[str, ...] = GOEMOTIONS_LABELS,
    dim: int = HIDDEN,
    seed: int = 6,
    label_order: list[int] | None = None,
) -> Path:
    """SamLowe's head layout: input ``logits`` (B, dim) float32; per label an output named after it,
    (B, 2) = [P(negative), P(positive)], from a linear layer and a sigmoid. Outputs come in
    ``label_order`` (the published head lists ``surprise`` first)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # unit-norm inputs: weights large enough that probabilities spread
    weight = rng.normal(0.0, 4.0, size=(dim, len(labels))).astype(np.float32)
    bias = rng.normal(-0.5, 0.5, size=(len(labels),)).astype(np.float32)
    order = label_order or list(range(len(labels)))
    nodes = [
        helper.make_node("MatMul", ["logits", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
    ]
    outputs = []
    for j in order:
        name = labels[j]
        nodes += [
            helper.make_node("Gather", ["p", f"i{j}"], [f"p{j}"], axis=1),
            helper.make_node("Gather", ["q", f"i{j}"], [f"q{j}"], axis=1),
            helper.make_node("Concat", [f"q{j}", f"p{j}"], [name], axis=1),
        ]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2]))
    initializers = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.ones((1,), dtype=np.float32), "one"),
    ] + [numpy_helper.from_array(np.asarray([j], dtype=np.int64), f"i{j}") for j in order]
    graph = helper.make_graph(
        nodes,
        "emotion_head",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", dim])],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    write_thresholds(folder, {n: 0.25 if i % 2 else 0.5 for i, n in enumerate(labels)})
    return folder


def build_onnx_classifier(folder: Path, seed: int = 7) -> Path:
    """A tiny RoBERTa classifier exported to ONNX (like SamLowe/roberta-base-go_emotions-onnx):
    model.onnx, config.json with id2label and the tokenizer; no torch weights in the folder."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab = save_tokenizer(folder)
    labels = GOEMOTIONS_LABELS
    rng = np.random.default_rng(seed)
    # mean of token embeddings over the attention mask, a linear layer: logits (B, L)
    emb = rng.normal(0.0, 1.0, size=(vocab, HIDDEN)).astype(np.float32)
    weight = rng.normal(0.0, 0.8, size=(HIDDEN, len(labels))).astype(np.float32)
    bias = rng.normal(-0.5, 0.5, size=(len(labels),)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["tok"], axis=0),  # (B, T, H)
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),  # (B, T)
        helper.make_node("Unsqueeze", ["m", "ax2"], ["m3"]),  # (B, T, 1)
        helper.make_node("Mul", ["tok", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "ax1"], ["summed"], keepdims=0),  # (B, H)
        helper.make_node("ReduceSum", ["m3", "ax1"], ["count0"], keepdims=0),  # (B, 1)
        helper.make_node("Max", ["count0", "eps"], ["count"]),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "onnx_classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", len(labels)])],
        initializer=[
            numpy_helper.from_array(emb, "E"),
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.asarray([2], dtype=np.int64), "ax2"),
            numpy_helper.from_array(np.asarray([1], dtype=np.int64), "ax1"),
            numpy_helper.from_array(np.asarray([1.0], dtype=np.float32), "eps"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    maps = _label_maps(labels)
    config = {
        "model_type": "roberta",
        "architectures": ["RobertaForSequenceClassification"],
        **maps,
        "id2label": {str(k): v for k, v in maps["id2label"].items()},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
