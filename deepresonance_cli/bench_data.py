"""`dr data convert`: a multiple-choice benchmark's published file -> dr's row format (model/data/benchmarks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deepresonance_cli.errors import fail

console = Console()

Benchmark = Annotated[str, typer.Argument(help="muchomusic, rulistening, mmau_music or mmar_music.")]


def convert(
    benchmark: Benchmark,
    source: Annotated[Path, typer.Argument(help="The benchmark's file (muchomusic.csv, RUL-MuchoMusic.json, ...).")],
    data_root: Annotated[Path, typer.Option(help="Where the converted file goes (the catalog's name for it).")] = Path(
        "data"
    ),
    out: Annotated[Path | None, typer.Option(help="Write here instead of <data-root>/<benchmark>_test.json.")] = None,
    audio_pattern: Annotated[
        str, typer.Option(help="MuChoMusic CSV only: audio path from {dataset} and {audio_id}.")
    ] = "{dataset}/{audio_id}.wav",
    all_tasks: Annotated[bool, typer.Option(help="MMAU / MMAR: keep every task, not only music.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the option order where the file lists the answer first.")] = 0,
    leave_one_out: Annotated[
        bool, typer.Option(help="RUListening: its recommended form, four-option rows voting per question.")
    ] = False,
) -> None:
    """Convert a benchmark file to rows with the options in the prompt; audio is not shipped (`dr data check`)."""
    from model.data.benchmarks import CONVERTERS, convert
    from model.data.catalog import CATALOG, DatasetError

    if benchmark not in CONVERTERS:
        raise typer.BadParameter(f"{benchmark}: expected one of {', '.join(CONVERTERS)}", param_hint="BENCHMARK")
    json_name, media = CATALOG[(benchmark, "test")]
    target = out or data_root / json_name
    try:
        options = dict(audio_pattern=audio_pattern, keep_all=all_tasks, seed=seed, leave_one_out=leave_one_out)
        rows = convert(benchmark, source, target, **options)
    except DatasetError as e:
        fail(str(e))
    console.print(f"{len(rows)} rows -> {target}", highlight=False)
    console.print(
        f"audio: put the files under {data_root / media}/ (or pass --media-root), then "
        f"`dr data check --dataset {benchmark if out is None else target}`",
        highlight=False,
        soft_wrap=True,
    )
