"""A job's per-file media work (the file checks, sha256 of files whose digest is not remembered, the feature cache's
reads, decoding, resampling, fbank or frames) and its feature-cache writes, on several CPU cores.

Threads do not spread this work: fbank and the frame transforms are many small torch ops that hold the GIL between
them. Measured on a 16-core H100 host (benchmarks/results/2026-12-05-h100-whole-job/media_workers.log): one thread
decodes 125 ten-second wavs a second, and 8 or 16 threads together 95-120, no more than one; 8 or 16 processes with
one intra-op thread each, 480-510. Within a `dr infer` job the threads also starved the engine's own thread, which
launches the decode steps; hashing and cache writes, though sha256 and file I/O release the GIL, took it back often
enough to cost the same: 16.75 s of thread time hashing 3,430 files and 8.71 s writing 3,366 feature files on the
job's interpreter lock (H100, benchmarks/results/2026-12-07-h100-fused-encoder-jobs/phases_catalog.json), and a
hashing thread beside a loop holding the lock two thirds of the time ran at 37% of a process's rate
(benchmarks/results/2026-12-07-cpu-gil-hashing/). So a long job does all of it in processes (started from a
forkserver, never forked from a process holding CUDA, and without the program's main module:
model/io/worker_processes.py), and a short one, or a CPU job, in threads, where starting processes would cost more
than it saves.

What crosses back from a process is a chunk of files as found (`Found`): the cached features of its hits as one
tensor, the encoder inputs of its misses stacked as another, and per file its content key or its MediaError; a
batch of features to store crosses the other way as one stacked tensor (`write_entries`). Calls return at once
with the chunks still under way: the caller looks up the next group while the processes work, and the pool is never
idle between groups. Each tensor received costs this process a socket handshake for its shared memory's file
descriptor, on the GIL the engine's thread holds between its steps: with a thread holding the GIL 10 ms of every 12,
one tensor a file came back at 263 files/s, one a chunk of 8 at 1,102 (2-core CPU,
benchmarks/results/2026-12-06-cpu-decoded-transfer/); a job decoded 280 files/s against 480-510 alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from model.io.worker_processes import WithoutMainContext
from model.media.feature_files import entry_file, read_entry, write_entry
from model.media.file_hashes import hash_file
from model.media.preprocess import MediaError, check_file, load_media

Decoded = torch.Tensor | MediaError
# modality, files -> each file's encoder input or its MediaError, in order
Decode = Callable[[str, Sequence[Path]], Sequence[Decoded]]
# a file of a chunk: its content key (its sha256 with a cache, None without: unique to the file), whether it is a
# cache hit, and its row among the chunk's hits or its misses' inputs, or the MediaError its decoding raised
Outcome = tuple[str | None, bool, int | MediaError]
Hashed = tuple[str, list, bool]  # file_hashes.hash_file's (memo key, record, settled)
PROCESSES_FROM = 256  # files a job must decode before processes pay for their start (seconds, importing torch)
# the most files a call does on the caller's thread while the pool starts: an engine job's first media group
# (model/infer/job.py, FIRST_GROUP), about 0.5 s of ten-second wavs for one thread; a larger call waits for the pool
# rather than hold the GIL for seconds while the job's main thread builds its engine
CALLER_DECODES = 64


def load_or_error(modality: str, path: str | Path) -> Decoded:
    try:
        return load_media(modality, path)
    except MediaError as e:
        return e


@dataclass
class Found:
    """A chunk of one modality's files as a process found them: two tensors at most, whatever the chunk's size.

    `hits` holds the cached features of the hits, each flattened to its bytes, concatenated; `layouts` each one's
    dtype and shape (an entry of another shape or dtype than its neighbours' cannot break a stack). `inputs` holds
    the misses' encoder inputs stacked (a modality's inputs share one shape). `files` has per file its MediaError
    (a failed check or hashing) or its `Outcome`; `hashed` the digests the process computed, for the job's memo."""

    hits: torch.Tensor | None = None
    layouts: list[tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    inputs: torch.Tensor | None = None
    files: list[MediaError | Outcome] = field(default_factory=list)
    hashed: list[Hashed] = field(default_factory=list)

    def features(self) -> list[torch.Tensor]:
        """The hits' features, each a tensor of its own (copied out of the chunk's bytes, aligned for its dtype)."""
        out, at = [], 0
        for dtype, shape in self.layouts:
            size = torch.Size(shape).numel() * dtype.itemsize
            out.append(self.hits[at : at + size].clone().view(dtype).view(shape))  # type: ignore[index]
            at += size
        return out


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def find_chunk(
    modality: str,
    paths: Sequence[Path],
    digests: Sequence[str | None] | None,
    entries: Path | None,
    dtype: torch.dtype = torch.float32,
) -> Found:
    """Each file checked, then, with a cache (`entries`: its folder for this modality's mode), hashed unless its
    digest is given (remembered by the job) and looked up; a miss, or every file without a cache, decoded, its input
    in `dtype`. With a cache, a file whose content came earlier in the chunk is not read again. Runs in a decoding
    process."""
    found, hits, inputs = Found(), [], []
    seen: dict[str, Outcome] = {}
    for i, path in enumerate(paths):
        try:
            check_file(path, modality)
            digest = None if entries is None else (digests[i] if digests else None) or _hashed(path, found)
        except MediaError as e:
            found.files.append(e)
            continue
        if digest in seen:
            found.files.append(seen[digest])
            continue
        cached = read_entry(entry_file(entries, digest)) if entries is not None and digest else None
        if cached is not None:
            outcome: Outcome = (digest, True, len(hits))
            hits.append(cached)
            found.layouts.append((cached.dtype, tuple(cached.shape)))
        else:
            decoded = load_or_error(modality, path)
            outcome = (digest, False, decoded if isinstance(decoded, MediaError) else len(inputs))
            if isinstance(decoded, torch.Tensor):
                inputs.append(decoded)
        if digest is not None:
            seen[digest] = outcome
        found.files.append(outcome)
    found.hits = torch.cat([_bytes(h) for h in hits]) if hits else None
    if inputs:  # stacked straight into `dtype`: 71 ms for 8 videos on one core against 126 stacked then converted
        found.inputs = torch.stack(inputs, out=torch.empty((len(inputs), *inputs[0].shape), dtype=dtype))
    return found


def _hashed(path: Path, found: Found) -> str:
    """The file's sha256, its record kept in `found` for the job's memo."""
    key, record, settled = hash_file(path)
    found.hashed.append((key, record, settled))
    return record[5]


def write_entries(entries: Sequence[Path], features: torch.Tensor, metadata: Sequence[dict[str, str]]) -> None:
    """features[j] stored at entries[j] (model/media/feature_files.py): a batch of the encoder's outputs, sent as
    one tensor. Runs in a decoding process; the first failure (a full disk) is raised to the job."""
    for entry, one, meta in zip(entries, features, metadata, strict=True):
        write_entry(entry, one, meta)


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
    """A pool of decoding processes, started at once by a thread of its own and closed with the job: it finds a
    group's files (`find`) and writes the encoder's features to the cache (`write`).

    Starting the processes blocks whoever starts them until the forkserver has imported its preload (torch and the
    media code: 5.4 s on a 16-core H100 host, benchmarks/results/2026-12-05-h100-engine-phases/), so the caller's
    thread does not: a job builds its engine meanwhile. A small call made before the pool is up (the job's first
    media group) is not given to it (`takes`): the caller does that work itself instead of waiting. Any other call
    returns at once, its files found in two chunks a process."""

    def __init__(self, workers: int) -> None:
        context = WithoutMainContext()  # the caller's main module is not imported again in each process
        context.set_forkserver_preload(["model.media.decoders"])  # imported once, then forked per worker
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_setup)
        self.starting = threading.Thread(target=self._start, name="dr-decoders", daemon=True)
        self.starting.start()

    def _start(self) -> None:
        for _ in range(self.workers):
            self.pool.submit(os.getpid)

    def takes(self, files: int) -> bool:
        """Whether a call of `files` files goes to the processes: not a small one while they start (a submit waits
        for their start)."""
        return files > CALLER_DECODES or not self.starting.is_alive()

    def find(
        self,
        modality: str,
        paths: Sequence[Path],
        digests: Sequence[str | None] | None,
        entries: Path | None,
        dtype: torch.dtype = torch.float32,
    ) -> list[Future[Found]]:
        """`find_chunk` of each chunk of the files, in order; `digests`: those the job remembers (None where not),
        `entries`: the cache's folder for the modality's mode, None without a cache; the misses' inputs in `dtype`,
        the encoder's: its first step converts them to it, the same rounding either side, and in bfloat16 they
        cross back, are stacked and copied to the device at half the bytes (a 16-video call's 290 MB in float32)."""
        size = max(1, len(paths) // (2 * self.workers))  # a 512-file group on 16 processes: chunks of 16
        return [
            self.pool.submit(
                find_chunk, modality, paths[i : i + size], digests[i : i + size] if digests else None, entries, dtype
            )
            for i in range(0, len(paths), size)
        ]

    def write(self, entries: list[Path], features: torch.Tensor, metadata: list[dict[str, str]]) -> Future[None]:
        """`write_entries` in a process: features[j] (one tensor for the batch) stored at entries[j]."""
        return self.pool.submit(write_entries, entries, features, metadata)

    def close(self) -> None:
        self.starting.join()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_decoders(files: int, device: torch.device) -> DecodeProcesses | None:
    """Decoding processes for a job of `files` media files on `device`, started now, or None where threads do (a CPU
    job or a short one). Their start (a forkserver importing torch: 7-8 s into a job on a 16-core H100 host,
    benchmarks/results/2026-12-06-h100-two-stage-loader-block64/) is why `dr infer` starts them first, before it
    imports the model's packages (transformers, peft: 5 s of a 2-core CPU's 7) and loads the model: all of it then
    overlaps their start, and the job's media decode in processes from its first groups on."""
    processes = processes_for(files, device)
    return DecodeProcesses(processes) if processes else None


def processes_for(files: int, device: torch.device, workers: int | None = None) -> int:
    """Decoding processes for a job of `files` media files on `device`: none (threads) for a CPU job or a short
    one, else one per core up to 16 (the measured rate stopped growing there)."""
    if device.type != "cuda" or files < PROCESSES_FROM:
        return 0
    return workers or min(16, os.cpu_count() or 1)
