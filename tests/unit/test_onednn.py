"""The worker bounds oneDNN's kernel caches, so a CPU worker's memory does not grow with the
variety of pass shapes (worker/onednn.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from worker.onednn import CACHE_VARIABLES, DEFAULT_CAPACITY, bound_onednn_caches

# a child process: imports the worker (which sets the caches' defaults), then runs a bf16 linear
# layer on many distinct row counts, as the engine's passes do over posts of many lengths
CHILD = """
import os, sys, psutil
import worker, torch
w = torch.randn(384, 384, dtype=torch.bfloat16)
process = psutil.Process()
before = process.memory_info().rss
with torch.inference_mode():
    for rows in range(1, 301):
        torch.nn.functional.linear(torch.randn(rows, 384, dtype=torch.bfloat16), w)
print((process.memory_info().rss - before) / 2**20)
print(",".join(os.environ[name] for name in sys.argv[1:]))
"""


def test_defaults_only_where_the_user_set_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    assert bound_onednn_caches() == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(DEFAULT_CAPACITY),
        "LRU_CACHE_CAPACITY": "512",
    }


def _child_growth_mb(env_overrides: dict[str, str]) -> tuple[float, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES} | env_overrides
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *CACHE_VARIABLES],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    return float(out[0]), out[1].split(",")


def test_importing_the_worker_bounds_memory_over_many_shapes() -> None:
    bounded, values = _child_growth_mb({})
    assert values == [str(DEFAULT_CAPACITY)] * 2  # set by `import worker`
    unbounded, values = _child_growth_mb({name: "1024" for name in CACHE_VARIABLES})
    assert values == ["1024", "1024"]  # the user's values win
    if unbounded < 50:
        pytest.skip(f"oneDNN kept no bf16 kernels here ({unbounded:.0f} MB for 300 shapes)")
    # measured here: 58 MB bounded against 211 MB with oneDNN's own 1,024-entry caches
    assert bounded < unbounded / 2, (bounded, unbounded)
