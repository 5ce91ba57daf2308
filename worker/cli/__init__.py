"""``emoworker``: the command line of emotion-stream.

``common`` holds what the commands share; each module registers its commands on the app when
imported, in the order of ``emoworker --help``: the runtime's (``runtime``), then the model
tooling's (``models``), the feedback loop's (``feedback``) and the benchmarks (``bench``).
Tooling commands import their package only when they run.
"""

from __future__ import annotations

import importlib

from worker.cli.common import CliError, ModelOptions, app, load_settings

for _module in ("runtime", "models", "feedback", "bench"):  # the order of --help
    importlib.import_module(f"worker.cli.{_module}")

__all__ = ["CliError", "ModelOptions", "app", "load_settings", "main"]


def main() -> None:
    app()
