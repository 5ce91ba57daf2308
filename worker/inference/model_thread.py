"""One thread for all of a process's model work.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the PyPI wheels). Every thread that starts a
parallel region gets a team of worker threads of its own, kept for the thread's lifetime. Once a
process holds more OpenMP threads than it has CPUs, libgomp stops spinning at its barriers and
puts waiting threads to sleep almost at once (its "throttled" spin count of 100), and every
parallel region pays for the wake-ups. A worker that built its engine (at 16 bits a weight copy:
parallel work) on the event loop's thread and sampled on its model thread ran that way. Measured
here (2 cores, fast MC Dropout in bfloat16, 96 dev posts, 8 alternating pairs of processes,
because the state is per process): 14.8 posts/s on average (12.9-17.5, 1.99 cores busy) with the
default spinning, 12.4 (10.6-13.2, 1.53 cores) with libgomp's throttled spin count; a process
whose second thread had run one parallel op used 1.55 cores, as throttled.

So the worker loads the model, builds its engine and runs every batch on one thread
(``model_thread()``). Code that loads or runs the model itself and then starts a ``Pipeline``
(the benches) does that work on one such executor and hands it to the pipeline
(``Pipeline(..., model_executor=executor)``); a classifier loaded on the main thread and passed
in without it still works, in the throttled mode.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

THREAD_NAME = "emoworker-model"


def model_thread() -> ThreadPoolExecutor:
    """A single-thread executor for model work (load, engine set-up, inference)."""
    return ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
