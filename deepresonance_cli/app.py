"""The `dr` command: one root app, one small module per verb group. No model logic lives here."""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from typing import NoReturn

import typer

from deepresonance_cli import __version__, bench, bench_data, data, demo, eval_cmd, infer, serve
from deepresonance_cli import ckpt as ckpt_cli
from deepresonance_cli import train as train_cli
from deepresonance_cli.errors import describe, fail
from model.io.errors import CkptError

app = typer.Typer(
    name="dr",
    help="DeepResonance toolkit: checkpoints, training, inference and evaluation for multimodal music understanding.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(ckpt_cli.app, name="ckpt")
app.command("eval")(eval_cmd.eval_command)
app.add_typer(data.app, name="data")
data.app.command("convert")(bench_data.convert)
app.command("infer")(infer.infer)
app.command("ask")(infer.ask)
app.add_typer(bench.app, name="bench")
app.command("train")(train_cli.train)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)


# What a user's input can cause (missing or damaged files, full disks, bad rows or options): one line, never a trace.
# CkptError is a RuntimeError: listed by name so that other RuntimeErrors (bugs) keep their traceback.
KNOWN_ERRORS = (OSError, ValueError, MemoryError, CkptError)  # MemoryError: a slot cache that cannot fit
# Python's default (700 net allocations) ran 7 full collections over a tiny `dr infer` job's heap of torch, transformers
# and Dynamo objects; at 10,000 none ran and its engine was built 1.1 s sooner on this project's CPU (5.48 s before).
# Cycles are still collected. benchmarks/results/2026-12-07-cpu-process-overhead/
GC_YOUNG_THRESHOLD = 10_000


@app.callback()
def threads(
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads per process for torch (sets OMP_NUM_THREADS before torch loads). With other jobs on the "
        "same cores, torch's default of one thread per core made dr infer 15-50x slower; 1 per job removed that.",
    ),
) -> None:
    """DeepResonance toolkit: checkpoints, training, inference and evaluation for multimodal music understanding."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when it is imported, inside the command


@app.command()
def version() -> None:
    """Print the toolkit version."""
    typer.echo(f"dr {__version__}")


def main() -> None:
    """Bad input (missing files, malformed rows, wrong checkpoints) ends in one line saying what and where."""
    from transformers.utils import logging as hf_logging

    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    hf_logging.disable_progress_bar()  # dr draws its own progress; transformers' per-load bars are noise here
    hf_logging.set_verbosity_error()
    try:
        try:
            app()
        except KNOWN_ERRORS as err:
            fail(describe(err))
    except SystemExit as done:
        exit_now(done.code)


def exit_now(code: object) -> NoReturn:
    """End the process once its exit handlers have run, without the interpreter's teardown: after a tiny `dr infer`
    job had written its last answer, freeing its modules took 1.4-1.5 s of the process (benchmarks/results/
    2026-12-07-cpu-process-overhead/). Every file dr writes is closed by then; while a thread that Python would wait
    for still runs, the process exits as usual."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if any(t.is_alive() for t in others):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # as the interpreter does with SystemExit("message")
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()  # the handlers a normal exit runs: logging's flush, locks, temporary folders, children
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
