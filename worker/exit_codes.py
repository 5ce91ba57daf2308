"""The worker's exit codes, defined once (the runbook in docs/operations.md says what each means).

0 stopped cleanly; 1 configuration error; 2 Kafka unreachable at start or login refused;
3 an output could not be published (nothing committed past it); 4 the model cannot run.
Every ``emoworker`` command exits 1 after its one-line error (a bad setting or option, a missing
file or extra: ``cli.one_line_errors``), or with a fatal error's own code (``emoworker classify``
exits 4 when the model fails on every post).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_KAFKA = 2
EXIT_DELIVERY = 3
EXIT_MODEL = 4


class FatalError(Exception):
    """Stops the worker with ``exit_code``; ``str()`` is the reason logged."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
