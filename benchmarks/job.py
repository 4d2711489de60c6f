"""`dr bench job`: `dr infer` jobs shaped like real ones (benchmarks/job_workload.py), timed end to end with the
engine's start-up included, beside the same rows straight through the engine (warm) and the floor of the rows."""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.job_workload import MIXES, figures, floor, job_model, mix_rows, oracle, write_media
from benchmarks.workloads import MUSICCAPS_ROWS
from model.config import VICUNA_7B, GenerationConfig
from model.engine.sizing import CUDA_SLOTS

CLOCK = time.perf_counter
WARMUP_TOKENS = 16  # the engine-only warm-up: one engine-full of rows this long compiles and captures its steps


def bench_job(
    rows: int = MUSICCAPS_ROWS,
    mixes: Sequence[str] = MIXES,
    seconds: float = 10.0,
    batch: int = CUDA_SLOTS["job"],
    budget: int = 512,
    workdir: str = "/tmp/dr_job",
    decoder: str = "engine",
    sizes: dict = VICUNA_7B,
    encoder_size: str = "huge",
    device: str = "cuda",
    log: Callable[[str], None] = print,
) -> dict:
    """Per mix (musiccaps first: the shape of earlier runs), in one process and on one model: `run_inference` on
    `rows` rows with their own media files (`seconds` long) and a fresh feature cache, from the call to the last row
    (compile and capture included: the first mix pays the process's cold start; its decoding processes start with
    the model's build, as `dr infer`'s with its load); the same job again with every
    feature cached (another checkpoint evaluated on the same set: no media decoded, encoded or, where their
    digests are remembered, read); then the same rows' features straight through a warm engine, then the floor
    arithmetic of the rows. Random weights never stop: each row answers its oracle length, at most `budget` (the
    catalog mix's max_new_tokens, as `dr infer` asks by default; the musiccaps mix asks for its 64 tokens, as
    earlier runs did). `batch` is the job's slot count."""
    from model.data.catalog import media_files
    from model.data.row_features import DECODE_WORKERS
    from model.media.decoders import start_decoders

    work = Path(workdir)
    on_cuda = device.startswith("cuda")
    first_rows = mix_rows(rows, mixes[0])[0]
    # the first job's decoding processes start with the model's build, as `dr infer` starts them with its load (a
    # later job's start from the forkserver the first one left, which is up in a fraction of a second)
    decoders = start_decoders(media_files(first_rows), torch.device(device))
    built = CLOCK()
    model = job_model(work, sizes, encoder_size, device)
    report = {
        "device": torch.cuda.get_device_name() if on_cuda else device,
        "rows": rows,
        "audio_seconds": seconds,
        "batch": batch,
        "budget": budget,
        "decoder": decoder,
        "decode_workers": DECODE_WORKERS,
        "model_build_s": round(CLOCK() - built, 2),
        "mixes": {},
    }
    for mix in mixes:
        data, lengths = mix_rows(rows, mix)
        lengths = [min(n, budget) for n in lengths]
        write_media(work / "media", data, seconds)
        gen = GenerationConfig(max_new_tokens=token_budget(mix, lengths, budget), do_sample=False, decoder=decoder)
        whole = whole_job(model, data, lengths, work, gen, batch, decoders=decoders)
        if decoders is not None:
            decoders.close()
            decoders = None
        log(f"{mix}: whole job {whole['wall_s']} s, {whole['useful_tokens_per_s']} useful tok/s")
        free_engine()
        cached = whole_job(model, data, lengths, work, gen, batch, fresh_features=False)
        log(f"{mix}: whole job, features cached {cached['wall_s']} s, {cached['useful_tokens_per_s']} useful tok/s")
        free_engine()
        alone = engine_only(model, data, lengths, work, replace(gen, decoder="engine"), batch)
        log(f"{mix}: engine alone {alone['wall_s']} s, {alone['useful_tokens_per_s']} useful tok/s")
        free_engine()
        least = floor(model, data, lengths, alone["slots"])
        report["mixes"][mix] = {
            "rows": rows,
            "useful_tokens": sum(lengths),
            "max_new_tokens": gen.max_new_tokens,
            "whole_job": whole,
            "whole_job_features_cached": cached,
            "engine_only": alone,
            "floor": least,
            # seconds over seconds: how many times longer the whole job takes than the engine alone, than the floor
            "whole_job_over_engine_only": round(whole["wall_s"] / alone["wall_s"], 2),
            "whole_job_over_floor": round(whole["wall_s"] / least["floor_s"], 2),
        }
        if mix == "musiccaps":  # the fields of earlier `dr bench job` results, for comparison
            report |= {
                "wall_seconds": whole["wall_s"],
                "rows_per_s": whole["rows_per_s"],
                "answered": whole["rows"],
                "failed": whole["failed"],
            }
    return report


