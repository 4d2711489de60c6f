"""#25's start-up target as a researcher meets it: a second `dr infer` process, on another dataset, reaches its first
finished rows within 10 s. `dr bench job` builds its weights in place and times the job from its call, so it leaves
out the process's imports and the load from disk; this runs the real command in fresh processes. A full-size
checkpoint set of zeros (model_load.py's, written once under --workdir and shared with it) answers MusicCaps-shaped
datasets (one 10 s wav of its own a row, "Describe the music in detail.", 64 new tokens: zero weights never stop
early): dataset A (on a fresh machine the compile is cold and its forms are stored), then B (other media: the
feature cache misses), then A with --overwrite (its features cached), then B and A in one process (`--dataset`
repeated: the second dataset's start without a process of its own), then A again with the weights read in the load
rather than while the process imports (the early read's gain, beside the third run). Each process is timed from its
start to its model's load, to its first engine's build, to each journal's first and last answer, and to its exit;
the journals (`<out>.jsonl`, an answer a line after the run's identity) and the process's log (for the lines that
say the model is loaded and an engine is built) are polled every 20 ms. The processes run in --workdir, their result
files in its results/ (`dr infer`'s default names).

    PYTHONPATH=. python3 benchmarks/profiling/second_process.py OUT.json [--rows 1024] [--workdir /tmp/dr_model_load]
    PYTHONPATH=. python3 benchmarks/profiling/second_process.py OUT.json --tiny  # the CPU check: tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.job_workload import mix_rows, write_media
from benchmarks.profiling.model_load import write_set
from benchmarks.workloads import NEW_TOKENS
from model.config import LLAMA_TINY, VICUNA_7B
from model.infer.journal import journal_path

CLOCK = time.perf_counter
POLL_S = 0.02
# the job's log line once its engine is built (model/infer/job.py): before it come the process's imports, the model's
# load and the engine's build (compiled forms loaded, CUDA graphs captured), the first media decoding beside them
BUILT = b"decoder: engine"
# `dr infer`'s log line once the model is loaded (deepresonance_cli/infer.py): the imports and the load before it
LOADED = b"model loaded in"
DR = ["-m", "deepresonance_cli.app"]
# `dr` without the reads begun before the imports (deepresonance_cli/infer.py EARLY_READ_DEVICES): the last run, beside
# the one before it with the same features cached, says what the early read gives a whole process
DR_READ_IN_LOAD = [
    "-c",
    "import runpy, deepresonance_cli.infer as m; m.EARLY_READ_DEVICES = (); "
    "runpy.run_module('deepresonance_cli.app', run_name='__main__')",
]


def write_datasets(folder: Path, rows: int, seconds: float) -> dict[str, Path]:
    """Datasets A and B, `rows` rows each, every row with a wav of its own (B's ids follow A's, so its tones differ)."""
    data, _ = mix_rows(2 * rows, "musiccaps")
    write_media(folder, data, seconds)
    files = {}
    for name, part in (("A", data[:rows]), ("B", data[rows:])):
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps([dataclasses.asdict(row) for row in part]))
    return files


def answers(journal: Path) -> int:
    """Finished rows in a journal: its complete lines after the run's identity."""
    try:
        return max(0, journal.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def timed_process(command: list[str], journals: list[Path], log: Path, cwd: Path) -> dict:
    """One `dr infer` process: seconds from its start to its model's load, to its first engine's build, to each
    journal's first answer and last answer, and to its exit."""
    for journal in journals:
        journal.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout's modules from `cwd` too
    begin = CLOCK()
    built = loaded = None
    first: list[float | None] = [None] * len(journals)
    last: list[float | None] = [None] * len(journals)
    counts = [0] * len(journals)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        while True:
            running = process.poll() is None
            now = CLOCK() - begin
            text = log.read_bytes()
            if loaded is None and LOADED in text:
                loaded = now
            if built is None and BUILT in text:
                built = now
            for i, journal in enumerate(journals):
                count = answers(journal)
                if count > counts[i]:
                    counts[i], last[i] = count, now
                    first[i] = now if first[i] is None else first[i]
            if not running:
                break
            time.sleep(POLL_S)
    result = {
        "model_loaded_s": loaded and round(loaded, 2),
        "engine_built_s": built and round(built, 2),
        "first_answers_s": [t and round(t, 2) for t in first],
        "last_answers_s": [t and round(t, 2) for t in last],
        "exit_s": round(CLOCK() - begin, 2),
        "answers": counts,
    }
    if process.returncode:
        result["error"] = log.read_text()[-2000:]
    return result


def options(rows: int) -> argparse.ArgumentParser:
    """The options of the scripts that run `dr infer` on this set: the report, the folder of the set and datasets,
    rows a dataset, seconds a wav, tiny shapes (the CPU check)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--workdir", default="/tmp/dr_model_load")
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tiny", action="store_true")
    return parser


def prepare(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Path]]:
    """The checkpoint set (written once, model_load.py's) and datasets A and B under --workdir: (the folder, the
    set's root, the datasets' files)."""
    sizes, encoder = (LLAMA_TINY, "tiny") if args.tiny else (VICUNA_7B, "huge")
    work = Path(args.workdir)
    root = work / ("tiny" if args.tiny else "7b")
    write_set(root, sizes, encoder)
    return work, root, write_datasets(work / "datasets", args.rows, args.seconds)


def main() -> None:
    args = options(rows=1024).parse_args()
    begin = CLOCK()
    work, root, files = prepare(args)
    report: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "args": vars(args),
        "prepared_s": round(CLOCK() - begin, 1),
        "processes": [],
    }
    cache = work / "features"
    shutil.rmtree(cache, ignore_errors=True)  # B's features from an earlier run would make its misses hits
    shutil.rmtree(work / "results", ignore_errors=True)  # an earlier run's answers would be resumed, not answered
    runs = (  # (what, datasets, flags, how dr starts)
        ("A", ["A"], [], DR),
        ("B: a second process, another dataset", ["B"], [], DR),
        ("A again, its features cached", ["A"], ["--overwrite"], DR),
        ("B then A in one process, features cached", ["B", "A"], ["--overwrite"], DR),
        ("A again, features cached, the weights read in the load", ["A"], ["--overwrite"], DR_READ_IN_LOAD),
    )
    for what, names, flags, dr in runs:
        datasets = [arg for name in names for arg in ("--dataset", str(files[name]))]
        command = [
            sys.executable, *dr, "infer", *datasets, "--ckpt-root", str(root), "--greedy",
            "--max-new-tokens", str(NEW_TOKENS), "--cache-dir", str(cache), *flags,
        ]  # fmt: skip
        journals = [journal_path(work / "results" / f"{name}_alpha.json") for name in names]  # dr infer's default
        log = work / f"run{len(report['processes']) + 1}.log"
        result = timed_process(command, journals, log, work)
        report["processes"].append({"run": what, "datasets": names, "flags": flags, **result})
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report["processes"][-1]), flush=True)
        if "error" in result:
            break
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
