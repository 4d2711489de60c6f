"""What a process sets up before it compiles: where compiled kernels persist between processes, and the one FX trace
that must not overlap threads running modules."""

from __future__ import annotations

import os
from pathlib import Path


def compile_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR if set, else the user's cache directory (a second `dr infer` then loads the compiled
    step instead of compiling it again)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dr" / "inductor"


def trace_once() -> None:
    """Runs, now and on this thread, the FX symbolic trace that Inductor's first lowering in a process makes (of a
    placeholder function, kept for the process). While an FX trace runs, nn.Module.__call__ is patched for every
    thread (pytorch/pytorch#126024; torch 2.11 and 2.14 alike), and a leaf module called meanwhile on another thread
    fails with "module is not installed as a submodule": the media encoder in a job's loader thread did, while the
    engine compiled (benchmarks/results/2026-12-07-h100-verify-rest/phases_catalog.txt). Call it before threads that
    run modules start beside a compile; a torch without that placeholder has nothing to do here."""
    try:
        from torch._inductor.loop_body import InterpreterShim
    except ImportError:
        return
    InterpreterShim._dummy_gm()
