"""The `dr` command: one root app, one small module per verb group. No model logic lives here."""

from __future__ import annotations

import os

import typer

from deepresonance_cli import __version__, bench, bench_data, data, demo, eval_cmd, infer, process, serve
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
    process.tune_collector()  # before the imports: they are most of a process's collections
    process.warn_if_recompiled()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # dr draws its own progress; transformers' per-load bars are noise here
    hf_logging.set_verbosity_error()
    try:
        try:
            app()
        except KNOWN_ERRORS as err:
            fail(describe(err))
    except SystemExit as done:
        process.exit_now(done.code)


if __name__ == "__main__":
    main()
