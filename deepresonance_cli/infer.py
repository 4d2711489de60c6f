"""`dr infer` (a whole dataset, resumable) and `dr ask` (one answer for your own files)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ckpt.layout import layout
from deepresonance_cli.errors import short
from deepresonance_cli.options import AllowOutside, DtypeChoice, VariantChoice, check_device
from model.config import Decoder, GenerationConfig, ModelConfig

if TYPE_CHECKING:
    import torch

    from model.data.catalog import DatasetSpec, Row
    from model.io.early_read import EarlyRead
    from model.network.deepresonance import DeepResonance

console = Console(stderr=True)
EARLY_READ_DEVICES = ("cuda",)  # where `read_early` reads the LLaMA weights ahead of the load


CkptRoot = Annotated[Path, typer.Option(help="Checkpoint root laid out as the original's ckpt/ folder.")]
Variant = Annotated[VariantChoice, typer.Option(help="alpha or beta.")]
Base = Annotated[Path | None, typer.Option(help="Vicuna folder (default: <ckpt-root>/pretrained_ckpt/...).")]
Delta = Annotated[Path | None, typer.Option(help="Delta folder (default: <ckpt-root>/deepresonance_<variant>_...).")]
Device = Annotated[
    str | None, typer.Option(callback=check_device, help="cpu, cuda, cuda:1 (default: cuda when available).")
]
Dtype = Annotated[DtypeChoice | None, typer.Option(help="float32, bfloat16 or float16 (default: bfloat16 on CUDA).")]
# sampling defaults: GenerationConfig's (model/config.py), the original's settings
Temperature = Annotated[float, typer.Option(help="Sampling temperature.")]
TopP = Annotated[float, typer.Option(help="Top-p (nucleus) of sampling (1.0: off).")]
TopK = Annotated[int, typer.Option(help="Top-k of sampling (0: off; the default is the original's).")]
Seed = Annotated[int, typer.Option(help="Seed of sampling.")]
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens an answer may have.")]
LoraAlpha = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="LoRA alpha of a delta in the original's format (it keeps the rank, not alpha; default 32, the "
        "original's base.yaml); dr's own deltas record theirs.",
    ),
]
OriginalConfigs = Annotated[
    list[Path] | None,
    typer.Option(
        "--config",
        help="The original's YAML configs (base.yaml, stage_2.yaml; repeat, later ones win): their LoRA rank/alpha/"
        "dropout, fusion and max_length settings; --lora-alpha wins over them.",
    ),
]
DecoderName = Enum("DecoderName", {d: d for d in get_args(Decoder)}, type=str)
DecoderOption = Annotated[
    DecoderName,
    typer.Option(
        help="engine: continuous batching (compiled with CUDA graphs on CUDA; the compiled code is cached in "
        "$TORCHINDUCTOR_CACHE_DIR, by default ~/.cache/dr/inductor); static: static batches through a compiled loop; "
        "generate: transformers' generate, the reference.",
    ),
]


class RowsPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} rows/s" if speed else "- rows/s")


def model_config(configs: list[Path] | None, lora_alpha: int | None) -> ModelConfig | None:
    """The ModelConfig the loader starts from: the original's YAML settings, then --lora-alpha (None: defaults).
    A delta's own record (dr_config.json) and its tensors' shapes still win where they say something."""
    from model.original_config import ConfigError, read_original_configs

    fields = {}
    if configs:
        try:
            fields = read_original_configs(configs).model
        except ConfigError as err:
            raise typer.BadParameter(str(err), param_hint="--config") from None
    if lora_alpha is not None:
        fields["lora_alpha"] = lora_alpha
    return ModelConfig.from_dict(fields) if fields else None


def model_dtype(device: str, dtype: str | None) -> torch.dtype:
    """The dtype `load` gives the model: `dtype` where given, else bfloat16 on CUDA (the fast path) and float32."""
    import torch

    return getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def read_early(
    ckpt_root: Path, variant: str, base: Path | None, delta: Path | None, device: str, dtype: str | None
) -> list[EarlyRead]:
    """The LLaMA and ImageBind weights `load` will use, begun onto a GPU now (model/io/early_read.py) so that they
    arrive while the model's packages import; none on a CPU, where the load maps the files and a read would double the
    memory."""
    if not device.startswith(EARLY_READ_DEVICES):
        return []
    from model.io.early_read import EarlyRead
    from model.media.encoder import kept_weight
    from model.network.folders import llm_folder

    paths = layout(ckpt_root)
    torch_dtype = model_dtype(device, dtype)
    reads = [EarlyRead(llm_folder(base or paths.vicuna, delta or paths.delta_dir(variant)), device, torch_dtype)]
    if paths.imagebind.is_file():
        reads.append(EarlyRead(paths.imagebind, device, torch_dtype, keep=kept_weight))
    return reads


def load(
    ckpt_root: Path,
    variant: str,
    base: Path | None,
    delta: Path | None,
    device: str,
    dtype: str | None,
    config: ModelConfig | None = None,
    early: list[EarlyRead] | None = None,
):
    """The model for inference: on CUDA the fast path (bf16, SDPA, LoRA merged) unless a dtype is given.
    `config`: the ModelConfig to start from (`model_config`: the original's YAML, --lora-alpha). `early`: the
    `read_early` begun before (None: begun here, before the model's packages are imported)."""
    early = read_early(ckpt_root, variant, base, delta, device, dtype) if early is None else early
    from model.network.checkpoint import load_model

    paths = layout(ckpt_root)
    try:
        model = load_model(
            base or paths.vicuna,
            delta or paths.delta_dir(variant),
            paths.imagebind,
            variant,
            device,
            model_dtype(device, dtype),
            config=config,
            early=early,
        )
    finally:
        for read in early:  # a load that failed first lets its reads go (one that succeeded has taken them)
            read.close()
    model.merge_lora()
    return model


def generation(
    greedy: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    max_new_tokens: int,
    decoder: str = "engine",
) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        decoder=decoder,
    )


def default_device(device: str | None) -> str:
    import torch

    from model.io.dist import ranks_from_env

    if device:
        return device
    if torch.cuda.is_available():
        return f"cuda:{ranks_from_env().local_rank}"
    return "cpu"


def infer(
    ctx: typer.Context,
    dataset: Annotated[
        list[str],
        typer.Option(
            help="Catalog name (musiccaps, musicqa, ...) or a row-format JSON file. Repeat it to answer several "
            "datasets one after another with one loaded model (each its own result file): a second dataset then "
            "skips the process's imports and the model's load, and its engine's build where its rows round to the "
            "last one's shape."
        ),
    ],
    variant: Variant = "alpha",
    ckpt_root: CkptRoot = Path("ckpt"),
    base: Base = None,
    delta: Delta = None,
    data_root: Annotated[Path, typer.Option(help="Where the dataset files live.")] = Path("data"),
    media_root: Annotated[Path | None, typer.Option(help="Media folder (default: from the catalog).")] = None,
    out: Annotated[Path | None, typer.Option(help="Result JSON (default: results/<dataset>_<variant>.json).")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Rows decoding together: the engine's slots, at most (default: 512 on CUDA, as many as fit in its "
            "memory; 8 on CPU), or the rows per batch of the static decoders."
        ),
    ] = None,
    greedy: Annotated[bool, typer.Option(help="Greedy decoding instead of the original's sampling.")] = False,
    temperature: Temperature = GenerationConfig.temperature,
    top_p: TopP = GenerationConfig.top_p,
    top_k: TopK = GenerationConfig.top_k,
    seed: Seed = GenerationConfig.seed,
    max_new_tokens: MaxNewTokens = GenerationConfig.max_new_tokens,
    device: Device = None,
    dtype: Dtype = None,
    lora_alpha: LoraAlpha = None,
    config: OriginalConfigs = None,
    limit: Annotated[int | None, typer.Option(help="Answer only the first N rows.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Encoder-feature cache (default: .features beside the dataset file).")
    ] = None,
    decoder: DecoderOption = DecoderName.engine,
    overwrite: Annotated[
        bool, typer.Option(help="Answer every row again, discarding --out's answers (of this or another run).")
    ] = False,
    allow_outside_media_root: AllowOutside = False,
) -> None:
    """Answer every row of a dataset (or of several, one after another); rerun to resume (finished rows are
    skipped)."""
    # only what the decoding processes' start needs is imported before they start (model/media/decoders.py
    # start_decoders): the model's packages (transformers, peft) are imported while they start
    import torch

    from model.data.catalog import load_rows, media_files, resolve_dataset
    from model.infer.journal import output_lock
    from model.io.dist import ranks_from_env
    from model.media.decoders import start_decoders

    variant, dtype = VariantChoice(variant).value, DtypeChoice(dtype).value if dtype else None
    if out is not None and len(dataset) > 1:
        raise typer.BadParameter("names one result file: give one --dataset, or leave --out out", param_hint="--out")
    ranks = ranks_from_env()
    world, rank = ranks.world, ranks.rank
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console)], force=True)
    device = default_device(device)
    jobs: list[DatasetJob] = []
    for name in dataset:  # every dataset read and its result file locked before the model loads
        spec = resolve_dataset(name, data_root, media_root)
        result = out or Path("results") / f"{spec.name}_{variant}.json"
        if any(job.out == result for job in jobs):
            raise typer.BadParameter(f"{name} given twice (both would answer into {result})", param_hint="--dataset")
        rows, errors = load_rows(spec.json_path, allow_outside_media_root)
        for line in errors:
            console.print(f"[yellow]skipped invalid row[/] {escape(short(line))}")
        jobs.append(DatasetJob(spec, rows[:limit] if limit is not None else rows, len(errors), result))
    for job in jobs:
        lock = output_lock(job.out, rank).acquire()  # one process per result file: a second one stops here
        ctx.call_on_close(lock.release)
    files = sum(media_files(job.rows[rank::world]) for job in jobs)
    early = read_early(ckpt_root, variant, base, delta, device, dtype)  # the weights read while the rest imports
    for read in early:
        ctx.call_on_close(read.close)
    decoders = start_decoders(files, torch.device(device))
    if decoders is not None:
        ctx.call_on_close(decoders.close)
    from model.engine.sizing import default_slots
    from model.infer.kept_engine import KeptEngine

    batch_size = batch_size or default_slots(device, "job")
    began = time.perf_counter()
    model = load(ckpt_root, variant, base, delta, device, dtype, model_config(config, lora_alpha), early)
    logging.getLogger(__name__).info("model loaded in %.1f s (%s on %s)", time.perf_counter() - began, variant, device)
    gen = generation(greedy, temperature, top_p, top_k, seed, max_new_tokens, decoder.value)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    kept = KeptEngine()  # a dataset whose engine would have the last one's shape reuses it
    for job in jobs:
        answer_dataset(model, job, variant, gen, batch_size, cache_dir, rank, world, overwrite, decoders, kept)
    if world > 1:
        torch.distributed.destroy_process_group()


