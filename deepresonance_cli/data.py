"""`dr data download` and `dr data check`: thin wrappers over model/data/catalog.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from deepresonance_cli.errors import fail
from deepresonance_cli.options import AllowOutside

if TYPE_CHECKING:
    from model.data.catalog import CheckReport

app = typer.Typer(help="Dataset text files: fetch them, and check rows and media.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

DataRoot = typer.Option(Path("data"), "--data-root", help="Folder holding the dataset JSON files and media folders.")


@app.command()
def download(data_root: Path = DataRoot) -> None:
    """Fetch the released dataset text files (Hugging Face Sony/DeepResonance_data_models, data/) into --data-root."""
    from model.data.catalog import DatasetError, download_data  # torch and decoders load only when a command runs

    try:
        path = download_data(data_root)
    except DatasetError as e:
        fail(str(e))
    console.print(f"dataset text files in {path}/")


def report_table(report: CheckReport) -> Table:
    table = Table(title=report.spec.name, caption=f"rows: {report.spec.json_path}, media: {report.spec.media_root}/")
    for column in ("what", "ok", "invalid / missing", "unreadable"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_row("rows", str(report.rows - len(report.row_errors)), str(len(report.row_errors)), "")
    for modality, counts in report.media.items():
        if counts:
            table.add_row(
                f"{modality} files", str(counts["present"]), str(counts["missing"]), str(counts["unreadable"])
            )
    return table


@app.command()
def check(
    dataset: str = typer.Option(..., "--dataset", help="Catalog name (e.g. musiccaps) or a row-format JSON file."),
    data_root: Path = DataRoot,
    media_root: Path | None = typer.Option(None, "--media-root", help="Media folder (default: the catalog's)."),
    split: str = typer.Option("test", "--split", help="Catalog split for a dataset name: test or train."),
    decode: bool = typer.Option(False, "--decode", help="Fully preprocess every media file instead of probing it."),
    show: int = typer.Option(20, "--show", help="How many problem lines to print."),
    allow_outside_media_root: AllowOutside = False,
) -> None:
    """Validate rows and look for missing or unreadable media; exits non-zero if anything is wrong."""
    from model.data.catalog import DatasetError, check_dataset, resolve_dataset

    try:
        spec = resolve_dataset(dataset, data_root, media_root, split)
        report = check_dataset(
            spec, decode, lambda files: track(files, "checking media", console=err_console), allow_outside_media_root
        )
    except DatasetError as e:
        fail(str(e))
    console.print(report_table(report))
    problems = report.row_errors + report.media_errors
    for line in problems[:show]:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    if len(problems) > show:
        console.print(f"... and {len(problems) - show} more")
    if not report.ok:
        raise typer.Exit(1)
