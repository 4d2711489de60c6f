"""The `dr` command: one root app, one small module per verb group. No model logic lives here."""

from __future__ import annotations

import typer

from deepresonance_cli import __version__, data, eval_cmd
from deepresonance_cli import ckpt as ckpt_cli

app = typer.Typer(
    name="dr",
    help="DeepResonance toolkit: checkpoints, training, inference and evaluation for multimodal music understanding.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(ckpt_cli.app, name="ckpt")
app.command("eval")(eval_cmd.eval_command)
app.add_typer(data.app, name="data")


@app.command()
def version() -> None:
    """Print the toolkit version."""
    typer.echo(f"dr {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
