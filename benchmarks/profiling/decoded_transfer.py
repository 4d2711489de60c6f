"""How fast decoded media come back from the decoding processes into a job's process: one tensor a file (how `dr`
took them until 2026-12-06: `pool.map` of `load_or_error`) against one stacked tensor a chunk (`DecodeProcesses`
now), with this process idle and with a thread holding the GIL 10 ms of every 12 (as the engine's thread holds it
between its steps). Each tensor received is a socket handshake for its shared memory's file descriptor, on the GIL.

Two sources: tensors of a ten-second wav's ImageBind input shape made in the worker (the transfer alone), and real
ten-second wavs decoded (the whole path). Variants take turns, `--repeats` times; files/s per variant and round.

    PYTHONPATH=.:tests python benchmarks/profiling/decoded_transfer.py OUT.json [--workers N] [--files N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from model.media.decoders import DecodeProcesses, load_or_error

AUDIO_INPUT = (3, 1, 128, 204)  # ImageBind's input for a ten-second wav: 3 clips of 128 mel bins x 204 frames


def _one_thread() -> None:
    torch.set_num_threads(1)


def made(i: int) -> torch.Tensor:
    return torch.full(AUDIO_INPUT, float(i))


def made_chunk(indices: list[int]) -> torch.Tensor:
    return torch.stack([made(i) for i in indices])


@contextmanager
def gil_held(busy: bool):
    """A thread holding the GIL 10 ms of every 12 while the block runs (or nothing)."""
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            end = time.perf_counter() + 0.010
            while time.perf_counter() < end:
                pass
            time.sleep(0.002)

    thread = threading.Thread(target=hold, daemon=True)
    if busy:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if busy:
            thread.join()


def rate(run, count: int, busy: bool) -> float:
    with gil_held(busy):
        start = time.perf_counter()
        got = run()
        seconds = time.perf_counter() - start
    assert len(got) == count
    return round(count / seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--files", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import synth

    work = Path(tempfile.mkdtemp(prefix="dr_transfer_"))
    wavs = [synth.write_wav(work / f"{i}.wav", 10.0, 200.0 + i) for i in range(args.files)]
    size = max(1, args.files // (2 * args.workers))  # DecodeProcesses' chunk
    context = multiprocessing.get_context("forkserver")
    results: dict[str, list[float]] = {}
    with (
        ProcessPoolExecutor(args.workers, context, initializer=_one_thread) as pool,
        DecodeProcesses(args.workers) as decoders,
    ):
        decoders.starting.join()
        list(pool.map(made, range(args.workers)))
        indices = [list(range(i, min(i + size, args.files))) for i in range(0, args.files, size)]
        variants = {
            "made, a tensor a file": lambda: list(pool.map(made, range(args.files), chunksize=size)),
            "made, a tensor a chunk": lambda: [t for c in pool.map(made_chunk, indices) for t in c],
            "wavs, a tensor a file": lambda: list(pool.map(partial(load_or_error, "audio"), wavs, chunksize=size)),
            "wavs, a tensor a chunk (DecodeProcesses)": lambda: [
                x for c in decoders.find("audio", wavs, None, None) for x in c.result().inputs
            ],
        }
        for _ in range(args.repeats):
            for busy in (False, True):
                for name, run in variants.items():
                    label = f"{name}, {'GIL held 10 ms of 12' if busy else 'idle'}"
                    results.setdefault(label, []).append(rate(run, args.files, busy))
                    print(f"{label:70s} {results[label][-1]:8.1f} files/s", flush=True)
            report = {"workers": args.workers, "files": args.files, "chunk": size, "files_per_s": results}
            args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
