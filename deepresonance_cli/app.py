"""The `dr` command: one root app, one small module per verb group. No model logic lives here."""

from __future__ import annotations

import typer
from rich.console import Console

from deepresonance_cli import __version__, bench, data, demo, eval_cmd, infer, serve
from deepresonance_cli import ckpt as ckpt_cli
from deepresonance_cli import train as train_cli

app = typer.Typer(
    name="dr",
    help="DeepResonance toolkit: checkpoints, training, inference and evaluation for multimodal music understanding.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(ckpt_cli.app, name="ckpt")
app.command("eval")(eval_cmd.eval_command)
app.add_typer(data.app, name="data")
app.command("infer")(infer.infer)
app.command("ask")(infer.ask)
app.add_typer(bench.app, name="bench")
app.command("train")(train_cli.train)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)


@app.command()
def version() -> None:
    """Print the toolkit version."""
    typer.echo(f"dr {__version__}")


def main() -> None:
    """Bad input (missing files, malformed rows, wrong checkpoints) ends in one line saying what and where."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # dr draws its own progress; transformers' per-load bars are noise here
    hf_logging.set_verbosity_error()
    try:
        app()
    except (OSError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
