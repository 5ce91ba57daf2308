"""A LoRA bundle whose adapter is a pickle (``adapter_model.bin``) is refused like a Hugging Face
folder with pickle weights: a clear error naming the file, and the file is never unpickled."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from support.model_fixtures import export_test_bundle

from schemas.labels import GOEMOTIONS_LABELS
from worker.inference.loading import ModelLoadError, load_classifier
from worker.settings import ModelSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_bundle(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with a rank-2 LoRA adapter on the test model (its base, by path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(test_model_dir)
    lora = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(model, lora)
    folder = tmp_path_factory.mktemp("bundles") / "lora"
    return export_test_bundle(model, test_model_dir, folder, "lora", 4)


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files ``torch.load`` is asked to unpickle during the test (peft calls it for a
    ``.bin`` adapter); they are refused, not read."""
    opened: list[str] = []

    def refuse(source: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(source))
        raise AssertionError(f"torch.load({source!r}) was called")

    monkeypatch.setattr(torch, "load", refuse)
    return opened


def pickled_copy(bundle: Path, folder: Path, keep_safetensors: bool) -> Path:
    """The bundle with its adapter also (or only) saved as ``adapter_model.bin``."""
    from safetensors.torch import load_file

    shutil.copytree(bundle, folder)
    adapter = folder / "adapter_model.safetensors"
    torch.save(load_file(str(adapter)), folder / "adapter_model.bin")
    if not keep_safetensors:
        adapter.unlink()
    return folder


def test_the_lora_bundle_loads(lora_bundle: Path, torch_loads: list[str]) -> None:
    """The control: as written (safetensors), the bundle loads with its 28 labels."""
    assert (lora_bundle / "adapter_model.safetensors").is_file()
    classifier = load_classifier(ModelSettings(path=str(lora_bundle), device="cpu"))
    assert classifier.label_names == list(GOEMOTIONS_LABELS)
    assert classifier.recommended_n_samples == 4
    assert torch_loads == []


def test_a_lora_bundle_with_a_pickled_adapter_is_refused(
    lora_bundle: Path, tmp_path: Path, torch_loads: list[str]
) -> None:
    folder = pickled_copy(lora_bundle, tmp_path / "pickled", keep_safetensors=False)
    assert sorted(p.name for p in folder.glob("adapter_model.*")) == ["adapter_model.bin"]
    with pytest.raises(ModelLoadError) as refused:
        load_classifier(ModelSettings(path=str(folder), device="cpu"))
    message = str(refused.value)
    assert f"{folder} has its LoRA adapter only as adapter_model.bin" in message
    assert "only safetensors are loaded" in message
    assert torch_loads == [], "the pickle was opened"


def test_a_pickle_next_to_the_safetensors_adapter_is_left_alone(
    lora_bundle: Path, tmp_path: Path, torch_loads: list[str]
) -> None:
    """peft reads adapter_model.safetensors when both are there: that bundle loads, and the
    pickle beside it is never opened."""
    folder = pickled_copy(lora_bundle, tmp_path / "both", keep_safetensors=True)
    classifier = load_classifier(ModelSettings(path=str(folder), device="cpu"))
    assert len(classifier.label_names) == 28
    assert torch_loads == []
