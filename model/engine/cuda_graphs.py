"""Capturing a piece of GPU work as a CUDA graph, for the engine's decode step and small prefills
(model/engine/model_runner.py, prefill_graphs.py): one replay launches all its kernels, where Python would spend tens of
microseconds on each.

torch.cuda.graph is used directly rather than torch.compile's CUDA-graph trees: the trees belong to one compiled
function, while the step here is a Python loop over one compiled layer, and the prefill is not compiled at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(run: Callable[[], T], pool: tuple[int, int], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T]:
    """(the graph of `run`, what its captured run returned). `run` is called three times, so it must leave the state
    as a replay would: two warm-ups on a side stream (lazy initialisation, compilation and cuBLAS handles must not
    happen while capturing), then the capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    # cuBLAS keeps one workspace per (handle, stream) and hands it to later calls on that stream; torch 2.11 frees it
    # when any graph captured on that stream dies, and CUDA-graph trees clear them around each recording, so a graph
    # that shares one can replay into freed memory (pytorch#193402). Cleared before, the capture allocates its own in
    # this graph's pool; cleared after, no later call shares it. This is what CUDA-graph trees do around captures.
    torch._C._cuda_clearCublasWorkspaces()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    torch._C._cuda_clearCublasWorkspaces()
    return graph, out
