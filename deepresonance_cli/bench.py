"""`dr bench`: full-size speed measurements (random weights) on a GPU, written under benchmarks/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Full-size benchmarks with random weights (needs a CUDA GPU).", no_args_is_help=True)
console = Console()


@app.command("infer")
def infer(
    out: Annotated[Path, typer.Option(help="Where the JSON result goes.")] = Path("benchmarks/infer.json"),
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes for dr's path.")] = "1,64,256,512",
    static_batches: Annotated[str, typer.Option(help="Batch sizes for the static-cache loop.")] = "1,8,32",
) -> None:
    """Decode tokens/s, encoder clips/s and a MusicCaps-sized job: the original's way vs dr's, in one run."""
    from model.benchmark import bench_infer

    report = bench_infer(tuple(int(b) for b in batches.split(",")), tuple(int(b) for b in static_batches.split(",")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = Table(title=f"dr bench infer on {report['device']}")
    for column in ("path", "batch", "s", "tokens/s", "clips/s", "x original"):
        table.add_column(column)
    for r in report["results"]:
        table.add_row(
            r["name"],
            str(r["batch"]),
            str(r["seconds"]),
            str(r["tokens_per_s"] or ""),
            str(r["clips_per_s"] or ""),
            str(r["ratio_to_original"] or ""),
        )
    console.print(table)
    console.print(f"MusicCaps-sized job (2,858 audio rows, 64 tokens): {report['musiccaps_job_seconds']}")
