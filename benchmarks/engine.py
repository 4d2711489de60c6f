"""`dr bench engine`: a realistic-length job through the continuous-batching engine beside the static loop,
`generate`, transformers' continuous batching and the original's way, in one process on one GPU."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from benchmarks.job import memory_figures, reset_peak_memory
from benchmarks.workloads import (
    NEW_TOKENS,
    audio_rows,
    decode,
    full_size_llm,
    never_stopping_model,
    prompt_rows,
    realistic_lengths,
)
from model.config import VICUNA_7B
from model.engine.sizing import CUDA_SLOTS


def _timed_job(name: str, run: Callable[[], float | None], rows: int, useful: int, log) -> dict:
    """Runs a decoder on a job; `run` returns the seconds to its first finished decode call (start-up) if it knows.
    A decoder that fails is recorded with its error, and the others still run."""
    _sync()
    start = time.perf_counter()
    try:
        startup = run()
    except Exception as err:
        log(f"{name} failed: {type(err).__name__}: {str(err)[:500]}")
        return dict(decoder=name, rows=rows, error=f"{type(err).__name__}: {str(err)[:500]}")
    _sync()
    wall = time.perf_counter() - start
    out = dict(decoder=name, rows=rows, useful_tokens=useful, wall_s=round(wall, 2))
    out["useful_tokens_per_s"] = round(useful / wall, 1)
    if startup is not None:
        out["startup_s"] = round(startup, 2)
        out["useful_tokens_per_s_after_startup"] = round(useful / (wall - startup), 1)
    log(" | ".join(f"{k} {v}" for k, v in out.items()))
    return out


class SavedList(list):
    """A result list that saves the whole report each time a result lands."""

    def __init__(self, save: Callable[[dict], None], report: dict) -> None:
        super().__init__()
        self.save, self.report = save, report

    def append(self, item: dict) -> None:
        super().append(item)
        self.save(self.report)


def _free() -> None:
    """Drops compiled code and CUDA graphs of the decoder just measured, and its cache memory, before the next."""
    import gc

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_engine(
    rows: int = 2048,
    slots: int = CUDA_SLOTS["job"],
    budget: int = 512,
    tails: tuple[float, ...] = (0.0, 0.02),
    compare_rows: tuple[int, int, int] = (512, 128, 512),
    workdir: str = "/tmp/dr_engine",
    only_engine: bool = False,
    log: Callable[[str], None] = print,
    save: Callable[[dict], None] = lambda report: None,
    sizes: dict = VICUNA_7B,
    device: str = "cuda",
    prompts: Sequence[str] = ("short",),
) -> dict:
    """A realistic-length job (audio prompts, answers ending at caption-like lengths, `budget` max_new_tokens) through
    the engine and, on subsets of the same rows (`compare_rows` for the static loop, `generate` and transformers'
    continuous batching), the static-batch decoders (batches of 64 in dataset order, each running to its longest row,
    which is where real stopping would end it), and the original's way (one row at a time). Greedy; random weights
    never stop, so each row's own max_new_tokens is its drawn length (a length oracle inside this benchmark only).
    `save(report)` is called after each measurement, so a run cut short keeps what it finished. `prompts`: the engine
    also runs the first job's lengths on each other prompt shape named (benchmarks/workloads.py: PROMPT_SHAPES; the
    same engine, sized for the longest prompt of all)."""
    from model.config import GenerationConfig
    from model.engine.scheduler import Engine
    from model.engine.sequence import Request
    from model.engine.sizing import cache_length
    from model.generate.base import generate_ids

    model = never_stopping_model(workdir, sizes, device)
    on_cuda = device == "cuda"
    report = {
        "device": torch.cuda.get_device_name() if on_cuda else device,
        "budget": budget,
        "slots": slots,
        "jobs": [],
    }
    greedy = GenerationConfig(max_new_tokens=budget, do_sample=False)
    examples = audio_rows(rows)
    report["prompt_positions"] = model.example_length(examples[0])
    shaped = {shape: prompt_rows(model, rows, shape) for shape in prompts if shape != "short"}
    longest = max([report["prompt_positions"], *(model.example_length(e) for rows_ in shaped.values() for e in rows_)])
    jobs = []
    for tail in tails:
        lengths = [min(n, budget) for n in realistic_lengths(rows, tail)]
        jobs.append(lengths)
        report["jobs"].append(
            {"tail": tail, "mean_length": round(sum(lengths) / rows, 1), "results": SavedList(save, report)}
        )

    def engine_run(engine: Engine, lengths: list[int], examples: list = examples) -> float:
        start = time.perf_counter()
        refused = engine.submit(
            Request(i, ex, replace(greedy, max_new_tokens=k), i)
            for i, (ex, k) in enumerate(zip(examples[: len(lengths)], lengths, strict=True))
        )
        assert not refused, refused[0].error
        made, first = {}, None
        while engine.pending:
            made.update((u.handle, len(u.ids)) for u in engine.advance() if u.done)
            if made and first is None:  # the first rows are done: the compiled step has run
                first = time.perf_counter() - start
        assert [made[i] for i in range(len(lengths))] == lengths, "a row did not end at its own length"
        return first

    # one decoder at a time over every job (its compiled code is built once; its memory is freed before the next)
    kernel = "flex" if on_cuda else "sdpa"
    built = time.perf_counter()
    engine = Engine.sized(model, longest, budget, slots, k_cap=1, kernel=kernel)
    report["engine_build_s"] = round(time.perf_counter() - built, 2)
    report |= {"engine_slots": engine.slots, "pool_blocks": engine.book.blocks}
    # the process's first rows (one engine-full of 16-token answers) compile the step: the start-up a user waits
    # for; the jobs below then run warm
    report["engine_startup_s"] = round(report["engine_build_s"] + engine_run(engine, [16] * slots), 2)
    log(f"engine start-up (built, compiled, first rows done): {report['engine_startup_s']} s")
    for job, lengths in zip(report["jobs"], jobs, strict=True):
        job["results"].append(
            _timed_job(
                f"engine ({kernel})",
                lambda lengths=lengths, engine=engine: engine_run(engine, lengths),
                rows,
                sum(lengths),
                log,
            )
        )
    report["prompt_shapes"] = {}
    for shape, shaped_rows in shaped.items():
        sizes = [model.example_length(e) for e in shaped_rows]
        preempted = engine.preempted
        reset_peak_memory()
        result = _timed_job(
            f"engine ({kernel}), {shape} prompts",
            lambda rows_=shaped_rows, engine=engine: engine_run(engine, jobs[0], rows_),
            rows,
            sum(jobs[0]),
            log,
        )
        report["prompt_shapes"][shape] = {
            "mean_prompt_positions": round(sum(sizes) / len(sizes), 1),
            "prompt_positions_range": [min(sizes), max(sizes)],
            "preempted": engine.preempted - preempted,
            **memory_figures(engine),
            **result,
        }
        save(report)
    del engine
    _free()
    report["engine_batch1"] = _engine_batch1(
        model, examples[0], greedy, cache_length(report["prompt_positions"], budget)
    )
    save(report)
    log(f"engine, one slot: {report['engine_batch1']['tokens_per_s']} tok/s ({NEW_TOKENS} tokens, prefill included)")
    _free()
    if only_engine:
        return report
    report["static_batch1"] = _static_batch1(model, examples[0], greedy)
    save(report)
    log(f"static loop, batch 1: {report['static_batch1']['tokens_per_s']} tok/s (the same request)")
    _free()
    for decoder, n in (("static", compare_rows[0]), ("generate", compare_rows[1])):
        for job, lengths in zip(report["jobs"], jobs, strict=True):
            if decoder == "static" and job["tail"]:
                continue  # each batch's answer cap is a new cache shape: 1-2 minutes of compile per batch

            def static_run(decoder=decoder, n=n, lengths=lengths) -> None:
                for start in range(0, n, 64):
                    longest = max(lengths[start : start + 64])
                    gen = replace(greedy, max_new_tokens=longest, decoder=decoder)
                    generate_ids(model, examples[start : min(start + 64, n)], gen)

            job["results"].append(_timed_job(f"{decoder} (batch 64)", static_run, n, sum(lengths[:n]), log))
        _free()
    for job, lengths in zip(report["jobs"], jobs, strict=True):
        n = compare_rows[2]
        job["results"].append(_hf_continuous_batching(model, report["prompt_positions"], lengths[:n], log))
    save(report)
    if on_cuda:
        del model
        torch.cuda.empty_cache()
        llm = full_size_llm(torch.float16, "eager", lora=True)
        _, seconds = decode(llm, 1, torch.float16, original=True)
        report["original_tokens_per_s"] = round(NEW_TOKENS / seconds, 1)  # one row at a time: every token is useful
        save(report)
        log(f"original's way (batch 1, fp16 eager, sampling, attentions out): {NEW_TOKENS / seconds:.1f} tok/s")
    return report


def _engine_batch1(model, example, greedy, length: int) -> dict:
    """One request alone through a one-slot engine (a server's single client)."""
    from model.engine.scheduler import Engine
    from model.engine.sequence import Request

    engine = Engine(model, 1, length, greedy.max_new_tokens, k_cap=1)
    request = Request(0, example, replace(greedy, max_new_tokens=NEW_TOKENS), 0)
    return _batch1(lambda: [len(u.ids) for ended in engine.run([request]) for u in ended])


def _static_batch1(model, example, greedy) -> dict:
    """The same request through the static loop (`dr`'s batch-1 path before the engine), for the side-by-side ratio."""
    from model.generate.base import generate_ids

    gen = replace(greedy, max_new_tokens=NEW_TOKENS, decoder="static")
    return _batch1(lambda: [len(ids) for ids in generate_ids(model, [example], gen)])


def _batch1(run: Callable[[], list[int]], calls: int = 3) -> dict:
    """NEW_TOKENS greedy tokens of one row, prefill included: the first call compiles and records the CUDA graphs,
    the last is the steady figure."""
    seconds = []
    for _ in range(calls):
        _sync()
        start = time.perf_counter()
        made = run()
        _sync()
        seconds.append(time.perf_counter() - start)
        assert made == [NEW_TOKENS], made
    return {"first_call_s": round(seconds[0], 2), "tokens_per_s": round(NEW_TOKENS / seconds[-1], 1)}


def _hf_continuous_batching(model, prompt: int, lengths: Sequence[int], log) -> dict:
    """transformers' own continuous-batching manager (sdpa, CUDA graphs, compile level 1) on token-id prompts of the
    same length. It takes token ids only; DeepResonance's media embeddings would need placeholder ids mapped to a
    per-job embedding table, which costs nothing per step, so this measures the speed it would give."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    llm = model.llama_model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (prompt,), generator=g).tolist() for _ in lengths]
    config = HFGenerationConfig(
        max_new_tokens=max(lengths),
        do_sample=False,
        eos_token_id=model.tokenizer.eos_id,
        pad_token_id=model.tokenizer.pad_id,
    )
    on_cuda = llm.device.type == "cuda"
    cb = ContinuousBatchingConfig(use_cuda_graph=on_cuda, default_compile_level=1 if on_cuda else 0)

    def run() -> None:
        manager = llm.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
        manager.start()
        try:
            for ids, n in zip(prompts, lengths, strict=True):
                manager.add_request(ids, max_new_tokens=n)
            finished = 0
            while finished < len(lengths):
                result = manager.get_result(timeout=600)
                if result is None:
                    raise RuntimeError("the manager stopped before every request finished")
                finished += result.is_finished()
        finally:
            manager.stop(block=True)

    return _timed_job("transformers continuous batching", run, len(lengths), sum(lengths), log)