LOADER_CLOCKS = ("encoder_calls", "encoder_waits", "input_waits")  # loader_clocks' names


@contextmanager
def loader_clocks(marks: list[float], clocks: dict[str, list[float]]):
    """While open: the clock at the end of each group's encoding (the loader's last stage) appended to `marks`, and
    the seconds of each call of the loader's steps to `clocks`: "encoder_calls" (queuing an encoder call's GPU work,
    model/media/encoding.py `Queued.call`), "encoder_waits" (waiting for a call's features: its GPU work, behind the
    engine's steps on a shared GPU, `Queued.finish`) and "input_waits" (waiting for a group's decoded inputs from the
    decoding processes, `LookupInProcesses.result`), so that a setting's effect on the loader shows beside its effect
    on the job."""
    import model.infer.job as job
    from model.media.encoding import Queued
    from model.media.features import LookupInProcesses

    real = (job.encode_media, Queued.call, Queued.finish, LookupInProcesses.result)

    def encode_media(*args, **kwargs):
        out = real[0](*args, **kwargs)
        marks.append(CLOCK())
        return out

    def clocked(method, name):
        def run(*args, **kwargs):
            start = CLOCK()
            try:
                return method(*args, **kwargs)
            finally:
                clocks.setdefault(name, []).append(CLOCK() - start)

        return run

    job.encode_media = encode_media
    Queued.call = classmethod(clocked(real[1].__func__, "encoder_calls"))
    Queued.finish = clocked(real[2], "encoder_waits")
    LookupInProcesses.result = clocked(real[3], "input_waits")
    try:
        yield
    finally:
        job.encode_media, Queued.call, Queued.finish, LookupInProcesses.result = real


def whole_job(
    model,
    data: list,
    lengths: list[int],
    work: Path,
    gen: GenerationConfig,
    batch: int,
    fresh_features: bool = True,
    decoders=None,
) -> dict:
    """`run_inference` as `dr infer` runs it (media decoded and encoded through the feature cache, the engine sized,
    compiled and run, the journal written), timed from the call to its last row and to its first finished rows, with
    its loader's clocks (`loader_clocks`).
    `decoders`: decoding processes started earlier, as `dr infer` starts them before its model's load (else the job
    starts its own). Every row must be answered; with the engine, every answer must hold exactly its oracle length."""
    from model.infer.job import run_inference
    from model.media.features import FeatureCache

    if fresh_features:
        shutil.rmtree(work / "features", ignore_errors=True)
    shutil.rmtree(work / "results", ignore_errors=True)
    cache = FeatureCache.for_encoder(work / "features", model.visual_encoder)
    first: list[float] = []
    _sync()
    reset_peak_memory()
    marks: list[float] = []
    clocks: dict[str, list[float]] = {}
    start = CLOCK()
    with oracle(model, data, lengths) as made, loader_clocks(marks, clocks):
        summary = run_inference(
            model,
            data,
            work / "media",
            work / "results" / "job.json",
            gen,
            batch,
            cache,
            on_progress=lambda n: first or first.append(CLOCK() - start),
            decoders=decoders,
        )
        _sync()
        wall = CLOCK() - start
    assert summary.answered == len(data) and not summary.failed, summary.failed[:3]
    useful = sum(lengths)
    if gen.decoder == "engine":
        assert made["tokens"] == useful, f"the job made {made['tokens']} tokens, its rows' lengths sum to {useful}"
    return {
        "wall_s": figures(wall),
        "first_rows_s": figures(first[0]),
        "rows": summary.answered,
        "failed": len(summary.failed),
        "rows_per_s": round(summary.answered / wall, 2),
        "slots": made["slots"],
        **pool_figures(made["engine"]),
        "useful_tokens": useful,
        "generated_tokens": made["tokens"],
        "useful_tokens_per_s": round(useful / wall, 1),
        "encoded_files": made["encoded"],
        "media_done_s": round(marks[-1] - start, 2) if marks else None,
        "groups_done_s": [round(m - start, 2) for m in marks],
        "encoder_calls": len(clocks.get("encoder_calls", [])),
        **{f"{name}_s": round(sum(clocks.get(name, [])), 2) for name in LOADER_CLOCKS},
    }


