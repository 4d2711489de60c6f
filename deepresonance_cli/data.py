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
    from model.data.fetch.outcomes import Report

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
    console.print(f"rows with all their media: {report.rows_complete} of {report.rows - len(report.row_errors)}")
    problems = report.row_errors + report.media_errors
    for line in problems[:show]:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    if len(problems) > show:
        console.print(f"... and {len(problems) - show} more")
    if not report.ok:
        raise typer.Exit(1)


def media_table(report: Report) -> Table:
    """`dr data media`'s summary: rows complete, then files by outcome and reason."""
    from model.data.fetch.outcomes import FAILED, FETCHED, NO_SOURCE, PRESENT, UNAVAILABLE

    table = Table(title=report.dataset, caption=f"media: {report.media_root}/")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows with all their media", f"{report.rows_complete} of {report.rows}")
    table.add_row("files fetched", str(report.counts[FETCHED]))
    table.add_row("files already there", str(report.counts[PRESENT]))
    for status in (UNAVAILABLE, FAILED):
        for reason, n in sorted(report.reasons[status].items()):
            table.add_row(f"{status}: {reason}", str(n))
    table.add_row("files without a source", str(report.counts[NO_SOURCE]))
    table.add_row("table rows ignored (not named by the rows)", str(report.ignored_rows))
    return table


@app.command()
def media(
    dataset: str = typer.Option(..., "--dataset", help="Catalog name (e.g. musiccaps) or a row-format JSON file."),
    sources: Path = typer.Option(
        ..., "--sources", help="CSV: path,url[,start,end,kind] (`dr data sources` writes one)."
    ),
    media_root: Path | None = typer.Option(None, "--media-root", help="Media folder (default: the catalog's)."),
    jobs: int = typer.Option(4, "--jobs", min=1, help="Files fetched at once."),
    cookies: Path | None = typer.Option(None, "--cookies", help="Netscape cookies file passed to yt-dlp (sign-in)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try again what was recorded as unavailable."),
    report_path: Path | None = typer.Option(None, "--report", help="Also write the report as JSON here."),
    data_root: Path = DataRoot,
    split: str = typer.Option("test", "--split", help="Catalog split for a dataset name: test or train."),
) -> None:
    """Fetch the audio, images and videos the dataset's rows name, as the sources table says; resumable."""
    from rich.progress import Progress

    from model.data.catalog import DatasetError, resolve_dataset
    from model.data.fetch.job import run_media
    from model.data.fetch.outcomes import MediaJobError
    from model.data.fetch.sources import SourcesError

    def say(line: str) -> None:
        err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    try:
        spec = resolve_dataset(dataset, data_root, media_root, split)
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("media files", total=None)
            report = run_media(
                spec,
                sources,
                jobs,
                cookies,
                retry_failed,
                say,
                lambda _, total: bar.update(task, total=total, advance=1),
            )
    except (DatasetError, SourcesError, MediaJobError) as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    console.print(media_table(report))
    if report_path:
        report.write(report_path)
    if report.missing:
        raise typer.Exit(1)


@app.command("sources")
def sources_cmd(
    recipe: str = typer.Argument(
        ..., help="musiccaps, audioset, m2ugen, muchomusic or musicqa (README: Fetching the media)."
    ),
    metadata: list[Path] = typer.Argument(..., help="The recipe's metadata file(s)."),
    out: Path = typer.Option(..., "--out", help="The sources table to write (CSV)."),
    pattern: str | None = typer.Option(None, "--pattern", help="Media path of each entry (the recipe's fields)."),
    url_pattern: str | None = typer.Option(None, "--url-pattern", help="URL of each entry (the recipe's fields)."),
) -> None:
    """Write a sources table for `dr data media` from public metadata (recipes: musiccaps, audioset, m2ugen,
    muchomusic, musicqa)."""
    from model.data.fetch.recipes import RecipeError, write_recipe

    try:
        n, notes = write_recipe(recipe, metadata, out, pattern, url_pattern)
    except RecipeError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    for line in notes:
        err_console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(f"{n} sources in {out}")
