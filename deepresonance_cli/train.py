"""`dr train`: the two-stage recipe (model/train/loop.py) from the command line; options override the stage defaults."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from deepresonance_cli.errors import short
from deepresonance_cli.options import TrainDtypeChoice, VariantChoice, check_device

console = Console(stderr=True)
PACKAGED_DEEPSPEED = {"zero2": Path(__file__).with_name("deepspeed_zero2.json")}

Opt = typer.Option


def read_options(path: Path) -> dict:
    """A JSON --config: an object of TrainConfig fields; anything else is one line naming the file."""
    from model.data.catalog import read_json

    options = read_json(path)
    if not isinstance(options, dict):
        raise ValueError(f"{path}: expected a JSON object of training options, got {type(options).__name__}")
    return options


def read_configs(paths: list[Path], stage: int) -> tuple[dict, dict]:
    """--config files in order, later ones winning: JSON objects of TrainConfig fields, or the original's YAML configs
    (base.yaml, stage_N.yaml: their recipe and LoRA / fusion keys). (TrainConfig fields, ModelConfig fields)."""
    from model.original_config import read_original_configs

    train_fields: dict = {}
    model_fields: dict = {}
    for path in paths:
        if path.suffix.lower() not in (".yaml", ".yml"):
            train_fields.update(read_options(path))
            continue
        original = read_original_configs([path])
        if original.stage is not None and original.stage != stage:
            raise ValueError(
                f"{path}: freeze_lm {original.stage == 1} is the original's stage-{original.stage} setting, but "
                f"--stage is {stage}"
            )
        train_fields.update(original.train)
        model_fields.update(original.model)
    return train_fields, model_fields


def train(
    variant: Annotated[VariantChoice, Opt(help="alpha, or beta (with the pre-LLM fusion encoder).")],
    stage: Annotated[
        int, Opt(min=1, max=2, help="1: align the projector (LLM frozen); 2: instruction-tune with LoRA.")
    ],
    out: Annotated[Path, Opt(help="Output folder: the final delta, checkpoint-N folders, TensorBoard logs.")],
    init: Annotated[Path | None, Opt(help="Delta to start from (stage 2: the stage-1 output).")] = None,
    datasets: Annotated[
        list[str] | None, Opt(help="Catalog names or row-format JSON files (repeat or comma-separate).")
    ] = None,
    data_root: Annotated[Path, Opt(help="Where the dataset files and media live.")] = Path("data"),
    cache_dir: Annotated[Path | None, Opt(help="Encoder-feature cache (default: <data-root>/.features).")] = None,
    ckpt_root: Annotated[Path, Opt(help="Checkpoint root laid out as the original's ckpt/ folder.")] = Path("ckpt"),
    config: Annotated[
        list[Path] | None,
        Opt(
            help="Training options: JSON of TrainConfig fields, or the original's YAML configs (base.yaml, "
            "stage_N.yaml: recipe, LoRA and fusion keys); repeat, later files win; flags win over all.",
        ),
    ] = None,
    epochs: int | None = None,
    max_steps: Annotated[
        int | None, Opt(help="Optimizer steps to train (the schedule spans them) instead of epochs.")
    ] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate (default 2e-4).")] = None,
    micro_batch: Annotated[int | None, Opt(help="Rows per device per micro-step (default 2).")] = None,
    grad_accum: int | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    train_embeddings: Annotated[
        bool | None,
        Opt(help="Train the resized embed_tokens/lm_head as the original did (stage-2 default; off: less state)."),
    ] = None,
    save_every: Annotated[
        int | None,
        Opt(
            min=0,
            help="Checkpoint every N optimizer steps (0: only at the end; default: every tenth of the run, the "
            "newest kept). Ctrl-C / SIGTERM always checkpoint before stopping.",
        ),
    ] = None,
    stop_after: Annotated[int | None, Opt(help="Stop (and checkpoint) after N steps; --resume carries on.")] = None,
    resume: Annotated[Path | None, Opt(help="A checkpoint folder, or an --out folder (its latest checkpoint).")] = None,
    overwrite: Annotated[bool, Opt(help="Start afresh in an --out that holds an earlier run (its files go).")] = False,
    deepspeed: Annotated[
        str | None, Opt(help="DeepSpeed config JSON, or 'zero2' (packaged: ZeRO-2, bf16). Launch with `deepspeed`.")
    ] = None,
    device: Annotated[
        str | None, Opt(callback=check_device, help="cpu, cuda, cuda:1 (default: cuda when available).")
    ] = None,
    dtype: Annotated[
        TrainDtypeChoice | None,
        Opt(help="Frozen weights: float32 or bfloat16 (default: bfloat16 on CUDA); trained ones: float32."),
    ] = None,
    progress: Annotated[bool, Opt(help="Show the progress bar.")] = True,
    local_rank: Annotated[int | None, Opt("--local_rank", hidden=True, help="Set by the deepspeed launcher.")] = None,
) -> None:
    """Train a DeepResonance delta (stage 1 then stage 2), on one device or many through DeepSpeed."""
    import torch

    from ckpt.layout import layout
    from model.config import ModelConfig, TrainConfig
    from model.io.dist import ranks_from_env
    from model.train.loop import train as run_training

    main_rank = ranks_from_env().main
    level = logging.INFO if main_rank else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console)])
    options, model_fields = read_configs(config, stage) if config else ({}, {})
    flags = dict(
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        micro_batch_size=micro_batch,
        grad_accum=grad_accum,
        max_length=max_length,
        seed=seed,
        train_embeddings=train_embeddings,
        save_every=save_every,
    )
    if datasets:
        flags["datasets"] = [name for item in datasets for name in item.split(",") if name]
    cfg = TrainConfig.for_stage(stage, **{**options, **{k: v for k, v in flags.items() if v is not None}})
    paths = layout(ckpt_root)
    result = run_training(
        cfg,
        stop_after=stop_after,
        progress=progress,
        variant=variant.value,
        model_config=ModelConfig.from_dict(model_fields) if model_fields else None,
        base=paths.vicuna,
        imagebind=paths.imagebind,
        out=out,
        init=init,
        data_root=data_root,
        cache_dir=cache_dir,
        deepspeed=PACKAGED_DEEPSPEED.get(deepspeed, deepspeed),
        device=device,
        dtype=getattr(torch, dtype.value) if dtype else None,
        resume=resume,
        overwrite=overwrite,
    )
    if not main_rank:
        return
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} row(s)[/] (first: {escape(short(result.skipped[0]))})")
    last = result.history[-1] if result.history else None
    summary = f"step {result.step}/{result.total_steps}" + (f", loss {last['loss']:.4f}" if last else "")
    where = out if result.step == result.total_steps else f"{out}/checkpoint-{result.step:06d}"
    console.print(f"{summary}; delta in {where}")
    if result.interrupted:
        console.print(f"stopped by {result.interrupted}; `--resume {out}` carries on from step {result.step}")
        raise typer.Exit(130)
