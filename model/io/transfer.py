"""Host tensors onto the device without making the host wait: for the device's queued work, or for other loading."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from typing import TypeVar

import torch

T = TypeVar("T")
# threads that copy a module's tensors at once (`converted`); 1: one after the other, as Module.to does. 4, as
# transformers' loader has it for reading weight files (16 took it twice as long); benchmarks/profiling/model_load.py
# --threads compares counts on a device
COPY_THREADS = 4


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to CUDA through pinned memory as a queued copy: a plain `.to("cuda")`
    synchronizes the stream first, which would make the engine's prefill wait for the decode steps queued before it."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def placed(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    """A copy of `t` on `device`, in `dtype` if it is floating (None: its own): how a weights file's mapped tensors
    become a module's, the same op wherever it runs (in the load or in a read begun early), so the two agree bit for
    bit."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None, copy=True)


def converted(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], threads: int | None = None) -> None:
    """`module._apply(fn)` (what Module.to does) with `fn` run on its tensors by `threads` threads at once (None:
    COPY_THREADS). Module.to copies one tensor after another, each copy from a mapped file to a GPU done by one host
    core (faulting the file's pages in, staging them for the card): 7B LLaMA weights took 2.1-2.6 s to reach an
    H100. Each tensor is converted once however many modules share it; the module takes the results through its own
    _apply, so a subclass's bookkeeping there still runs."""
    tensors = {id(t): t for t in chain(module.parameters(), module.buffers())}
    with ThreadPoolExecutor(threads or COPY_THREADS) as pool:
        done = dict(zip(tensors, pool.map(fn, tensors.values()), strict=True))
    module._apply(lambda t: done[id(t)] if id(t) in done else fn(t))


def moved_while(module: torch.nn.Module, device: torch.device | str, work: Callable[[], T]) -> T:
    """`work()` (reading ImageBind) while `module` (the LLaMA weights) goes to `device` in a thread: on an H100 the two
    took 2.1-2.6 s and 1.3 s one after the other (benchmarks/results/2026-12-07-h100-load-second-process/). The
    module moves as it was built on the host, so the device holds what a move after the whole load gave it."""
    with ThreadPoolExecutor(1) as mover:
        moved = mover.submit(converted, module, lambda t: t.to(device))
        result = work()
        moved.result()
    return result
