"""`dr eval`: score prediction files against a dataset's references; the metrics live in `eval/`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

import eval as metrics
from eval import report


class Protocol(str, Enum):
    music_llm = "music-llm"
    coco = "coco"
    all = "all"


def eval_command(
    predictions: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="{id: {instruction: answer}} JSON"),
    dataset: str = typer.Option(..., help="a test set of the catalog (model/data.py) or a rows JSON file"),
    data_root: Path = typer.Option(Path("data"), help="root of the catalog's dataset files"),
    protocol: Protocol = typer.Option(Protocol.music_llm, help="music-llm (peer tables), coco (captioning) or all"),
    bertscore_model: str = typer.Option(metrics.DEFAULT_MODEL, help="hub name (local cache) or model folder"),
    out: Path = typer.Option(Path("results/eval_report.json"), help="JSON report; .md and .png are written beside"),
) -> None:
    """Score prediction files side by side: table here, JSON + Markdown + PNG chart at --out."""
    console = Console()
    console = console if console.is_terminal else Console(width=200)  # logs and pipes get whole tables
    from model.data import DatasetError

    try:
        path = metrics.dataset_path(dataset, data_root)
    except DatasetError as e:
        raise typer.BadParameter(str(e), param_hint="--dataset") from None
    if not path.is_file():
        raise typer.BadParameter(f"no dataset file {path} (`dr data download` fetches them)", param_hint="--dataset")
    rows = metrics.read_references(path)
    names = [p.stem if [q.stem for q in predictions].count(p.stem) == 1 else str(p) for p in predictions]
    loaded = {n: metrics.read_predictions(p) for n, p in zip(names, predictions, strict=True)}  # all checked first
    runs = {}
    for (n, preds), p in zip(loaded.items(), predictions, strict=True):
        with console.status(f"scoring {p} ({len(rows)} rows, {protocol.value})"):
            runs[n] = metrics.evaluate(preds, rows, protocol.value, bertscore_model)
        if runs[n]["counts"].get("not_text"):
            first = runs[n]["counts"]["not_text_rows"][0]
            console.print(
                f"{p}: {runs[n]['counts']['not_text']} answer(s) are not text and count as missing "
                f"(first: id {first['id']!r} holds a {first['type']})",
                style="yellow",
                markup=False,
            )
    for t in report.tables(runs):
        console.print(t)
    for note in dict.fromkeys(n for r in runs.values() for n in r["notes"]):
        console.print(note, style="yellow", markup=False)
    files = report.write(runs, out, {"dataset": str(path), "protocol": protocol.value})
    console.print("wrote " + ", ".join(str(f) for f in files.values()))
