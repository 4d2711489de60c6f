"""What a `dr` process does around its command, each measured on whole `dr infer` processes: Python's collector set
for a start-up heap of torch, transformers and Dynamo objects, a warning where every process would compile its
imports' bytecode again, and an exit without the interpreter's teardown."""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
import sys
import threading
from typing import NoReturn

import typer

# Python's default (700 net allocations) ran 7 full collections over a tiny `dr infer` job's heap of torch, transformers
# and Dynamo objects; at 10,000 none ran and its engine was built 1.1 s sooner on this project's CPU (5.48 s before).
# Cycles are still collected. benchmarks/results/2026-12-07-cpu-process-overhead/
GC_YOUNG_THRESHOLD = 10_000
# the packages most of a process's imports go to (torch alone is 1.7 s of 4-5 s with bytecode)
BYTECODE_PACKAGES = ("torch", "transformers")


def tune_collector() -> None:
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def recompiled_packages() -> list[str]:
    """Those of BYTECODE_PACKAGES whose bytecode is missing where this Python looks for it and will not be written
    there (writes off, or a folder it may not write): each process then compiles their modules again, 10.8-13.5 s of
    imports against 4.0-5.5 s on this project's CPU (benchmarks/results/2026-12-07-cpu-imports-bytecode/). Where it
    can be written, only the first process pays."""
    missing = []
    for name in BYTECODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        cached = importlib.util.cache_from_source(spec.origin)
        if os.path.exists(cached):
            continue
        folder = os.path.dirname(cached)
        while not os.path.isdir(folder):  # __pycache__ (or a prefix's tree) is made on the first write
            folder = os.path.dirname(folder)
        if sys.dont_write_bytecode or not os.access(folder, os.W_OK):
            missing.append(name)
    return missing


def warn_if_recompiled() -> None:
    """One line on stderr where every `dr` process would compile its imports again, and how to avoid it."""
    missing = recompiled_packages()
    if missing:
        typer.echo(
            f"warning: no bytecode for {' or '.join(missing)} here and none can be written (PYTHONDONTWRITEBYTECODE "
            "or a read-only folder), so every dr process compiles their modules again (about 7 s); set "
            "PYTHONPYCACHEPREFIX to a writable folder",
            err=True,
        )


def exit_now(code: object) -> NoReturn:
    """End the process as a normal exit does, without the interpreter's teardown: after a tiny `dr infer` job had
    written its last answer, freeing its modules took 1.4-1.5 s of the process (benchmarks/results/
    2026-12-07-cpu-process-overhead/). What comes before the teardown runs, in the interpreter's order: the threads it
    waits for are waited for (an idle executor's workers, such as Inductor's compile threads, are told to end), then
    the exit handlers; every file dr writes is closed by then."""
    if threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # as the interpreter does with SystemExit("message")
        print(code, file=sys.stderr)
        status = 1
    threading._shutdown()  # Python's own wait for its non-daemon threads, their exit hooks first
    atexit._run_exitfuncs()  # the handlers a normal exit runs: logging's flush, locks, temporary folders, children
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)
