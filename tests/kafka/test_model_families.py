"""Every model family the product grew from runs through configuration alone, offline.

Tiny checkpoints with each family's architecture and file layout (``families/builders.py``) go
through ``load_classifier`` and the MC Dropout engine, file mode (``emoworker classify``'s code
path) and, for two of them, the Kafka worker.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from support.families import builders
from support.families.builders import SEMEVAL_LABELS
from support.harness import Topics, make_topics, running
from support.kafka_cluster import KafkaCluster
from support.streams import post_bytes, produce, read_all, values
from support.texts import EXAMPLE_TEXTS
from torch import nn

from schemas import EnrichedPost
from schemas.labels import GOEMOTIONS_LABELS
from worker.bundle import read_thresholds
from worker.decoding import DecodeLimits
from worker.file_mode import classify_stream
from worker.inference.adapters import (
    AdapterSpecError,
    EncoderOnnxHeadAdapter,
    OnnxClassifierAdapter,
    OutputAdapter,
    TupleOutputAdapter,
    parse_adapter,
)
from worker.inference.dropout import fused_dropout_modules, mc_dropout_modules, set_mc_dropout
from worker.inference.engine import EngineConfig, McDropoutEngine, pad
from worker.inference.loading import (
    Classifier,
    ModelLoadError,
    load_classifier,
)
from worker.inference.onnx_models import EncoderWithOnnxHead, OnnxSequenceClassifier
from worker.pipeline import Pipeline
from worker.processing import BatchProcessor
from worker.settings import ModelSettings, WorkerSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 4


@dataclass(frozen=True)
class Row:
    """One model family: how its checkpoint is configured, what the worker must make of it."""

    id: str
    folder: str  # key of the built checkpoint in ``family_dirs``
    settings: Callable[[dict[str, Path]], dict[str, Any]]
    labels: tuple[str, ...]
    mc: bool  # the model has dropout the engine samples


ROWS = [
    Row("roberta", "roberta", lambda d: {"path": str(d["roberta"])}, GOEMOTIONS_LABELS, True),
    Row(
        "distilbert",
        "distilbert",
        lambda d: {"path": str(d["distilbert"])},
        GOEMOTIONS_LABELS,
        True,
    ),
    Row(
        "emcoder",
        "emcoder",
        lambda d: {"path": str(d["emcoder"]), "trust_remote_code": True},
        GOEMOTIONS_LABELS,
        True,
    ),
    Row(
        "hidden_states",
        "hidden_states",
        lambda d: {
            "path": str(d["hidden_states"]),
            "trust_remote_code": True,
            "adapter": "tuple:1,labels=semeval2018",
        },
        SEMEVAL_LABELS,
        True,
    ),
    Row(
        "bge_onnx_head",
        "bge",
        lambda d: {
            "path": str(d["bge"]),
            "adapter": f"encoder_onnx_head:{d['bge_head'] / 'model.onnx'}",
        },
        GOEMOTIONS_LABELS,
        True,
    ),
    Row("onnx_classifier", "onnx", lambda d: {"path": str(d["onnx"])}, GOEMOTIONS_LABELS, False),
]
ROW_IDS = [r.id for r in ROWS]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("families")
    return {
        "roberta": builders.build_roberta(root / "roberta"),
        "distilbert": builders.build_distilbert(root / "distilbert"),
        "emcoder": builders.build_emcoder(root / "emcoder"),
        "hidden_states": builders.build_hidden_states(root / "hidden_states"),
        "bge": builders.build_bge_encoder(root / "bge"),
        "bge_head": builders.build_onnx_head(root / "bge_head"),
        "onnx": builders.build_onnx_classifier(root / "onnx"),
    }


def model_settings(row: Row, dirs: dict[str, Path], **extra: Any) -> ModelSettings:
    return ModelSettings.model_validate(
        {"device": "cpu", "n_samples": N, "seed": 11, **row.settings(dirs), **extra}
    )


@pytest.fixture(scope="module")
def classifiers(family_dirs: dict[str, Path]) -> dict[str, Classifier]:
    return {row.id: load_classifier(model_settings(row, family_dirs)) for row in ROWS}


@pytest.fixture(params=ROWS, ids=ROW_IDS)
def row(request: pytest.FixtureRequest) -> Row:
    param: Row = request.param
    return param


def tokens(classifier: Classifier) -> list[list[int]]:
    return classifier.tokenize(EXAMPLE_TEXTS)


# -- (a) load_classifier + the engine --------------------------------------------------------------


def test_labels_and_mc_dropout(row: Row, classifiers: dict[str, Classifier]) -> None:
    classifier = classifiers[row.id]
    assert classifier.label_names == list(row.labels)
    assert classifier.thresholds.shape == (len(row.labels),)
    assert classifier.supports_mc is row.mc
    engine = McDropoutEngine(classifier, EngineConfig(n_samples=N, mode="full", seed=3))
    summary = engine.predict(tokens(classifier))
    assert summary.mean.shape == (len(EXAMPLE_TEXTS), len(row.labels))
    assert np.all((summary.mean >= 0) & (summary.mean <= 1))
    if row.mc:
        assert engine.mode == "full" and engine.n_samples == N
        assert (summary.n_samples == N).all()
        assert (summary.std.max(axis=1) > 0).all(), "every post's samples differ somewhere"
    else:
        assert engine.mode == "off" and engine.n_samples == 1
        assert (summary.n_samples == 1).all()
        assert (summary.std == 0).all()
        again = McDropoutEngine(classifier, EngineConfig(n_samples=N, seed=99)).predict(
            tokens(classifier)
        )
        np.testing.assert_array_equal(summary.mean, again.mean)


def test_two_mc_passes_differ_and_eval_passes_agree(
    row: Row, classifiers: dict[str, Classifier]
) -> None:
    classifier = classifiers[row.id]
    ids, mask = pad(tokens(classifier), classifier.pad_id, classifier.device)
    with torch.inference_mode():
        set_mc_dropout(classifier.model, False)
        first, second = (classifier.probabilities(ids, mask) for _ in range(2))
        assert torch.equal(first, second), "eval mode is deterministic"
        set_mc_dropout(classifier.model, True)
        try:
            a, b = (classifier.probabilities(ids, mask) for _ in range(2))
        finally:
            classifier.model.eval()
    assert a.shape == (len(EXAMPLE_TEXTS), len(row.labels))
    assert (not torch.equal(a, b)) is row.mc


def test_same_seed_same_samples(row: Row, classifiers: dict[str, Classifier]) -> None:
    classifier = classifiers[row.id]
    runs = [
        McDropoutEngine(classifier, EngineConfig(n_samples=N, seed=5)).predict(tokens(classifier))
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].mean, runs[1].mean)
    np.testing.assert_array_equal(runs[0].std, runs[1].std)


def test_thresholds_come_from_each_familys_file(classifiers: dict[str, Classifier]) -> None:
    roberta = classifiers["roberta"].thresholds  # {"label": t}
    assert roberta[0] == pytest.approx(0.3) and roberta[1] == pytest.approx(0.5)
    emcoder = classifiers["emcoder"].thresholds  # {"label": {"p": t, "f1": ...}}
    assert emcoder[0] == pytest.approx(0.3857) and emcoder[1] == pytest.approx(0.5)
    head = classifiers["bge_onnx_head"].thresholds  # thresholds.json next to the head
    assert head[0] == pytest.approx(0.5) and head[1] == pytest.approx(0.25)
    assert (classifiers["distilbert"].thresholds == 0.5).all()  # no file: 0.5
    assert (classifiers["hidden_states"].thresholds == 0.5).all()


def test_revisions_are_content_hashes(classifiers: dict[str, Classifier]) -> None:
    revisions = {name: c.revision for name, c in classifiers.items()}
    assert all(r and r.startswith("sha256:") for r in revisions.values()), revisions
    assert len(set(revisions.values())) == len(revisions)


# -- which modules sample --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "attention"), [("roberta", "RobertaSelfAttention"), ("distilbert", "DistilBert")]
)
def test_standard_encoders_sample_every_dropout_and_attention(
    classifiers: dict[str, Classifier], name: str, attention: str
) -> None:
    model = classifiers[name].model
    chosen = mc_dropout_modules(model)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    attentions = [m for m in chosen if not isinstance(m, nn.Dropout)]
    assert {id(m) for m in dropouts} <= {id(m) for m in chosen}
    # the attention module owns the attention-probability dropout (its own training flag)
    assert len(attentions) == model.config.num_hidden_layers
    assert all(type(m).__name__.startswith(attention) for m in attentions), attentions
    assert all(hasattr(m, "dropout") for m in attentions)
    assert fused_dropout_modules(model) == []


def test_torch_transformer_layers_sample_their_dropout(
    classifiers: dict[str, Classifier],
) -> None:
    """EmCoder is built on nn.TransformerEncoderLayer: in eval mode without gradients the layer
    takes a fused kernel that skips its dropout, whatever its nn.Dropout children say. With
    the embedding and head dropout off, MC samples must still differ (the encoder samples)."""
    classifier = classifiers["emcoder"]
    model: Any = classifier.model
    fused = fused_dropout_modules(model)
    layers = [m for m in fused if isinstance(m, nn.TransformerEncoderLayer)]
    attention = [m for m in fused if isinstance(m, nn.MultiheadAttention)]
    assert len(layers) == len(attention) == 2
    outside = [model.encoder.dropout, model.classifier[2]]
    saved = [m.p for m in outside]
    for m in outside:
        m.p = 0.0
    ids, mask = pad(tokens(classifier), classifier.pad_id, classifier.device)
    try:
        with torch.inference_mode():
            set_mc_dropout(model, True)
            a, b = (classifier.probabilities(ids, mask) for _ in range(2))
            assert all(m.training for m in fused), "torch.nn layers sample with the rest"
            set_mc_dropout(model, False)
            c, d = (classifier.probabilities(ids, mask) for _ in range(2))
    finally:
        for m, p in zip(outside, saved, strict=True):
            m.p = p
        model.eval()
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


def test_encoder_head_is_the_onnx_head_over_normalised_cls(
    classifiers: dict[str, Classifier], family_dirs: dict[str, Path]
) -> None:
    import onnxruntime as ort

    classifier = classifiers["bge_onnx_head"]
    model = classifier.model
    assert isinstance(model, EncoderWithOnnxHead)
    assert (model.pooling, model.normalize) == ("cls", True)  # from 1_Pooling/config.json
    ids, mask = pad(tokens(classifier), classifier.pad_id, classifier.device)
    with torch.inference_mode():
        model.eval()
        probs = classifier.probabilities(ids, mask).numpy()
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    embeddings = (hidden / hidden.norm(dim=-1, keepdim=True)).numpy()
    session = ort.InferenceSession(str(family_dirs["bge_head"] / "model.onnx"))
    outputs = session.run(None, {"logits": embeddings})
    expected = np.stack([o[:, 1] for o in outputs], axis=1)  # the positive column per label
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_onnx_head_labels_follow_its_output_order(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    order = [26, *range(26), 27]  # the published head lists "surprise" first
    head = builders.build_onnx_head(tmp_path / "head", label_order=order)
    settings = ModelSettings(
        path=str(family_dirs["bge"]), device="cpu", adapter=f"encoder_onnx_head:{head}/model.onnx"
    )
    reordered = load_classifier(settings)
    assert reordered.label_names == [GOEMOTIONS_LABELS[j] for j in order]
    # thresholds are matched by name, not position
    expected = {n: 0.25 if i % 2 else 0.5 for i, n in enumerate(GOEMOTIONS_LABELS)}
    assert list(reordered.thresholds) == [expected[n] for n in reordered.label_names]


def test_onnx_classifier_is_sigmoid_of_its_logits(classifiers: dict[str, Classifier]) -> None:
    classifier = classifiers["onnx_classifier"]
    assert isinstance(classifier.model, OnnxSequenceClassifier)
    assert isinstance(classifier.adapter, OnnxClassifierAdapter)  # auto-detected
    ids, mask = pad(tokens(classifier), classifier.pad_id, classifier.device)
    with torch.inference_mode():
        logits = classifier.model(ids, mask)
        probs = classifier.probabilities(ids, mask)
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_auto_finds_the_logits_in_a_tuple_by_shape(
    family_dirs: dict[str, Path], classifiers: dict[str, Classifier]
) -> None:
    auto = load_classifier(
        ModelSettings(
            path=str(family_dirs["hidden_states"]),
            device="cpu",
            trust_remote_code=True,
            adapter="labels=semeval2018",
        )
    )
    assert type(auto.adapter) is OutputAdapter
    explicit = classifiers["hidden_states"]
    ids, mask = pad(tokens(auto), auto.pad_id, auto.device)
    with torch.inference_mode():
        torch.testing.assert_close(auto.probabilities(ids, mask), explicit.probabilities(ids, mask))


# -- (b) file mode: ``emoworker classify`` ---------------------------------------------------------


def jsonl(n: int) -> bytes:
    lines = [orjson.dumps({"id": f"p{i}", "text": EXAMPLE_TEXTS[i % 8]}) for i in range(n)]
    return b"\n".join([*lines, b"not json"]) + b"\n"


def test_classify_file(row: Row, family_dirs: dict[str, Path]) -> None:
    settings = WorkerSettings.model_validate(
        {
            "model": {"device": "cpu", "n_samples": N, "seed": 1, **row.settings(family_dirs)},
            "review": {"target_rate": None},
            "http_port": 0,
            "worker_id": "file-test",
        }
    )
    processor = BatchProcessor(load_classifier(settings.model), settings)
    enriched, dead = io.BytesIO(), io.BytesIO()
    stats = classify_stream(
        io.BytesIO(jsonl(10)),
        "mem.jsonl",
        processor,
        DecodeLimits(settings.max_message_bytes, settings.max_text_chars),
        enriched.write,
        dead.write,
        batch_size=4,
    )
    assert (stats.enriched, stats.dead_lettered) == (10, 1)
    events = [orjson.loads(line) for line in enriched.getvalue().splitlines()]
    assert [e["id"] for e in events] == [f"p{i}" for i in range(10)]
    n_samples = N if row.mc else 1
    for event in events:
        EnrichedPost.model_validate(event)
        assert [e["label"] for e in event["emotions"]] == list(row.labels)
        assert event["model"]["n_samples"] == n_samples
        assert event["model"]["mc_mode"] == ("full" if row.mc else "off")
        assert event["uncertainty"]["n_samples"] == n_samples
        if row.mc:
            assert event["uncertainty"]["mutual_information"] is not None
            assert all(e["uncertainty"] is not None for e in event["emotions"])
        else:
            assert event["uncertainty"]["mutual_information"] is None
            # the default score (expected risk) needs no MC spread: defined for one pass
            assert 0.0 <= event["uncertainty"]["review_score"] <= 1.0
            assert all(e["uncertainty"] is None for e in event["emotions"])
            assert all(e["flip_rate"] is None for e in event["emotions"])


# -- (c) the Kafka worker --------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.parametrize("row_id", ["hidden_states", "bge_onnx_head"])
async def test_kafka_worker_serves_the_family(
    row_id: str,
    kafka: KafkaCluster,
    topics: Topics,
    make_settings: Callable[..., WorkerSettings],
    family_dirs: dict[str, Path],
) -> None:
    row = next(r for r in ROWS if r.id == row_id)
    await make_topics(kafka, topics, partitions=2)
    n = 24
    await produce(kafka.bootstrap_servers, topics.input, [post_bytes(i) for i in range(n)])
    settings = make_settings(model={"n_samples": N, **row.settings(family_dirs)})
    pipeline = Pipeline(settings)  # the worker loads the model from its settings
    async with running(pipeline) as task:
        enriched = values(await read_all(kafka.bootstrap_servers, topics.enriched, expect=n))
        assert not task.done()
    assert await task == 0
    assert {e["id"] for e in enriched} == {f"post-{i}" for i in range(n)}
    for event in enriched:
        EnrichedPost.model_validate(event)
        assert len(event["emotions"]) == len(row.labels)
        assert [e["label"] for e in event["emotions"]] == list(row.labels)
        assert event["uncertainty"]["n_samples"] == N
        assert event["model"]["name"] == str(family_dirs[row.folder])


# -- refusals and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["emcoder", "hidden_states"])
def test_remote_code_needs_the_setting(family_dirs: dict[str, Path], folder: str) -> None:
    """Off by default: one error naming the setting. Hidden-States' model_type is ``roberta``:
    without the guard transformers would silently build a plain RobertaModel without its head."""
    settings = ModelSettings(path=str(family_dirs[folder]), device="cpu", adapter="tuple:1")
    with pytest.raises(ModelLoadError) as info:
        load_classifier(settings)
    message = str(info.value)
    assert "EMOWORKER_MODEL__TRUST_REMOTE_CODE=true" in message
    assert "\n" not in message


def test_pickle_weights_are_refused(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((family_dirs["roberta"] / name).read_bytes())
    torch.save(
        load_file(str(family_dirs["roberta"] / "model.safetensors")), folder / "pytorch_model.bin"
    )
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_classifier(ModelSettings(path=str(folder), device="cpu"))


def test_a_label_count_that_does_not_fit_the_output_is_refused(
    family_dirs: dict[str, Path],
) -> None:
    settings = ModelSettings(
        path=str(family_dirs["hidden_states"]),
        device="cpu",
        trust_remote_code=True,
        adapter="tuple:1,labels=goemotions",
    )
    with pytest.raises(ModelLoadError, match="gives 11 scores per post but 28 label names"):
        load_classifier(settings)


def test_the_wrong_tuple_element_is_refused(family_dirs: dict[str, Path]) -> None:
    settings = ModelSettings(
        path=str(family_dirs["hidden_states"]),
        device="cpu",
        trust_remote_code=True,
        adapter="tuple:0,labels=semeval2018",  # the embeddings
    )
    with pytest.raises(ModelLoadError, match="32 scores per post but 11"):
        load_classifier(settings)


def test_an_encoder_is_no_classifier(family_dirs: dict[str, Path]) -> None:
    """A bare encoder through ``auto`` would get a random classification head: refused."""
    with pytest.raises(ModelLoadError, match="lacks weights"):
        load_classifier(ModelSettings(path=str(family_dirs["bge"]), device="cpu"))


def test_a_head_for_another_encoder_is_refused(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    head = builders.build_onnx_head(tmp_path / "head384", dim=384)
    settings = ModelSettings(
        path=str(family_dirs["bge"]), device="cpu", adapter=f"encoder_onnx_head:{head}/model.onnx"
    )
    with pytest.raises(ModelLoadError, match="384-dimensional"):
        load_classifier(settings)


def test_bad_adapter_spec_is_one_clear_error(family_dirs: dict[str, Path]) -> None:
    settings = ModelSettings(path=str(family_dirs["roberta"]), device="cpu", adapter="tuple:x")
    with pytest.raises(ModelLoadError, match="EMOWORKER_MODEL__ADAPTER"):
        load_classifier(settings)


# -- the adapter spec -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "described"),
    [
        (None, OutputAdapter, "auto"),
        ("", OutputAdapter, "auto"),
        ("auto", OutputAdapter, "auto"),
        ("labels=semeval2018", OutputAdapter, "auto,labels=semeval2018"),
        ("tuple:1", TupleOutputAdapter, "tuple:1"),
        ("tuple:0, labels=a|b|c", TupleOutputAdapter, "tuple:0,labels=a|b|c"),
        ("onnx", OnnxClassifierAdapter, "onnx"),
        ("onnx:onnx/model_quantized.onnx", OnnxClassifierAdapter, "onnx:onnx/model_quantized.onnx"),
        ("onnx,activation=none", OnnxClassifierAdapter, "onnx,activation=none"),
        ("encoder_onnx_head:/m/h.onnx", EncoderOnnxHeadAdapter, "encoder_onnx_head:/m/h.onnx"),
        (
            "encoder_onnx_head:/m/h.onnx,pooling=mean,normalize=false",
            EncoderOnnxHeadAdapter,
            "encoder_onnx_head:/m/h.onnx,pooling=mean,normalize=false",
        ),
        (
            "encoder_onnx_head:hf://SamLowe/bge-small-en-v1.5-go_emotions-classifier-onnx/model.onnx",
            EncoderOnnxHeadAdapter,
            "encoder_onnx_head:hf://SamLowe/bge-small-en-v1.5-go_emotions-classifier-onnx/model.onnx",
        ),
    ],
)
def test_adapter_specs(spec: str | None, kind: type, described: str) -> None:
    adapter = parse_adapter(spec)
    assert type(adapter) is kind
    assert adapter.describe() == described
    assert parse_adapter(adapter.describe()).describe() == described


def test_model_classes_per_spec() -> None:
    standard = {"model_type": "roberta"}
    custom = {"model_type": "emcoder", "auto_map": {"AutoModel": "m.EmCoder"}}
    assert parse_adapter("auto").model_class_name(standard) == "AutoModelForSequenceClassification"
    assert parse_adapter("auto").model_class_name(custom) == "AutoModel"
    assert parse_adapter("tuple:1").model_class_name(standard) == "AutoModel"
    assert parse_adapter("encoder_onnx_head:h.onnx").model_class_name(standard) == "AutoModel"
    assert parse_adapter("onnx").supports_mc is False


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tuple:x", "integer"),
        ("bogus", "unknown model adapter"),
        ("encoder_onnx_head", "needs the head"),
        ("encoder_onnx_head:h.onnx,pooling=max", "cls or mean"),
        ("encoder_onnx_head:h.onnx,normalize=maybe", "true or false"),
        ("tuple:1,pooling=cls", "does not take"),
        ("onnx,activation=softmax", "sigmoid or none"),
        ("auto,labels=nonsense", "no preset"),
        ("auto,labels", "name=value"),
    ],
)
def test_bad_adapter_specs(spec: str, message: str) -> None:
    with pytest.raises(AdapterSpecError, match=message):
        parse_adapter(spec)


def test_labels_from_a_file(tmp_path: Path) -> None:
    listed = tmp_path / "labels.json"
    listed.write_text(json.dumps(list(SEMEVAL_LABELS)))
    assert parse_adapter(f"tuple:1,labels={listed}").resolve_label_names(None, None) == list(
        SEMEVAL_LABELS
    )
    lines = tmp_path / "labels.txt"
    lines.write_text("a\nb\n\nc\n")
    assert parse_adapter(f"labels={lines}").resolve_label_names(None, None) == ["a", "b", "c"]


# -- thresholds files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"b": 0.3},
        {"b": {"p": 0.3, "f1": 0.7}},
        {"thresholds": {"b": 0.3}},
        [{"label": "b", "threshold": 0.3}],
        [0.5, 0.3, 0.5],
        [{"p": 0.5}, {"p": 0.3}, {"p": 0.5}],
    ],
)
def test_threshold_file_layouts(tmp_path: Path, payload: Any) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(payload))
    assert list(read_thresholds(path, ["a", "b", "c"])) == [0.5, 0.3, 0.5]


@pytest.mark.parametrize(
    ("payload", "message"),
    [({"z": 0.3}, "does not have"), ({"a": 1.5}, "strictly between"), ([0.5], "1 thresholds")],
)
def test_bad_threshold_files(tmp_path: Path, payload: Any, message: str) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        read_thresholds(path, ["a", "b", "c"])


# -- bundles still load (a delta bundle's base has no head: its weights come from the delta) -------


@pytest.mark.parametrize("kind", ["delta", "full"])
def test_bundles_load_through_the_same_path(
    test_model_dir: Path, test_classifier: Classifier, tmp_path: Path, kind: str
) -> None:
    from worker.training.export import export_bundle
    from worker.training.train import default_base_model

    bundle = tmp_path / "bundle"
    export_bundle(
        test_classifier.model,
        test_classifier.tokenizer,
        bundle,
        base_model=default_base_model(),
        kind=kind,  # type: ignore[arg-type]
        label_names=test_classifier.label_names,
        thresholds=np.full(28, 0.4),
        metrics={},
        card="test",
        n_samples=7,
        mc_mode="full",
        max_length=64,
    )
    loaded = load_classifier(ModelSettings(path=str(bundle), device="cpu"))
    assert loaded.label_names == test_classifier.label_names
    assert loaded.recommended_n_samples == 7 and loaded.max_length == 64
    assert (loaded.thresholds == 0.4).all()
    ids, mask = pad(tokens(loaded), loaded.pad_id, loaded.device)
    with torch.inference_mode():
        loaded.model.eval()
        test_classifier.model.eval()
        expected = test_classifier.probabilities(ids, mask)
        got = loaded.probabilities(ids, mask)
    # int8 deltas (one scale per row) move probabilities by a few hundredths at most
    torch.testing.assert_close(got, expected, atol=0.05 if kind == "delta" else 1e-5, rtol=0)


def test_a_forward_without_keyword_names_is_called_positionally() -> None:
    """EmCoder's published forward is ``forward(x, mask)``."""

    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.drop(self.embed(x).mean(dim=1))

    model = Positional()
    adapter = parse_adapter("labels=a|b|c")
    adapter.prepare(model, None)
    assert adapter.label_names(model) == ["a", "b", "c"]
    probs = adapter.probabilities(
        model.eval(), torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4)
    )
    assert probs.shape == (2, 3)


def test_remote_code_is_needed_only_for_the_class_being_loaded() -> None:
    from worker.inference.adapters import needs_remote_code

    extra = {"model_type": "bert", "auto_map": {"AutoModelForMaskedLM": "m.Custom"}}
    assert needs_remote_code(extra, "AutoModelForSequenceClassification") is None
    assert needs_remote_code({"model_type": "roberta"}, "AutoModel") is None
    head = {"model_type": "roberta", "auto_map": {"AutoModel": "m.WithHead"}}
    assert needs_remote_code(head, "AutoModel") == "m.WithHead"
    unknown = {"model_type": "emcoder", "auto_map": {"AutoConfig": "c.Config"}}
    assert needs_remote_code(unknown, "AutoModelForSequenceClassification") == "c.Config"
