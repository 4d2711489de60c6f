"""Host tensors onto the device without making the host wait: for the device's queued work, or for other loading."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to CUDA through pinned memory as a queued copy: a plain `.to("cuda")`
    synchronizes the stream first, which would make the engine's prefill wait for the decode steps queued before it."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def moved_while(module: torch.nn.Module, device: torch.device | str, work: Callable[[], T]) -> T:
    """`work()` (reading ImageBind) while `module` (the LLaMA weights) goes to `device` in a thread: on an H100 the two
    took 2.1-2.6 s and 1.3 s one after the other (benchmarks/results/2026-12-07-h100-load-second-process/). The
    module moves as it was built on the host, so the device holds what a move after the whole load gave it."""
    with ThreadPoolExecutor(1) as mover:
        moved = mover.submit(module.to, device)
        result = work()
        moved.result()
    return result
