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
their features (their GPU work) and waiting for decoded inputs (`loader_clocks`), and `groups_done_s`, when each media
group was handed over.
2026-12-07's run (results/2026-12-07-h100-job-order-block32/) compared the media mixes spread over a job's groups and
the engine's stream at a high priority, both since removed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.job import free_engine, whole_job
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


LOADER_CLOCKS = ("encoder_calls", "encoder_waits", "input_waits")  # loader_clocks' names


@contextmanager
def loader_clocks(marks: list[float], clocks: dict[str, list[float]]):
    """While open: the clock at the end of each group's encoding (the loader's last stage) appended to `marks`, and
    the seconds of each call of the loader's steps to `clocks`: "encoder_calls" (queuing an encoder call's GPU work,
    model/media/encoding.py `Queued.call`), "encoder_waits" (waiting for a call's features: its GPU work, behind the
    engine's steps on a shared GPU, `Queued.finish`) and "input_waits" (waiting for a group's decoded inputs from the
    decoding processes, `LookupInProcesses.result`), so that a setting's effect on the loader shows beside its effect
    on the job."""
    import model.infer.job as job
    from model.media.encoding import Queued
    from model.media.features import LookupInProcesses

    real = (job.encode_media, Queued.call, Queued.finish, LookupInProcesses.result)

    def encode_media(*args, **kwargs):
        out = real[0](*args, **kwargs)
        marks.append(CLOCK())
        return out

    def clocked(method, name):
        def run(*args, **kwargs):
            start = CLOCK()
            try:
                return method(*args, **kwargs)
            finally:
                clocks.setdefault(name, []).append(CLOCK() - start)

        return run

    job.encode_media = encode_media
    Queued.call = classmethod(clocked(real[1].__func__, "encoder_calls"))
    Queued.finish = clocked(real[2], "encoder_waits")
    LookupInProcesses.result = clocked(real[3], "input_waits")
    try:
        yield
    finally:
        job.encode_media, Queued.call, Queued.finish, LookupInProcesses.result = real


def timed_job(model, data: list, lengths: list[int], work: Path, gen, batch: int) -> dict:
    """`dr bench job`'s whole job with fresh features, when each of its media groups was loaded, and how long the
    loader's steps took (the clocks from the job's call: the old features are removed first)."""
    shutil.rmtree(work / "features", ignore_errors=True)
    marks: list[float] = []
    clocks: dict[str, list[float]] = {}
    start = CLOCK()
    with loader_clocks(marks, clocks):
        result = whole_job(model, data, lengths, work, gen, batch, fresh_features=False)  # removed just above
    free_engine()
    return {
        **result,
        "media_done_s": round(marks[-1] - start, 2),
        "groups_done_s": [round(m - start, 2) for m in marks],
        "encoder_calls": len(clocks.get("encoder_calls", [])),
        **{f"{name}_s": round(sum(clocks.get(name, [])), 2) for name in LOADER_CLOCKS},
    }


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
