"""A forkserver context whose processes start without importing the program's main module.

multiprocessing's spawn and forkserver children import the parent's `__main__` (its script, or its module run with
`-m`) before they run anything, so that functions defined there can be unpickled. A pool that only runs functions of
importable modules (the decoding processes, model/media/decoders.py) pays for it at every start: a researcher's
script that imports transformers and peft at its top (as `benchmarks/profiling/job_order.py` does) made each of a
job's decoding processes import them too: two processes were up 4.0 s after their pool's start against 0.03 s
without (a warm forkserver, 2-core CPU: benchmarks/results/2026-12-07-cpu-worker-main/); on a 16-core GPU host, 16
such imports at once held a catalog-shaped job's second media group back 6.3-6.7 s
(benchmarks/results/2026-12-07-h100-next-b/) where `dr bench job` (whose entry point imports no torch) had it 0.6 s
after the first. A process of this context is launched with the main module left out of what it is told to
prepare; everything else (sys.path, the working folder, the authentication key) is passed on as usual. No option of
multiprocessing or concurrent.futures does this, so it leans on two of multiprocessing's internals (the forkserver's
Popen and spawn.get_preparation_data, alike in the Python 3.11 and 3.12 it ran on); tests/test_worker_processes.py
runs a fresh program to tell if a version changes them.
"""

from __future__ import annotations

import threading
from multiprocessing import context, popen_forkserver, spawn

_LAUNCHING = threading.Lock()
MAIN_KEYS = ("init_main_from_name", "init_main_from_path")  # what spawn.prepare imports the main module from


class _LaunchWithoutMain(popen_forkserver.Popen):
    """The forkserver's launch, with `spawn.get_preparation_data` answering without the main module for this thread
    while it runs (launches of this context one at a time; another thread's launch meanwhile is answered in full)."""

    def _launch(self, process_obj: object) -> None:
        with _LAUNCHING:
            full = spawn.get_preparation_data
            launcher = threading.get_ident()

            def without_main(name: str) -> dict:
                data = full(name)
                if threading.get_ident() == launcher:
                    for key in MAIN_KEYS:
                        data.pop(key, None)
                return data

            spawn.get_preparation_data = without_main
            try:
                super()._launch(process_obj)
            finally:
                spawn.get_preparation_data = full


class _Process(context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: object) -> _LaunchWithoutMain:
        return _LaunchWithoutMain(process_obj)


class WithoutMainContext(context.ForkServerContext):
    """`multiprocessing.get_context("forkserver")` for pools that run only importable functions, started without the
    main module (give it as a ProcessPoolExecutor's `mp_context`)."""

    Process = _Process
