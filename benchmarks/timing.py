"""Wall-clock timing of GPU work: the device's queue drained around each measurement (CUDA runs asynchronously)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int = 1, device: str | torch.device = "cuda") -> float:
    return timed_with_warmup(fn, repeats, device)[1]


def seconds_per_call(fn: Callable[[], object], calls: int = 1, device: str | torch.device = "cuda") -> float:
    """Wall seconds per call, the device's queue drained before and after (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def timed_with_warmup(
    fn: Callable[[], object], repeats: int = 1, device: str | torch.device = "cuda"
) -> tuple[float, float]:
    """Seconds of the first call, and seconds per call once warm. Two warm-up calls: CUDA graph trees run a
    function once to warm up and record its graph on the second call (the static loop's prefill runs once per call)."""
    first = seconds_per_call(fn, 1, device)
    seconds_per_call(fn, 1, device)
    return first, seconds_per_call(fn, repeats, device)