@dataclass
class DatasetJob:
    """One dataset of a `dr infer` call: where its rows and media are, its valid rows (after --limit), how many rows
    were invalid, and its result file."""

    spec: DatasetSpec
    rows: list[Row]
    invalid: int
    out: Path


def answer_dataset(
    model: DeepResonance,
    job: DatasetJob,
    variant: str,
    gen: GenerationConfig,
    batch_size: int,
    cache_dir: Path | None,
    rank: int,
    world: int,
    overwrite: bool,
    decoders,
    kept,
) -> None:
    """One dataset's rows through `run_inference` with a progress bar, its result file written and summed up; an
    interrupt keeps what its journal holds and ends the call (datasets after it are not started). `kept`: the engine
    kept between the call's datasets (model/infer/kept_engine.py)."""
    import torch

    from model.infer.job import run_inference
    from model.infer.journal import write_results
    from model.media.features import FeatureCache

    cache = FeatureCache.for_encoder(cache_dir or job.spec.json_path.parent / ".features", model.visual_encoder)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RowsPerSecond(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console, disable=rank != 0) as progress:
            task = progress.add_task(f"{job.spec.name} ({variant})", total=None)
            summary = run_inference(
                model,
                job.rows,
                job.spec.media_root,
                job.out,
                gen,
                batch_size,
                cache,
                rank,
                world,
                on_progress=lambda n: progress.advance(task, n),
                on_total=lambda n: progress.update(task, total=n),
                overwrite=overwrite,
                decoders=decoders,
                kept=kept,
            )
    except KeyboardInterrupt:
        answers = sum(len(v) for v in write_results(job.out, job.rows).values()) if rank == 0 else 0
        console.print(
            f"interrupted: {answers} answers are kept in {job.out} and its journal; rerun the same command to go on"
        )
        raise typer.Exit(130) from None
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        results = write_results(job.out, job.rows)
        show_summary(summary, job.invalid, sum(len(v) for v in results.values()), job.out)


