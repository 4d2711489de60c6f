"""Decoding many media files into encoder inputs (decode, resample, fbank or frames) on several CPU cores.

Threads do not spread this work: fbank and the frame transforms are many small torch ops that hold the GIL between
them. Measured on a 16-core H100 host (benchmarks/results/2026-12-05-h100-whole-job/media_workers.log): one thread
decodes 125 ten-second wavs a second, and 8 or 16 threads together 95-120, no more than one; 8 or 16 processes with
one intra-op thread each, 480-510. Within a `dr infer` job the threads also starved the engine's own thread, which
launches the decode steps. So a long job decodes in processes (started from a forkserver, never forked from a
process holding CUDA), and a short one, or a CPU job, in threads, where starting processes would cost more than
it saves.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from model.media.preprocess import MediaError, load_media

Decoded = torch.Tensor | MediaError
# modality, files -> each file's encoder input or its MediaError, in order
Decode = Callable[[str, Sequence[Path]], list[Decoded]]
PROCESSES_FROM = 256  # files a job must decode before processes pay for their start (seconds, importing torch)
# the most files a call decodes on the caller's thread while the pool starts: an engine job's first media group
# (model/infer/job.py, FIRST_GROUP), about 0.5 s of ten-second wavs for one thread; a larger call waits for the pool
# rather than hold the GIL for seconds while the job's main thread builds its engine
CALLER_DECODES = 64


def load_or_error(modality: str, path: str | Path) -> Decoded:
    try:
        return load_media(modality, path)
    except MediaError as e:
        return e


def in_threads(workers: int) -> Decode:
    """Decoding in `workers` threads of this process (a pool per call)."""

    def decode(modality: str, paths: Sequence[Path]) -> list[Decoded]:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(partial(load_or_error, modality), paths))

    return decode


def _one_intra_op_thread() -> None:
    torch.set_num_threads(1)  # the process is one of many: its ops must not each spread over every core


class DecodeProcesses:
    """A pool of decoding processes, started at once by a thread of its own and closed with the job. Call it as a
    `Decode`.

    Starting the processes blocks whoever starts them until the forkserver has imported its preload (torch and the
    media code: 5.4 s on a 16-core H100 host, benchmarks/results/2026-12-05-h100-engine-phases/), so the caller's
    thread does not: a job builds its engine meanwhile. A small call made before the pool is up (the job's first
    media group) is decoded on the calling thread instead of waiting for it."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["model.media.preprocess"])  # imported once, then forked per worker
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_one_intra_op_thread)
        self.starting = threading.Thread(target=self._start, name="dr-decoders", daemon=True)
        self.starting.start()

    def _start(self) -> None:
        for _ in range(self.workers):
            self.pool.submit(os.getpid)

    def __call__(self, modality: str, paths: Sequence[Path]) -> list[Decoded]:
        one = partial(load_or_error, modality)
        if len(paths) <= CALLER_DECODES and self.starting.is_alive():
            return list(map(one, paths))
        chunk = max(1, len(paths) // (4 * self.workers))
        return list(self.pool.map(one, paths, chunksize=chunk))

    def close(self) -> None:
        self.starting.join()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def processes_for(files: int, device: torch.device, workers: int | None = None) -> int:
    """Decoding processes for a job of `files` media files on `device`: none (threads) for a CPU job or a short
    one, else one per core up to 16 (the measured rate stopped growing there)."""
    if device.type != "cuda" or files < PROCESSES_FROM:
        return 0
    return workers or min(16, os.cpu_count() or 1)
