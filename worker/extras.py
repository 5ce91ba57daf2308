"""The optional extras of the package: what the tooling needs beyond the worker's runtime.

``emoworker run`` and ``classify`` need only the main dependencies; training and evaluation
(``train``), the benchmarks (``bench``) and the demo's local broker (``demo``) need more. Each
command checks its extra before importing the tooling, so a missing one is a single line saying
what to install rather than an ImportError.
"""

from __future__ import annotations

import importlib.util

# extra -> (import name, distribution) of each package it adds (pyproject.toml's
# [project.optional-dependencies]; tests/unit/test_extras.py checks the two agree)
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")),
    "bench": (("sklearn", "scikit-learn"), ("scipy", "scipy"), ("psutil", "psutil")),
    "demo": (("psutil", "psutil"),),
    "ood-sets": (("faker", "faker"), ("wordfreq", "wordfreq")),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked package counts as missing
        return False


def missing_extra(extra: str, command: str) -> str | None:
    """None when ``extra`` is installed, else the one line that says what to install."""
    missing = [dist for module, dist in EXTRAS[extra] if not _installed(module)]
    if not missing:
        return None
    return (
        f"{command} needs the {extra} extra ({', '.join(missing)} not installed): "
        f"pip install 'emotion-stream[{extra}]'"
    )