def engine_only(model, data: list, lengths: list[int], work: Path, gen: GenerationConfig, batch: int) -> dict:
    """The same rows' features (read from the job's feature cache, untimed) through an engine sized and set up as the
    job sets up its own (its prefill compiled where the job's would be), in the job's order (shortest prompts first),
    after a warm-up of one engine-full of short rows: the engine alone, warm. Every row must end at exactly its
    oracle length."""
    from model.data.row_features import row_media
    from model.engine.model_runner import job_compiles_prefill
    from model.engine.scheduler import Engine
    from model.engine.sequence import Request
    from model.engine.sizing import top_k_cap
    from model.media.features import FeatureCache
    from model.media.preprocess import MediaError
    from model.network.deepresonance import Example

    cache = FeatureCache.for_encoder(work / "features", model.visual_encoder)
    media = row_media(model, data, work / "media", cache, batch)
    assert not any(isinstance(m, MediaError) for m in media)
    examples = [Example(r.input, r.instruction, m) for r, m in zip(data, media, strict=True)]
    prompts = [model.example_length(e) for e in examples]
    order = sorted(range(len(examples)), key=prompts.__getitem__)
    reset_peak_memory()
    started = CLOCK()
    engine = Engine.sized(
        model, max(prompts), gen.max_new_tokens, batch, k_cap=top_k_cap(model, gen),
        compile_prefill=job_compiles_prefill(sum(prompts)),
    )  # fmt: skip
    warm = replace(gen, max_new_tokens=min(WARMUP_TOKENS, gen.max_new_tokens))
    for _ in engine.run(Request(i, examples[i], warm, i) for i in order[: engine.slots]):
        pass
    _sync()
    warmup = CLOCK() - started
    requests = (Request(i, examples[i], replace(gen, max_new_tokens=lengths[i]), i) for i in order)
    made: dict[int, int] = {}
    first = None
    start = CLOCK()
    for ended in engine.run(requests):
        made.update((u.handle, len(u.ids)) for u in ended)
        first = first if first is not None else CLOCK() - start
    _sync()
    wall = CLOCK() - start
    assert [made.get(i) for i in range(len(data))] == lengths, "a row did not end at its own length"
    return {
        "wall_s": figures(wall),
        "first_rows_s": figures(first),
        "rows": len(made),
        "slots": engine.slots,
        **pool_figures(engine),
        "warmup_s": round(warmup, 2),
        "useful_tokens": sum(lengths),
        "useful_tokens_per_s": round(sum(lengths) / wall, 1),
    }


def pool_figures(engine) -> dict:
    """The engine's cache pool (blocks of BLOCK positions), the rows it preempted for want of blocks, and its memory
    (memory_figures)."""
    if engine is None:
        return {}
    return {"pool_blocks": engine.book.blocks, "preempted": engine.preempted, **memory_figures(engine)}


def memory_figures(engine) -> dict:
    """The engine's pool in MiB and, on CUDA, the most memory the process's allocator held since the last
    reset_peak_memory beside the card's: the headroom that sizing.MEMORY_SHARE left (a long-prompt engine alone on an
    H100 preempted 94 rows for want of blocks, results/2026-12-07-h100-fused-encoder-jobs/)."""
    pools = (*engine.kv.keys, *engine.kv.values)
    out = {"pool_mib": round(sum(p.numel() * p.element_size() for p in pools) / 2**20, 1)}
    if torch.cuda.is_available():
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        out["device_mib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20, 1)
    return out


def reset_peak_memory() -> None:
    """Starts memory_figures' peak afresh (at what the allocator holds now)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def token_budget(mix: str, lengths: list[int], budget: int = 512) -> int:
    """A mix's max_new_tokens: a MusicCaps-shaped job's own answer length (64: `dr infer` run with that budget), the
    catalog's `budget` (its rows' answers vary up to it). It sets the engine's row width and pool, so every script
    that times a mix uses it, and their processes load one another's compiled steps."""
    return max(lengths) if mix == "musiccaps" else budget


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_engine() -> None:
    """Drops the last engine's slot cache before the next (compiled code is kept: later engines start warm)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
