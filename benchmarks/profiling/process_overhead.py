"""What a `dr infer` process spends outside its job: Python's collector during the imports, load and compile, and the
interpreter's teardown after the last answer is written. `dr`'s entry point (deepresonance_cli/app.py `main`, with
deepresonance_cli/process.py) raises the collector's youngest threshold (GC_YOUNG_THRESHOLD) and ends with
`exit_now`; this runs the real command in fresh processes with each of the two put back to Python's default, alone
and together, interleaved, on second_process.py's checkpoint set and dataset A (features and compiled forms warmed by
one unrecorded run first), and reports each variant's median seconds from the process's start to its engine's
build, to its last answer and to its exit.

    PYTHONPATH=. python3 benchmarks/profiling/process_overhead.py OUT.json --tiny  # this CPU
    PYTHONPATH=. python3 benchmarks/profiling/process_overhead.py OUT.json --rows 256  # a GPU, full-size zeros
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.profiling.second_process import options, prepare, timed_process
from benchmarks.workloads import NEW_TOKENS
from model.infer.journal import journal_path

# `python -c` runs `dr` through main with module attributes set first (sys.argv[1:] are dr's arguments)
LAUNCH = (
    "import sys, deepresonance_cli.app as dr, deepresonance_cli.process as p; {patch}; "
    "sys.argv = ['dr', *sys.argv[1:]]; dr.main()"
)
DEFAULT_COLLECTOR = "p.GC_YOUNG_THRESHOLD = 700"  # Python's own
TEARDOWN = "p.exit_now = sys.exit"  # the interpreter's usual exit
VARIANTS = {
    "before: default collector, teardown": f"{DEFAULT_COLLECTOR}; {TEARDOWN}",
    "collector threshold only": TEARDOWN,
    "exit_now only": DEFAULT_COLLECTOR,
    "dr as shipped": "pass",
}


def main() -> None:
    parser = options(rows=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work, root, files = prepare(args)
    dataset = files["A"]
    command = [
        "infer", "--dataset", str(dataset), "--ckpt-root", str(root), "--greedy", "--max-new-tokens", str(NEW_TOKENS),
        "--cache-dir", str(work / "features"), "--overwrite",
    ]  # fmt: skip
    journals = [journal_path(work / "results" / "A_alpha.json")]  # dr infer's default result file
    report: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "args": vars(args),
        "warm_up": timed_process([sys.executable, "-c", LAUNCH.format(patch="pass"), *command], journals,
                                 work / "warm_up.log", work),
        "runs": {name: [] for name in VARIANTS},
    }  # fmt: skip
    for repeat in range(args.repeats):
        for name, patch in VARIANTS.items():
            launch = [sys.executable, "-c", LAUNCH.format(patch=patch), *command]
            run = timed_process(launch, journals, work / f"overhead{repeat}.log", work)
            if "error" in run:
                sys.exit(f"{name}: {run['error']}")
            run["tail_s"] = round(run["exit_s"] - run["last_answers_s"][0], 2)
            report["runs"][name].append(run)
            print(name, json.dumps(run), flush=True)
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in ("engine_built_s", "exit_s", "tail_s")}
        for name, runs in report["runs"].items()
    }
    before = medians[next(iter(VARIANTS))]["exit_s"]
    report["medians"] = {name: m | {"exit_vs_before": round(m["exit_s"] / before, 3)} for name, m in medians.items()}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["medians"], indent=1))


if __name__ == "__main__":
    main()
