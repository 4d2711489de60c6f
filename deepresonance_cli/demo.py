"""`dr demo`: the whole pipeline on synthetic data and a tiny model, on a CPU, with no downloads (demo/pipeline.py)."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

Opt = typer.Option
ROWS = [  # (group, key, label) shown in the before/after table
    ("coco", "bleu4", "coco BLEU-4"),
    ("coco", "meteor_1_5", "coco METEOR 1.5"),
    ("coco", "rouge_l", "coco ROUGE-L"),
    ("coco", "cider", "coco CIDEr"),
    ("music-llm", "bleu_u_char", "music-llm B-U (char)"),
    ("music-llm", "meteor", "music-llm METEOR (NLTK)"),
    ("music-llm", "rouge_l_recall", "music-llm ROUGE-L (R)"),
    *[("attributes", a, f"attribute accuracy: {a}") for a in ("instrument", "tempo", "loudness", "color", "shape")],
    ("attributes", "all", "attribute accuracy: all"),
    ("choice", "likelihood", "multiple choice (likelihood)"),
    ("choice", "likelihood (norm)", "multiple choice (likelihood, norm)"),
    ("choice", "likelihood, silence audio", "multiple choice, silence audio"),
    ("choice", "chance", "multiple choice: chance"),
]


def _fmt(value: float | None) -> str:
    return "unavailable" if value is None else f"{value:.3f}"


def _printable(text: str, width: int = 90) -> str:
    """An untrained model emits control bytes and runs on: show them as dots, cut at `width` characters."""
    text = "".join(c if c.isprintable() else "·" for c in text)
    return text if len(text) <= width else text[: width - 1] + "…"


def demo(
    out: Annotated[Path, Opt(help="Where data, checkpoints, deltas, answers and reports go.")] = Path("runs/demo"),
    variant: Annotated[str, Opt(help="alpha, or beta (with the pre-LLM fusion layer).")] = "alpha",
    seed: Annotated[int, Opt(help="Seed of the data, the tiny model and training.")] = 0,
    quick: Annotated[bool, Opt(help="Less data and fewer steps (the CI test): about half the time.")] = False,
) -> None:
    """Synthesize music data, build a tiny model, train stage 1 and 2, answer a held-out split, score before/after."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads: BERTScore is skipped unless cached
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's concern
    from transformers.utils.logging import disable_progress_bar

    from demo.pipeline import run_demo

    disable_progress_bar()  # a tiny model loads in milliseconds: no per-load bars between the steps

    if variant not in ("alpha", "beta"):
        raise typer.BadParameter(f"{variant}: expected alpha or beta", param_hint="--variant")
    console = Console()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    start = time.perf_counter()
    result = run_demo(out, variant, seed, quick, on_step=lambda s: console.rule(f"[bold]{s}", align="left"))
    total = time.perf_counter() - start

    table = Table(title=f"held-out split, {variant}: untrained vs trained (greedy)")
    for column in ("metric", "untrained", "trained"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for group, key, label in ROWS:
        table.add_row(label, *(_fmt(result.metrics[m][group].get(key)) for m in ("untrained", "trained")))
    console.print(table)
    for note in result.notes:
        console.print(f"[dim]{note}[/]")
    answers = Table(title="sample answers", show_lines=True)
    for column in ("instruction", "reference", "untrained", "trained"):
        answers.add_column(column, overflow="fold")
    for sample in result.samples:
        answers.add_row(*(_printable(sample[k]) for k in ("instruction", "reference", "untrained", "trained")))
    console.print(answers)
    console.print("[bold]written:[/]")
    for what, path in result.paths.items():
        console.print(f"  {what}: {path}")
    console.print("[bold]rerun a step by hand:[/]")
    for step, command in result.commands:
        console.print(f"  # {step}\n  {command}", highlight=False, soft_wrap=True)
    steps = ", ".join(f"{name} {sec:.0f}s" for name, sec in result.seconds.items())
    console.print(f"done in {total:.0f} s ({steps})")
