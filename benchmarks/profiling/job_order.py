"""Whole `dr infer` jobs (catalog-shaped by default) with module settings switched, several runs of each in one
process: arms taking turns on one model and one set of media files, each run with fresh features. Warm whole jobs vary
by seconds from run to run on one machine and drift within a process (benchmarks/README.md), so a setting is told by
several runs a side, the sides alternating so that drift falls on all of them.

    PYTHONPATH=. python3 benchmarks/profiling/job_order.py OUT.json [--repeats 3] --arm default \
        --arm "first128:model.infer.job.FIRST_GROUP=128"
    PYTHONPATH=. python3 benchmarks/profiling/job_order.py OUT.json --tiny  # the CPU check: tiny shapes, 24 rows

An arm is `NAME` (the code as it is) or `NAME:module.SETTING=VALUE,...` (VALUE a Python literal, set on the module
while the arm runs: a setting its code reads from the module at call time, not one bound by `from ... import`).
The process's first job (the engine's steps compiled, or loaded from the compile cache) is reported apart and not in
any arm. Each run reports its wall and first rows (`dr bench job`'s figures) and `media_done_s`, when the loader
handed over its last group's features: a job that ends long after it waited for decoding, not for its media; and
`encoder_calls_s`, `encoder_waits_s` and `input_waits_s`, the loader's seconds queuing the encoder's calls, waiting for
their features (their GPU work) and waiting for decoded inputs, and `groups_done_s`, when each media group was handed
over (benchmarks/job.py `loader_clocks`, in every `dr bench job` run too).
2026-12-07's run (results/2026-12-07-h100-job-order-block32/) compared the media mixes spread over a job's groups and
the engine's stream at a high priority, both since removed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.job import LOADER_CLOCKS, free_engine, whole_job
from benchmarks.job_workload import MIXES, job_model, write_media
from benchmarks.profiling.job_phases import SHAPES, job_generation, job_rows
from model.engine.sizing import CUDA_SLOTS

CLOCK = time.perf_counter


def parse_arm(text: str) -> tuple[str, dict[str, object]]:
    """`NAME` or `NAME:module.SETTING=VALUE,...` -> (NAME, {"module.SETTING": VALUE})."""
    name, _, sets = text.partition(":")
    changes = {}
    for item in filter(None, sets.split(",")):
        target, _, value = item.partition("=")
        changes[target.strip()] = ast.literal_eval(value.strip())
    return name, changes


@contextmanager
def settings(changes: dict[str, object]):
    """Module settings ("module.SETTING": value) changed while open."""
    before = []
    for target, value in changes.items():
        module, _, name = target.rpartition(".")
        owner = importlib.import_module(module)
        before.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in reversed(before):
            setattr(owner, name, value)


def timed_job(model, data: list, lengths: list[int], work: Path, gen, batch: int) -> dict:
    """`dr bench job`'s whole job with fresh features, with its loader's clocks (benchmarks/job.py `loader_clocks`),
    its engine freed after."""
    result = whole_job(model, data, lengths, work, gen, batch)
    free_engine()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=2858)
    parser.add_argument("--mix", choices=MIXES, default="catalog")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arm", action="append", help="NAME or NAME:module.SETTING=VALUE,... (repeatable)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each row's audio and video")
    parser.add_argument("--work", default="/tmp/dr_job_order")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = parser.parse_args()
    arms = dict(parse_arm(a) for a in args.arm or ["default"])
    sizes, encoder_size, device = SHAPES[args.tiny]
    work = Path(args.work)
    data, lengths = job_rows(args.rows, args.mix, args.tiny)
    write_media(work / "media", data, args.seconds)
    model = job_model(work, sizes, encoder_size, device)
    gen, batch = job_generation(args.mix, lengths, args.tiny), CUDA_SLOTS["job"]
    first = timed_job(model, data, lengths, work, gen, batch)
    print(f"first job {first['wall_s']} s", flush=True)
    report = {
        "device": device_name(),
        "mix": args.mix,
        "rows": len(data),
        "useful_tokens": sum(lengths),
        "first_job": first,
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms:
            with settings(arms[arm]):
                run = timed_job(model, data, lengths, work, gen, batch)
            runs[arm].append(run)
            print(
                f"{arm} {repeat + 1}: {run['wall_s']} s (first rows {run['first_rows_s']}, media done "
                f"{run['media_done_s']}, encoder calls {run['encoder_calls_s']} s, waits {run['encoder_waits_s']} s, "
                f"inputs waited for {run['input_waits_s']} s), "
                f"{run['useful_tokens_per_s']} useful tok/s",
                flush=True,
            )
            # after every run: a run cut by its time limit keeps the runs before
            Path(args.out).write_text(json.dumps(report | {"arms": summary(runs, arms)}, indent=1))
    print(json.dumps({arm: (a["median_wall_s"], a["wall_s"]) for arm, a in summary(runs, arms).items()}, indent=1))


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


RUN_FIGURES = ("wall_s", "first_rows_s", "media_done_s", *(f"{n}_s" for n in LOADER_CLOCKS), "useful_tokens_per_s")


def summary(runs: dict[str, list[dict]], arms: dict[str, dict]) -> dict:
    """Per arm: its settings, the median wall and each run's figures in the order run."""
    return {
        arm: {
            "settings": arms[arm],
            "median_wall_s": statistics.median(r["wall_s"] for r in done) if done else None,
            **{key: [r[key] for r in done] for key in RUN_FIGURES},
            "runs": done,
        }
        for arm, done in runs.items()
    }


if __name__ == "__main__":
    main()
