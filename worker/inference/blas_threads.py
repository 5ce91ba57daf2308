"""numpy's OpenBLAS on one thread while the worker runs.

numpy's wheels bundle OpenBLAS, which starts a pool of worker threads (one per CPU) and, after
every call it splits over them, leaves them spinning for a while before they sleep. The worker
calls BLAS on the model thread right after each batch's inference: the OOD signals' density (a
64 x 384 by 384 x 384 product) and the language table. Measured here (2 cores, the default
ensemble, fast MC in bfloat16, batches of 64, 2026-12-04): the pool's second thread burnt about
0.1 s of CPU after every batch's OOD signals, on a core the next batch's torch team needed, whose
OpenMP barrier then waited for the preempted thread. ``BatchProcessor.process`` over 512 dev posts
ran 49.6 posts/s (three processes, three runs each) with the pool against 52.8 with one OpenBLAS
thread. The worker's BLAS products are small: one thread loses nothing on them.

Only OpenBLAS is limited: an MKL that numpy shares with torch (some conda builds) would also be
torch's, whose threads ``torch.set_num_threads`` owns.
"""

from __future__ import annotations

import threading
from typing import Any

from threadpoolctl import ThreadpoolController

_lock = threading.Lock()
_holders = 0  # OneBlasThread objects started and not stopped, in the whole process
_limiter: Any = None  # the process's limit while any is held: the counts from before it


class OneBlasThread:
    """Between ``start()`` and ``stop()`` (or in a ``with`` block) every OpenBLAS loaded in the
    process runs on one thread. The limit is the process's: it holds while any holder has started
    and not stopped (two pipelines in one process, their starts and stops interleaved), and the
    last ``stop()`` gives back the counts from before the first start, so a host program's own
    setting survives the worker."""

    def __init__(self) -> None:
        self._held = False

    def start(self) -> None:
        global _holders, _limiter
        with _lock:
            if self._held:
                return
            self._held = True
            _holders += 1
            if _limiter is None:
                openblas = ThreadpoolController().select(internal_api="openblas")
                _limiter = openblas.limit(limits=1)

    def stop(self) -> None:
        global _holders, _limiter
        with _lock:
            if not self._held:
                return
            self._held = False
            _holders -= 1
            if _holders == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None

    def __enter__(self) -> OneBlasThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
