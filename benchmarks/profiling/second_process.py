"""#25's start-up target as a researcher meets it: a second `dr infer` process, on another dataset, reaches its first
finished rows within 10 s. `dr bench job` builds its weights in place and times the job from its call, so it leaves
out the process's imports and the load from disk; this runs the real command in fresh processes. A full-size
checkpoint set of zeros (model_load.py's, written once under --workdir and shared with it) answers MusicCaps-shaped
datasets (one 10 s wav of its own a row, "Describe the music in detail.", 64 new tokens: zero weights never stop
early): dataset A (on a fresh machine the compile is cold and its forms are stored), then B (other media: the
feature cache misses), then A with --overwrite (its features cached). Each process is timed from its start to the
journal's first answer, to its last, and to its exit; the journal (`<out>.jsonl`, an answer a line after the run's
identity) and the process's log (for the line that says its engine is built) are polled every 20 ms.

    PYTHONPATH=. python3 benchmarks/profiling/second_process.py OUT.json [--rows 1024] [--workdir /tmp/dr_model_load]
    PYTHONPATH=. python3 benchmarks/profiling/second_process.py OUT.json --tiny  # the CPU check: tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def timed_process(command: list[str], journal: Path, log: Path) -> dict:
    """One `dr infer` process: seconds from its start to its engine's build, to the journal's first answer and to its
    exit."""
    journal.unlink(missing_ok=True)
    begin = CLOCK()
    first = built = None
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            if built is None and BUILT in log.read_bytes():
                built = CLOCK() - begin
            if first is None and answers(journal):
                first = CLOCK() - begin
            time.sleep(POLL_S)
    exited = CLOCK() - begin
    if first is None and answers(journal):
        first = exited
    rows = answers(journal)
    result = {
        "engine_built_s": built and round(built, 2),
        "first_answers_s": first and round(first, 2),
        "exit_s": round(exited, 2),
        "answers": rows,
    }
    if process.returncode:
        result["error"] = log.read_text()[-2000:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--workdir", default="/tmp/dr_model_load")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    sizes, encoder = (LLAMA_TINY, "tiny") if args.tiny else (VICUNA_7B, "huge")
    work = Path(args.workdir)
    root = work / ("tiny" if args.tiny else "7b")
    begin = CLOCK()
    write_set(root, sizes, encoder)
    files = write_datasets(work / "datasets", args.rows, args.seconds)
    report: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "args": vars(args),
        "prepared_s": round(CLOCK() - begin, 1),
        "processes": [],
    }
    cache = work / "features"
    shutil.rmtree(cache, ignore_errors=True)  # B's features from an earlier run would make its misses hits
    for name, extra in (("A", []), ("B", []), ("A", ["--overwrite"])):
        out = work / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "deepresonance_cli.app", "infer", "--dataset", str(files[name]),
            "--ckpt-root", str(root), "--out", str(out), "--greedy", "--max-new-tokens", str(NEW_TOKENS),
            "--cache-dir", str(cache), *extra,
        ]  # fmt: skip
        if not extra:  # a fresh start: the earlier run's answers and features of this dataset go
            out.unlink(missing_ok=True)
        log = work / "results" / f"{name}{'-again' if extra else ''}.log"
        result = timed_process(command, journal_path(out), log)
        report["processes"].append({"dataset": name, "flags": extra, **result})
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report["processes"][-1]), flush=True)
        if "error" in result:
            break
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
