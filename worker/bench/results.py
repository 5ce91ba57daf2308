"""What every benchmark shares: the posts, the machine's description, the table, the files.

Kept apart from ``run.py`` (which needs Kafka) so that the GPU bench runs where only torch is.
"""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from schemas.labels import GOEMOTIONS_LABELS
from worker.datasets import default_data_dir
from worker.training.goemotions import read_tsv

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
DEFAULT_DEV = default_data_dir() / "dev.tsv"  # filled by `emoworker data fetch goemotions`


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {psutil.cpu_count()} cores, {memory:.0f} GiB, {device}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def machine_slug() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return f"cpu{psutil.cpu_count()}"


def load_posts(path: Path, n: int) -> tuple[list[str], np.ndarray]:
    split = read_tsv(path, len(GOEMOTIONS_LABELS))
    return split.texts[:n], split.targets[:n]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | posts/s | × card | precision | useful GFLOP/s | of bound | label sets "
        "| review flags | Spearman MI | macro-F1 | AURC | samples/post | peak RSS MB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bound = r.get("bound_fraction")
        lines.append(
            f"| {r['name']} | {r['posts_per_s']:.2f} | {r['ratio_to_loop']:.2f} | "
            f"{r.get('precision', '')} | {r.get('useful_gflops', float('nan')):.1f} | "
            f"{'' if bound is None else f'{100 * bound:.0f} %'} | "
            f"{r['label_set_agreement']:.3f} | {r['review_agreement']:.3f} | "
            f"{r['spearman']:.3f} | {r['macro_f1']:.3f} | {r['aurc']:.3f} | "
            f"{r['mean_samples']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def write_results(result: dict[str, Any], folder: Path, latest: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=float) + "\n"
    dated = folder / f"{result['date']}-{machine_slug()}{'-quick' if result['quick'] else ''}.json"
    dated.write_text(text)
    if latest and not result["quick"]:
        (folder / "latest.json").write_text(text)
    return dated
