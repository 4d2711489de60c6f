"""What a job's file hashing costs the thread that drives the engine, by where the hashing runs: the loader's threads
in the job's own process (as `look_up` hashes today, `model/media/file_hashes.py`) or other processes.

The engine's loop is stood in for by a thread that alternates pure-Python work (holding the interpreter lock) with a
wait that releases it, as the engine's loop alternates its scheduling with CUDA calls and syncs: each turn it must
take the lock back, and a thread that releases and retakes the lock many times a file (open, fstat, path
resolution, each read and each sha256 update) makes it wait. Reported per scenario: the loop's turns a second and
its slowest turns, and the files hashed a second.

    PYTHONPATH=. python3 benchmarks/profiling/gil_hashing.py OUT.json [--files 2000] [--kib 320] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from model.media.file_hashes import FileHashes

CLOCK = time.perf_counter


def engine_loop(stop: threading.Event, turns: list[float], work_s: float, wait_s: float) -> None:
    """Turns of `work_s` of pure-Python work then a `wait_s` sleep (the lock released), each turn's seconds kept."""
    while not stop.is_set():
        start = CLOCK()
        while CLOCK() - start < work_s:
            sum(range(200))
        time.sleep(wait_s)
        turns.append(CLOCK() - start)


def hash_all(paths: list[Path]) -> int:
    """The files' digests as the loader takes them (one FileHashes, no memo on disk): how many were hashed."""
    hashes = FileHashes(None)
    return sum(1 for p in paths if hashes.digest(p))


def scenario(name: str, paths: list[Path], threads: int, work_s: float, wait_s: float) -> dict:
    """The engine loop alone for a second, or beside the files hashed in `threads` threads ("threads") or in
    `threads` processes ("processes")."""
    stop, turns = threading.Event(), []
    loop = threading.Thread(target=engine_loop, args=(stop, turns, work_s, wait_s))
    chunks = [paths[i::threads] for i in range(threads)]
    loop.start()
    start = CLOCK()
    if name == "alone":
        time.sleep(1.0)
        hashed = 0
    elif name == "threads":
        with ThreadPoolExecutor(threads) as pool:
            hashed = sum(pool.map(hash_all, chunks))
    else:
        with ProcessPoolExecutor(threads) as pool:
            hashed = sum(pool.map(hash_all, chunks))
    seconds = CLOCK() - start
    stop.set()
    loop.join()
    turns.sort()
    return {
        "seconds": round(seconds, 3),
        "files_per_s": round(hashed / seconds, 1) if hashed else None,
        "loop_turns_per_s": round(len(turns) / seconds, 1),
        "loop_turn_ms_median": round(statistics.median(turns) * 1000, 3),
        "loop_turn_ms_p99": round(turns[int(0.99 * (len(turns) - 1))] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--kib", type=int, default=320, help="each file's size (a ten-second 16 kHz wav: 320)")
    parser.add_argument("--threads", type=int, default=8, help="hashing threads, or processes")
    parser.add_argument("--work-ms", type=float, default=1.0, help="the loop's Python work a turn")
    parser.add_argument("--wait-ms", type=float, default=0.5, help="the loop's lock-free wait a turn")
    parser.add_argument("--dir", default="/tmp/dr_gil_hashing")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.bin" for i in range(args.files)]
    for p in paths:
        if not p.exists() or p.stat().st_size != args.kib * 1024:
            p.write_bytes(os.urandom(args.kib * 1024))
    hash_all(paths[:50])  # the page cache warm, as a job's files just written or read
    report = {"files": args.files, "kib": args.kib, "threads": args.threads, "cores": os.cpu_count(), "scenarios": {}}
    for name in ("alone", "threads", "processes", "alone"):
        result = scenario(name, paths, args.threads, args.work_ms / 1000, args.wait_ms / 1000)
        report["scenarios"].setdefault(name, []).append(result)
        print(name, result, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
