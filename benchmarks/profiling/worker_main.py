"""How soon a job's decoding processes are up when the program that starts them imports heavy packages at its top,
as a researcher's script (or `benchmarks/profiling/job_order.py`) does: each process of a stock forkserver context
imports the program's main module again before it runs anything; one of model/io/worker_processes.py's does not.
Arms in turns in one process (the forkserver started by a warm-up first); each time is from the pool's creation to
every process having answered.

    PYTHONPATH=. python benchmarks/profiling/worker_main.py OUT.json [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import time

CLOCK = time.perf_counter
BEGIN = CLOCK()
import peft  # noqa: E402, F401  the heavy imports of a researcher's script, before anything else
import transformers  # noqa: E402, F401

IMPORTS_S = CLOCK() - BEGIN

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

from model.io.worker_processes import WithoutMainContext  # noqa: E402
from model.media import decoders  # noqa: E402

ARMS = {"without_main": WithoutMainContext, "stock_forkserver": lambda: multiprocessing.get_context("forkserver")}


def until_up(arm: str, workers: int) -> float:
    """Seconds from DecodeProcesses(workers), its context `arm`'s, to an answer from each of its processes."""
    decoders.WithoutMainContext = ARMS[arm]
    begin = CLOCK()
    pool = decoders.DecodeProcesses(workers)
    pids: set[int] = set()
    while len(pids) < workers:
        pids.update(f.result() for f in [pool.pool.submit(os.getpid) for _ in range(workers)])
    seconds = CLOCK() - begin
    pool.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    until_up("without_main", args.workers)  # the forkserver started (its preload imports torch)
    runs: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            runs[arm].append(round(until_up(arm, args.workers), 3))
    report = {
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "main_imports_s": round(IMPORTS_S, 2),
        "processes_up_s": runs,
        "median_s": {arm: statistics.median(r) for arm, r in runs.items()},
    }
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
