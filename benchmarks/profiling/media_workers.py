"""How fast the job's media decoding (file -> ImageBind input tensors: decode, resample, fbank) runs on N workers:
threads with torch's default intra-op threads (what `dr infer` did), threads with one intra-op thread each, and
processes. Run on the GPU machine's 16 cores over the wav files a `dr bench job` run left behind.

    PYTHONPATH=. python3 benchmarks/profiling/media_workers.py /tmp/dr_job/media 512
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

from model.media.preprocess import load_media


def _one_thread() -> None:
    torch.set_num_threads(1)


def _load(path: Path) -> tuple:
    return tuple(load_media("audio", path).shape)


def timed(label: str, run) -> None:
    start = time.perf_counter()
    n = len(run())
    seconds = time.perf_counter() - start
    print(f"{label:52s} {seconds:6.2f} s  {n / seconds:7.1f} files/s", flush=True)


def main() -> None:
    folder, count = Path(sys.argv[1]), int(sys.argv[2])
    files = sorted(folder.glob("*.wav"))[:count]
    default = torch.get_num_threads()
    timed("1 thread (intra-op default)", lambda: [_load(p) for p in files[:64]])
    for workers in (8, 16):
        with ThreadPoolExecutor(workers) as pool:
            timed(f"{workers} threads, intra-op {default}", lambda: list(pool.map(_load, files)))
    torch.set_num_threads(1)
    for workers in (8, 16):
        with ThreadPoolExecutor(workers) as pool:
            timed(f"{workers} threads, intra-op 1", lambda: list(pool.map(_load, files)))
    torch.set_num_threads(default)
    for workers in (8, 16):
        start = time.perf_counter()
        with ProcessPoolExecutor(workers, mp.get_context("forkserver"), initializer=_one_thread) as pool:
            list(pool.map(_load, files[:workers]))  # started and warm
            print(f"  {workers} processes started in {time.perf_counter() - start:.2f} s", flush=True)
            timed(f"{workers} processes, intra-op 1", lambda: list(pool.map(_load, files, chunksize=8)))


if __name__ == "__main__":
    main()