def show_summary(summary, invalid: int, in_file: int, out: Path) -> None:
    table = Table(title="dr infer")
    for column in ("rows", "answered now", "already done", "media errors", "invalid rows", "answers in file"):
        table.add_column(column, justify="right")
    table.add_row(*map(str, (summary.total, summary.answered, summary.skipped, len(summary.failed), invalid, in_file)))
    console.print(table)
    for line in summary.failed:
        console.print(f"[red]failed[/] {escape(short(line))}")
    console.print(f"results: {out}")


def ask(
    question: Annotated[str, typer.Argument(help="The instruction, e.g. 'Describe the music.'")],
    audio: Annotated[Path | None, typer.Option(help="Music file (wav, mp3, flac, ogg).")] = None,
    image: Annotated[Path | None, typer.Option(help="Image file.")] = None,
    video: Annotated[Path | None, typer.Option(help="Video file.")] = None,
    variant: Variant = "alpha",
    ckpt_root: CkptRoot = Path("ckpt"),
    base: Base = None,
    delta: Delta = None,
    greedy: bool = False,
    temperature: Temperature = GenerationConfig.temperature,
    top_p: TopP = GenerationConfig.top_p,
    top_k: TopK = GenerationConfig.top_k,
    seed: Seed = GenerationConfig.seed,
    max_new_tokens: MaxNewTokens = GenerationConfig.max_new_tokens,
    device: Device = None,
    dtype: Dtype = None,
    lora_alpha: LoraAlpha = None,
    config: OriginalConfigs = None,
) -> None:
    """One answer about your own music (and image / video)."""
    from model.data.catalog import check_text

    variant, dtype = VariantChoice(variant).value, DtypeChoice(dtype).value if dtype else None
    try:
        check_text(question, "the question")
    except ValueError as e:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        raise typer.BadParameter(str(e), param_hint="QUESTION") from None
    device = default_device(device)
    early = read_early(ckpt_root, variant, base, delta, device, dtype)  # the weights read while the rest imports
    try:
        from model.generate.base import generate
        from model.media.preprocess import load_media
        from model.network.deepresonance import Example
        from model.text.prompt import TAGS

        given = (("audio", audio), ("image", image), ("video", video))
        media = [(m, load_media(m, p)) for m, p in given if p is not None]
        example = Example("".join(TAGS[m] for m, _ in media), question, media)  # bad media fail before loading
        start = model_config(config, lora_alpha)
        model: DeepResonance = load(ckpt_root, variant, base, delta, device, dtype, start, early)
    finally:
        for read in early:  # taken by the load, or let go where the media or the load failed
            read.close()
    answer = generate(model, [example], generation(greedy, temperature, top_p, top_k, seed, max_new_tokens))[0]
    typer.echo(answer)
