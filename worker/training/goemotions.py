"""Read GoEmotions-format TSV files: ``text<TAB>label ids<TAB>comment id``, no header or quotes."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.labels import GOEMOTIONS_LABELS


@dataclass(frozen=True)
class LabelledSplit:
    """Texts, their ids and a (n_posts, n_labels) 0/1 matrix."""

    texts: list[str]
    ids: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray | list[int]) -> LabelledSplit:
        idx = np.asarray(index, dtype=np.int64)
        return LabelledSplit(
            texts=[self.texts[i] for i in idx],
            ids=[self.ids[i] for i in idx],
            targets=self.targets[idx],
        )


def read_label_names(path: Path) -> list[str]:
    """``labels.txt``: one name per line, line number = label id."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_tsv(path: Path, n_labels: int) -> LabelledSplit:
    texts: list[str] = []
    ids: list[str] = []
    rows: list[list[int]] = []
    with path.open(encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) < 2:
                raise ValueError(
                    f"{path}:{line_no}: expected text<TAB>labels[<TAB>id], got {row!r}"
                )
            label_ids = [int(x) for x in row[1].split(",") if x.strip()]
            bad = [x for x in label_ids if not 0 <= x < n_labels]
            if bad:
                raise ValueError(f"{path}:{line_no}: label ids {bad} outside 0..{n_labels - 1}")
            texts.append(row[0])
            ids.append(row[2] if len(row) > 2 else f"{path.stem}-{line_no}")
            rows.append(label_ids)
    targets = np.zeros((len(texts), n_labels), dtype=np.float32)
    for i, label_ids in enumerate(rows):
        targets[i, label_ids] = 1.0
    return LabelledSplit(texts=texts, ids=ids, targets=targets)


def load_dataset_dir(data_dir: Path) -> tuple[list[str], LabelledSplit, LabelledSplit]:
    """``train.tsv``, ``dev.tsv`` and ``labels.txt`` (GoEmotions names when absent)."""
    labels_file = data_dir / "labels.txt"
    names = read_label_names(labels_file) if labels_file.exists() else list(GOEMOTIONS_LABELS)
    train = read_tsv(data_dir / "train.tsv", len(names))
    dev = read_tsv(data_dir / "dev.tsv", len(names))
    return names, train, dev
