"""Decoding many media files into encoder inputs (decode, resample, fbank or frames) on several CPU cores.

Threads do not spread this work: fbank and the frame transforms are many small torch ops that hold the GIL between
them. Measured on a 16-core H100 host (benchmarks/results/2026-12-05-h100-whole-job/media_workers.log): one thread
decodes 125 ten-second wavs a second, and 8 or 16 threads together 95-120, no more than one; 8 or 16 processes with
one intra-op thread each, 480-510. Within a `dr infer` job the threads also starved the engine's own thread, which
launches the decode steps. So a long job decodes in processes (started from a forkserver, never forked from a
process holding CUDA), and a short one, or a CPU job, in threads, where starting processes would cost more than
it saves.

What crosses back from a process is one stacked tensor per chunk of files, and a call returns at once with the
chunks still decoding (`Arriving`): the caller looks up the next group while the processes work, and the pool is
never idle between groups. Each tensor received costs this process a socket handshake for its shared memory's file
descriptor, on the GIL the engine's thread holds between its steps: with a thread holding the GIL 10 ms of every 12,
one tensor a file came back at 263 files/s, one a chunk of 8 at 1,102 (2-core CPU,
benchmarks/results/2026-12-06-cpu-decoded-transfer/); a job decoded 280 files/s against 480-510 alone.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from model.media.preprocess import MediaError, load_media

Decoded = torch.Tensor | MediaError
# modality, files -> each file's encoder input or its MediaError, in order (indexing may wait for the decoding)
Decode = Callable[[str, Sequence[Path]], Sequence[Decoded]]
# a chunk's files as decoded in a process: the good ones' inputs stacked (None if none), and per file its row there
# or its MediaError
Chunk = tuple[torch.Tensor | None, list[int | MediaError]]
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


def decode_chunk(modality: str, paths: Sequence[Path]) -> Chunk:
    """The files decoded in one process, their inputs stacked: one tensor crosses back instead of one a file.
    A modality's inputs all have one shape (the encoder stacks them too)."""
    decoded = [load_or_error(modality, p) for p in paths]
    good = [x for x in decoded if isinstance(x, torch.Tensor)]
    rows = iter(range(len(good)))
    return (torch.stack(good) if good else None), [x if isinstance(x, MediaError) else next(rows) for x in decoded]


class Arriving(Sequence[Decoded]):
    """Files decoding in chunks (futures of `Chunk`, in order), as a sequence of their decoded inputs: indexing waits
    only for the chunks it reaches. Taken before the pool closes (closing cancels what is not decoded yet)."""

    def __init__(self, chunks: list[Future], files: int) -> None:
        self.chunks, self.files = chunks, files
        self.taken = 0  # chunks whose files are in `got`
        self.got: list[Decoded] = []

    def __len__(self) -> int:
        return self.files

    def __getitem__(self, index):  # type: ignore[override]
        wanted = range(self.files)[index]  # an int out of range raises IndexError here
        last = wanted if isinstance(wanted, int) else max(wanted, default=-1)
        while len(self.got) <= last:
            stacked, rows = self.chunks[self.taken].result()
            self.taken += 1
            self.got.extend(r if isinstance(r, MediaError) else stacked[r] for r in rows)
        return self.got[index]


def in_threads(workers: int) -> Decode:
    """Decoding in `workers` threads of this process (a pool per call)."""

    def decode(modality: str, paths: Sequence[Path]) -> list[Decoded]:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(partial(load_or_error, modality), paths))

    return decode


def _worker_setup() -> None:
    """Each decoding process: one intra-op thread (it is one of many: its ops must not each spread over every core).
    They run at the job's own CPU priority: at a lower one (nice 10) the engine's build beside them took 8.3 s
    against 6.6 s and the first encoder call came 5.5 s later
    (benchmarks/results/2026-12-07-h100-fused-encoder-jobs/)."""
    torch.set_num_threads(1)


class DecodeProcesses:
    """A pool of decoding processes, started at once by a thread of its own and closed with the job. Call it as a
    `Decode`.

    Starting the processes blocks whoever starts them until the forkserver has imported its preload (torch and the
    media code: 5.4 s on a 16-core H100 host, benchmarks/results/2026-12-05-h100-engine-phases/), so the caller's
    thread does not: a job builds its engine meanwhile. A small call made before the pool is up (the job's first
    media group) is decoded on the calling thread instead of waiting for it; any other returns at once (`Arriving`),
    its files decoding in two chunks a process."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["model.media.preprocess"])  # imported once, then forked per worker
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_setup)
        self.starting = threading.Thread(target=self._start, name="dr-decoders", daemon=True)
        self.starting.start()

    def _start(self) -> None:
        for _ in range(self.workers):
            self.pool.submit(os.getpid)

    def __call__(self, modality: str, paths: Sequence[Path]) -> Sequence[Decoded]:
        if len(paths) <= CALLER_DECODES and self.starting.is_alive():
            return [load_or_error(modality, p) for p in paths]
        size = max(1, len(paths) // (2 * self.workers))  # a 512-file group on 16 processes: chunks of 16
        chunks = [self.pool.submit(decode_chunk, modality, paths[i : i + size]) for i in range(0, len(paths), size)]
        return Arriving(chunks, len(paths))

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
