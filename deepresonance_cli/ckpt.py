"""`dr ckpt`: checkpoint setup and verification. Each command parses options and calls the `ckpt` package."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from ckpt.layout import PIECES, VICUNA_DELTA_REPO, layout
from deepresonance_cli.errors import fail
from deepresonance_cli.options import DtypeChoice
from model.io.errors import CkptError

app = typer.Typer(help="Download, build, verify and convert checkpoints.", no_args_is_help=True)


def _fail(e: CkptError) -> NoReturn:
    """One `error:` line per line of the message: a download names each piece that failed on its own line."""
    fail(*str(e).splitlines())


@app.command()
def download(
    what: str = typer.Argument("all", help=f"one of {', '.join(PIECES)}, all"),
    root: Path = typer.Option(Path("ckpt"), help="checkpoint root (the original's ckpt/ layout)"),
    imagebind_url: str = typer.Option(None, help="ImageBind-huge URL (default: $DR_IMAGEBIND_URL or Meta's URL)"),
    force: bool = typer.Option(False, help="fetch again even what is already in place"),
) -> None:
    """Fetch the alpha/beta deltas (Hugging Face hub) and ImageBind-huge, resumably and verified."""
    from ckpt.download import download as run_download

    if what not in (*PIECES, "all"):
        raise typer.BadParameter(f"expected one of {', '.join(PIECES)}, all", param_hint="WHAT")
    try:
        for path in run_download(what, root, imagebind_url=imagebind_url, force=force):  # type: ignore[arg-type]
            typer.echo(f"ok: {path}")
    except CkptError as e:
        _fail(e)


@app.command()
def vicuna(
    llama: Path = typer.Option(..., exists=True, file_okay=False, help="LLaMA-7B in Hugging Face format"),
    delta: str = typer.Option(VICUNA_DELTA_REPO, help="Vicuna delta: a local folder or a hub repo id"),
    out: Path = typer.Option(layout("ckpt").vicuna, help="where Vicuna-7B-v0 is written"),
    dtype: DtypeChoice = typer.Option(DtypeChoice.float16, help="dtype of the written weights"),
    overwrite: bool = typer.Option(False, help="replace an existing model in --out"),
) -> None:
    """Build Vicuna-7B-v0 = LLaMA-7B + delta, one tensor at a time (memory stays near one tensor)."""
    from ckpt.vicuna import merge_vicuna

    try:
        typer.echo(f"ok: {merge_vicuna(llama, delta, out, dtype=dtype.value, overwrite=overwrite)}")
    except CkptError as e:
        _fail(e)


@app.command()
def doctor(
    root: Path = typer.Option(Path("ckpt"), help="checkpoint root"),
    hashes: bool = typer.Option(True, help="check recorded sha256 (--no-hashes: sizes and shapes only)"),
) -> None:
    """Report every checkpoint piece as OK / missing / corrupt, with the command that fixes it."""
    from ckpt.doctor import doctor as run_doctor
    from ckpt.doctor import render

    report = run_doctor(root, hashes=hashes)
    render(report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def convert(delta_dir: Path = typer.Argument(..., exists=True, file_okay=False)) -> None:
    """Convert a legacy pytorch_model.pt delta to delta.safetensors (same keys), loadable without pickle."""
    from ckpt.convert import convert_delta

    try:
        typer.echo(f"ok: {convert_delta(delta_dir)}")
    except CkptError as e:
        _fail(e)


@app.command()
def tiny(root: Path = typer.Argument(..., help="where the tiny set is written")) -> None:
    """Write a complete tiny random set (LLaMA + tokenizer, ImageBind, alpha/beta deltas) for tests and demos."""
    from ckpt.tiny import write_tiny_set

    typer.echo(f"ok: {write_tiny_set(root)}")


@app.command()
def export(
    variant: str = typer.Option(..., help="alpha or beta"),
    out: Path = typer.Option(..., help="the standalone folder to write"),
    root: Path = typer.Option(Path("ckpt"), help="checkpoint root (the original's ckpt/ layout)"),
    base: Path = typer.Option(None, help="Vicuna folder (default: under --root)"),
    delta: Path = typer.Option(None, help="delta folder (default: under --root)"),
    dtype: DtypeChoice = typer.Option(
        DtypeChoice.float32,
        help="dtype of the merged weights: float32 (default) gives the base + delta pair's answers exactly; float16 "
        "halves the size but changes some greedy answers",
    ),
) -> None:
    """Merge LoRA into Vicuna and write a folder that `dr infer --delta FOLDER` loads on its own. It holds the merged
    LLM, the projector (and beta's fusion) and the path of the ImageBind weights it was made with: ImageBind itself
    stays where it is (under --root), so an export is standalone for the LLM side only."""
    import torch

    from ckpt.export import export as run_export

    if variant not in ("alpha", "beta"):
        raise typer.BadParameter("expected alpha or beta", param_hint="--variant")

    typer.echo(f"ok: {run_export(root, variant, out, base, delta, getattr(torch, dtype.value))}")
