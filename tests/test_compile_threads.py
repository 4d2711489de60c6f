"""An FX trace on one thread against modules called on another: the hazard, and `trace_once` taking Inductor's
trace out of a job's compile (model/engine/compile_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch


def test_an_fx_trace_breaks_leaf_modules_called_on_another_thread():
    """The hazard itself, in this torch: while one thread traces, another thread's LayerNorm call fails. Should this go
    red, torch keeps its traces to their own thread and `trace_once` can go."""
    norm, errors, tracing, stop = torch.nn.LayerNorm(4), [], threading.Event(), threading.Event()

    def encoder() -> None:
        tracing.wait()
        while not stop.is_set():
            try:
                norm(torch.ones(1, 4))
            except NameError as error:
                errors.append(str(error))
                return

    def slow_identity(x):
        tracing.set()
        time.sleep(0.2)  # the trace's patches stay while this thread sleeps
        return x

    thread = threading.Thread(target=encoder)
    thread.start()
    try:
        torch.fx.symbolic_trace(slow_identity)
    finally:
        stop.set()
        thread.join()
    assert errors and "not installed as a submodule" in errors[0]


# counts the traces that a first Inductor compile in a fresh process makes with FX's own module handling (the kind
# whose patched nn.Module.__call__ raises for another thread's leaf module), with or without trace_once before it
COUNT = textwrap.dedent(
    """
    import sys, torch, torch.fx
    from model.engine.compile_cache import trace_once
    if sys.argv[1] == "before":
        trace_once()
    plain, real = [], torch.fx.Tracer.trace

    def trace(self, root, *args, **kwargs):
        kind = type(self)
        if kind.call_module is torch.fx.Tracer.call_module and kind.path_of_module is torch.fx.Tracer.path_of_module:
            plain.append(kind.__name__)
        return real(self, root, *args, **kwargs)

    torch.fx.Tracer.trace = trace
    f = torch.compile(lambda x: (x * 2).sin() + 1, backend="inductor")
    f(torch.ones(8))
    print(len(plain))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "none"])
def test_trace_once_leaves_a_first_compile_no_plain_fx_trace(when, tmp_path):
    """A fresh process (the placeholder's trace is kept per process) and a fresh compile cache (a cache hit lowers
    nothing): with trace_once first the compile makes no trace that can break another thread; without, it makes one,
    so this test sees the trace that trace_once takes out."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", COUNT, when], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    count = int(out.stdout.split()[-1])
    assert count == 0 if when == "before" else count >= 1
