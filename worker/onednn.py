"""Bounded oneDNN caches: a CPU worker's memory must not grow with the variety of post lengths.

On the CPU, bfloat16 matmuls (the default precision where the CPU has native bf16) run through
oneDNN, which compiles a kernel for every distinct shape and keeps it in two caches: oneDNN's
primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and PyTorch's ideep cache
(``LRU_CACHE_CAPACITY``), 1,024 entries each by default. The engine's passes take their shapes
from the posts' lengths, so over a real feed the caches fill with hundreds of shapes, each
holding buffers. Measured here (fast mode, bf16, batches of 64 dev posts, 80 batches): with the
defaults the worker's RSS grew 1,221 → 1,547 MB and was still growing; with both caches at 256
it levelled at 1,285 MB, at 64 at 1,080 MB, with no loss of throughput (see the README's Memory
paragraph for the interleaved runs). One linear layer fed 1,500 distinct row counts grew 1,056 MB
with the defaults, 95 MB with 64.

Both libraries read these variables once, at their first bf16 operation in the process, so they
are set when the ``worker`` package is imported, and only where the user has not set them.
"""

from __future__ import annotations

import os

CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
DEFAULT_CAPACITY = 64


def bound_onednn_caches(capacity: int = DEFAULT_CAPACITY) -> dict[str, str]:
    """Default both cache capacities to ``capacity``; the user's values win. Returns them."""
    for name in CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in CACHE_VARIABLES}
