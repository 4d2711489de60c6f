"""`dr bench`: full-size speed measurements (random weights) on a GPU, written under benchmarks/results/ by default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deepresonance_cli.errors import fail

app = typer.Typer(help="Full-size benchmarks with random weights (needs a CUDA GPU).", no_args_is_help=True)
console = Console()


def need_cuda() -> None:
    """Checked by each command when it runs (not before `--help`)."""
    import torch

    if not torch.cuda.is_available():
        fail("dr bench builds 7B-sized models on a CUDA GPU; none is visible here")


@app.command("infer")
def infer(
    out: Annotated[Path, typer.Option(help="Where the JSON result goes.")] = Path("benchmarks/results/infer.json"),
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes for dr's generate path.")] = "1,64,512",
    static_batches: Annotated[str, typer.Option(help="Batch sizes for the static-cache loop.")] = "1,64,512",
) -> None:
    """Decode tokens/s, encoder clips/s and a MusicCaps-sized job: the original's way vs dr's, in one run."""
    need_cuda()
    from benchmarks.infer import bench_infer

    report = bench_infer(tuple(int(b) for b in batches.split(",")), tuple(int(b) for b in static_batches.split(",")))
    _write(out, report)
    table = Table(title=f"dr bench infer on {report['device']}")
    for column in ("path", "batch", "s", "tokens/s", "rows/s", "clips/s", "x original", "first call s"):
        table.add_column(column)
    for r in report["results"]:
        table.add_row(
            r["name"],
            str(r["batch"]),
            str(r["seconds"]),
            str(r["tokens_per_s"] or ""),
            str(r["rows_per_s"] or ""),
            str(r["clips_per_s"] or ""),
            str(r["ratio_to_original"] or ""),
            str(r["first_call_seconds"] or ""),
        )
    console.print(table)
    projected = report["musiccaps_job_seconds_steady"]
    console.print(f"MusicCaps-sized job projected from these steady rates, compile excluded (s): {projected}")


@app.command("train")
def train(
    out: Annotated[Path, typer.Option(help="Where the JSON result goes.")] = Path("benchmarks/results/train.json"),
    steps: int = 5,
    micro_batch: Annotated[int, typer.Option(help="dr's micro-batch (the original's is 2).")] = 16,
) -> None:
    """Stage-2 samples/s: the original's recipe (DeepSpeed ZeRO-2 CPU offload, fp16, encoder on the fly) vs dr's."""
    need_cuda()
    from benchmarks.train import bench_train

    report = bench_train(steps=steps, dr_micro_batch=micro_batch, log=console.print)
    _write(out, report)
    console.print(f"dr / original: {report['ratio']}x")


@app.command("job")
def job(
    out: Annotated[Path, typer.Option(help="Where the JSON result goes.")] = Path("benchmarks/results/job.json"),
    rows: int = 2858,
    mix: Annotated[
        str,
        typer.Option(
            help="musiccaps (one wav, a caption, 64 tokens per row), catalog (the catalog's sets mixed) or both."
        ),
    ] = "both",
    batch_size: Annotated[
        int | None, typer.Option(help="The job's most slots (rows decoding together); default: as `dr infer`'s.")
    ] = None,
    budget: Annotated[
        int, typer.Option(help="The catalog mix's max_new_tokens (answers end at their own lengths).")
    ] = 512,
    seconds: Annotated[float, typer.Option(help="Length of each row's audio and video.")] = 10.0,
    workdir: Annotated[Path, typer.Option(help="Scratch folder for the synthesized media.")] = Path("/tmp/dr_job"),
    decoder: Annotated[str, typer.Option(help="engine, static or generate (compile time included).")] = "engine",
    device: Annotated[str, typer.Option(help="cuda, or cpu with --tiny (a check that the benchmark runs).")] = "cuda",
    tiny: Annotated[bool, typer.Option(help="Tiny LLM and ImageBind instead of the full-size shapes.")] = False,
) -> None:
    """`dr infer` jobs shaped like real ones, in one process: per mix, the whole job from the call to its last row
    (start-up included), the same rows through the engine alone (warm), and the floor of the rows."""
    from benchmarks.job import bench_job
    from benchmarks.job_workload import MIXES
    from model.config import LLAMA_TINY, VICUNA_7B
    from model.engine.sizing import CUDA_SLOTS

    if mix not in (*MIXES, "both"):
        raise typer.BadParameter(f"{mix!r}: musiccaps, catalog or both", param_hint="--mix")
    if device.startswith("cuda"):
        need_cuda()
    report = bench_job(
        rows=rows,
        mixes=MIXES if mix == "both" else (mix,),
        seconds=seconds,
        batch=batch_size or CUDA_SLOTS["job"],
        budget=budget,
        workdir=str(workdir),
        decoder=decoder,
        sizes=LLAMA_TINY if tiny else VICUNA_7B,
        encoder_size="tiny" if tiny else "huge",
        device=device,
        log=console.print,
    )
    _write(out, report)
    table = Table(title=f"dr bench job on {report['device']} ({report['decoder']}, {report['rows']} rows per mix)")
    for column in (
        "mix",
        "measure",
        "s",
        "first rows s",
        "useful tokens",
        "useful tok/s",
        "job s / engine s",
        "job s / floor s",
    ):
        table.add_column(column)
    for name, m in report["mixes"].items():
        whole, alone, least = m["whole_job"], m["engine_only"], m["floor"]
        useful = str(m["useful_tokens"])
        table.add_row(
            name,
            "whole job",
            str(whole["wall_s"]),
            str(whole["first_rows_s"]),
            useful,
            str(whole["useful_tokens_per_s"]),
            str(m["whole_job_over_engine_only"]),
            str(m["whole_job_over_floor"]),
        )
        for measure, run in (("whole job, features cached", m["whole_job_features_cached"]), ("engine alone", alone)):
            times = (str(run["wall_s"]), str(run["first_rows_s"]), useful, str(run["useful_tokens_per_s"]))
            table.add_row("", measure, *times)
        table.add_row(
            "", f"floor ({least['slots']} slots)", str(least["floor_s"]), "", useful, str(least["useful_tokens_per_s"])
        )
    console.print(table)
    console.print(f"model built in {report['model_build_s']} s (not in the whole job's seconds)")


@app.command("engine")
def engine(
    out: Annotated[Path, typer.Option(help="Where the JSON result goes.")] = Path("benchmarks/results/engine.json"),
    rows: int = 2048,
    slots: Annotated[
        int | None, typer.Option(help="The engine's slot count; default: as `dr infer`'s on a GPU.")
    ] = None,
    compare_rows: Annotated[
        str, typer.Option(help="Rows for the static loop, generate and transformers' continuous batching.")
    ] = "512,128,512",
    only_engine: Annotated[bool, typer.Option(help="Only the engine (e.g. to time a second start-up).")] = False,
    workdir: Annotated[Path, typer.Option(help="Scratch folder.")] = Path("/tmp/dr_engine"),
    prompts: Annotated[
        str, typer.Option(help="Prompt shapes the engine runs: short (35 positions), long (170), varied (16-210).")
    ] = "short,long,varied",
) -> None:
    """A realistic-length job (answers of caption-like lengths, 512-token budget): the continuous-batching engine
    against the static loop, `generate`, transformers' continuous batching and the original's way, in one run; the
    engine also on multiple-choice-sized and varied prompts."""
    need_cuda()
    from benchmarks.engine import bench_engine
    from model.engine.sizing import CUDA_SLOTS

    report = bench_engine(
        rows=rows,
        slots=slots or CUDA_SLOTS["job"],
        only_engine=only_engine,
        prompts=tuple(prompts.split(",")),
        compare_rows=tuple(int(n) for n in compare_rows.split(",")),
        workdir=str(workdir),
        log=console.print,
        save=lambda partial: _write(out, partial),
    )
    for job in report["jobs"]:
        table = Table(title=f"{report['device']}: {job['tail']:.0%} long tail, mean answer {job['mean_length']} tokens")
        for column in ("decoder", "rows", "useful tokens", "wall s", "start-up s", "useful tok/s", "after start-up"):
            table.add_column(column)
        for r in job["results"]:
            if "error" in r:
                table.add_row(r["decoder"], str(r.get("rows", "")), f"failed: {r['error'][:60]}")
                continue
            table.add_row(
                r["decoder"],
                *(str(r.get(k, "")) for k in ("rows", "useful_tokens", "wall_s", "startup_s", "useful_tokens_per_s")),
                str(r.get("useful_tokens_per_s_after_startup", "")),
            )
        console.print(table)
    for shape, r in report.get("prompt_shapes", {}).items():
        console.print(
            f"engine, {shape} prompts (mean {r['mean_prompt_positions']} positions): "
            f"{r.get('useful_tokens_per_s', r.get('error'))} useful tok/s, {r['preempted']} rows preempted"
        )
    console.print(f"engine start-up (this process): {report['engine_startup_s']} s; the jobs above ran warm")
    for key, name in (("engine_batch1", "engine, one slot"), ("static_batch1", "static loop, batch 1")):
        if key in report:
            console.print(f"{name}: {report[key]['tokens_per_s']} tok/s")
    if "original_tokens_per_s" in report:
        console.print(f"original's way: {report['original_tokens_per_s']} tok/s (one row at a time)")


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


@app.command("serve")
def serve(
    out: Annotated[Path, typer.Option(help="Where the JSON result goes.")] = Path("benchmarks/results/serve.json"),
    clients: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients.")] = "1,16,64",
    requests_per_client: int = 8,
    slots: Annotated[int, typer.Option(help="The server's engine slots.")] = 64,
    budget: Annotated[int, typer.Option(help="The server's largest max_tokens.")] = 512,
    device: Annotated[str, typer.Option(help="cuda, or cpu with --tiny (a check that the benchmark runs).")] = "cuda",
    tiny: Annotated[bool, typer.Option(help="Tiny LLM and ImageBind instead of the full-size shapes.")] = False,
    eager: Annotated[bool, typer.Option(help="Decode without torch.compile and CUDA graphs.")] = False,
    workdir: Annotated[Path, typer.Option(help="Scratch folder.")] = Path("/tmp/dr_serve_bench"),
) -> None:
    """`dr serve` under load (full-size random weights, 10 s audio prompts, caption-length answers): requests/s and
    p50/p95 time to first and last token per number of concurrent streaming clients."""
    from benchmarks.serving import bench_serve
    from model.config import LLAMA_TINY, VICUNA_7B

    if device.startswith("cuda"):
        need_cuda()
    report = bench_serve(
        tuple(int(c) for c in clients.split(",")),
        requests_per_client,
        slots,
        budget,
        LLAMA_TINY if tiny else VICUNA_7B,
        "tiny" if tiny else "huge",
        device,
        str(workdir),
        eager=eager,
        log=console.print,
    )
    _write(out, report)
    table = Table(title=f"dr bench serve on {report['device']} ({report['slots']} slots)")
    for column in ("clients", "requests", "req/s", "tok/s", "first token p50/p95 s", "last token p50/p95 s"):
        table.add_column(column)
    for r in report["levels"]:
        first, last = r["time_to_first_token_s"], r["time_to_last_token_s"]
        table.add_row(
            *(str(r[k]) for k in ("clients", "requests", "requests_per_s", "tokens_per_s")),
            f"{first['p50']} / {first['p95']}",
            f"{last['p50']} / {last['p95']}",
        )
    console.print(table)
