"""Full-size benchmarks with random weights (Vicuna-7B and ImageBind-huge shapes), the original's way vs dr's.

Both ways run in the same process on the same GPU, so the ratios compare like with like. Weights are random: the
numbers measure speed only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import VICUNA_7B, ModelConfig
from model.generate.base import StopByRule
from model.generate.static import decode_static
from model.media.encoder import MediaEncoder
from model.network.deepresonance import lora_config
from model.text.stopping import StopRule

VOCAB = 32006
PROMPT = 28  # positions of a typical audio prompt: 3 clips + the instruction
NEW_TOKENS = 64
MUSICCAPS_ROWS = 2858


class Logged(list):
    """A result list that reports each measurement as it lands (a long run still shows what it finished)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__()
        self.log = log

    def append(self, r: Result) -> None:
        super().append(r)
        self.log(
            f"{r.name} | batch {r.batch} | {r.seconds:.3f} s | {r.tokens_per_s:.1f} tok/s | {r.clips_per_s:.1f} clips/s"
            f" | first call {r.first_seconds:.1f} s"
        )


@dataclass
class Result:
    name: str
    batch: int
    seconds: float
    tokens: int = 0
    clips: int = 0
    first_seconds: float = 0.0  # the first call: torch.compile and CUDA graph capture for the static loop

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.tokens else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.batch / self.seconds if self.tokens else 0.0

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.clips else 0.0


def timed(fn: Callable[[], object], repeats: int = 1, device: str | torch.device = "cuda") -> float:
    return timed_with_warmup(fn, repeats, device)[1]


def seconds_per_call(fn: Callable[[], object], calls: int = 1, device: str | torch.device = "cuda") -> float:
    """Wall seconds per call, the device's queue drained before and after (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def timed_with_warmup(
    fn: Callable[[], object], repeats: int = 1, device: str | torch.device = "cuda"
) -> tuple[float, float]:
    """Seconds of the first call, and seconds per call once warm. Two warm-up calls: CUDA graph trees run a
    function once to warm up and record its graph on the second call (the static loop's prefill runs once per call)."""
    first = seconds_per_call(fn, 1, device)
    seconds_per_call(fn, 1, device)
    return first, seconds_per_call(fn, repeats, device)


def full_size_llm(
    dtype: torch.dtype, attn: str, lora: bool, device: str = "cuda", sizes: dict = VICUNA_7B
) -> torch.nn.Module:
    """A random LLaMA of `sizes` (Vicuna-7B's by default) with Vicuna's 32006-row vocabulary, LoRA as the original's
    stage 2 wraps it (its B random, so merging changes the weights) when `lora`."""
    config = LlamaConfig(**{**sizes, "vocab_size": VOCAB}, tie_word_embeddings=False, attn_implementation=attn)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(config, dtype=dtype)
    llm.eval()
    if lora:
        llm = get_peft_model(llm, lora_config(ModelConfig())).eval()
        with torch.no_grad():
            for name, p in llm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    return llm


def decode(
    llm, batch: int, dtype: torch.dtype, original: bool, new_tokens: int = NEW_TOKENS, static: bool = False
) -> tuple[float, float]:
    """Seconds of the first call, and seconds after it, to generate `new_tokens` for `batch` rows after a
    PROMPT-position prompt, on the LLM's device (the static loop compiled on CUDA only, as `generate_ids` does)."""
    hidden, device = llm.config.hidden_size, llm.device
    embeds = torch.randn(batch, PROMPT, hidden, device=device, dtype=dtype) * 0.02
    mask = torch.ones(batch, PROMPT, dtype=torch.long, device=device)
    never = StopRule(-1, ((-5,),), lambda ids: "")  # never fires: every run makes exactly new_tokens
    stop = [StopByRule(never)]
    if original:
        kwargs = dict(
            do_sample=True,
            temperature=0.1,
            top_p=1.0,
            top_k=None,
            output_attentions=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    else:
        kwargs = dict(do_sample=False)

    def run():
        if static:  # dr's own loop: static cache, one compiled step, and a rule that never fires
            return decode_static(llm, embeds, mask, new_tokens, never, compile=device.type == "cuda")
        with torch.inference_mode():
            llm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                stopping_criteria=stop,
                pad_token_id=2,
                eos_token_id=2,
                **kwargs,
            )

    return timed_with_warmup(run, 2, device)


def encoder_speed(encoder: MediaEncoder, dtype: torch.dtype, batch: int, repeats: int = 3) -> float:
    """Seconds per forward of `batch` audio items (3 clips each) through the encoder in `dtype`."""
    encoder.to(dtype=dtype)
    x = torch.randn(batch, 3, 1, 128, 204, device=encoder.device, dtype=dtype)
    with torch.inference_mode():
        return timed(lambda: encoder("audio", x), repeats, encoder.device)


def bench_infer(
    batches: tuple[int, ...] = (1, 64, 512),
    static_batches: tuple[int, ...] = (1, 64, 512),
    log: Callable[[str], None] = print,
    sizes: dict = VICUNA_7B,
    encoder_size: str = "huge",
    device: str = "cuda",
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """The original's way (batch 1, fp16, eager, sampling, attentions and hidden states out, LoRA unmerged) vs dr's
    fast path (bf16, SDPA, LoRA merged, greedy, batched), then ImageBind clips/s and a MusicCaps-sized job.

    `sizes`, `encoder_size`, `device` and `new_tokens` let a test run it with tiny sizes on the CPU, where every path
    computes in float32 (half precision is emulated there, and slow). Seconds are kept to the microsecond, so every
    ratio and projection can be recomputed from the report."""
    on_cuda = device.startswith("cuda")
    fp16, bf16 = (torch.float16, torch.bfloat16) if on_cuda else (torch.float32, torch.float32)
    results = Logged(log)
    llm = full_size_llm(fp16, "eager", lora=True, device=device, sizes=sizes)
    _, t = decode(llm, 1, fp16, original=True, new_tokens=new_tokens)
    results.append(Result("original: fp16 eager, LoRA unmerged, sampling, attn+hidden out", 1, t, new_tokens))
    llm = llm.merge_and_unload().to(bf16)
    llm.set_attn_implementation("sdpa")
    for b in batches:
        first, t = decode(llm, b, bf16, original=False, new_tokens=new_tokens)
        results.append(
            Result("dr: bf16 SDPA, LoRA merged, greedy, generate", b, t, new_tokens * b, first_seconds=first)
        )
    for b in static_batches:
        first, t = decode(llm, b, bf16, original=False, new_tokens=new_tokens, static=True)
        name = "dr static: static KV cache, compiled prefill and step"
        results.append(Result(name, b, t, new_tokens * b, first_seconds=first))
    del llm
    if on_cuda:
        torch.cuda.empty_cache()
    with torch.device(device):
        encoder = MediaEncoder(encoder_size)
    encoder.drop_unused_towers()
    enc_original = Result("original encoder: fp16, one row (3 clips)", 1, encoder_speed(encoder, fp16, 1), clips=3)
    results.append(enc_original)
    enc_dr = Result("dr encoder: bf16, batched", 64, encoder_speed(encoder, bf16, 64), clips=192)
    results.append(enc_dr)
    base = results[0].tokens_per_s
    best = max((r for r in results if r.tokens and r.name.startswith("dr")), key=lambda r: r.tokens_per_s)
    job_dr = MUSICCAPS_ROWS * 3 / enc_dr.clips_per_s + math.ceil(MUSICCAPS_ROWS / best.batch) * best.seconds
    job_original = MUSICCAPS_ROWS * (3 / enc_original.clips_per_s + results[0].seconds)
    return {
        "device": torch.cuda.get_device_name(device) if on_cuda else device,
        "results": [
            dict(
                name=r.name,
                batch=r.batch,
                seconds=round(r.seconds, 6),
                tokens_per_s=round(r.tokens_per_s, 1),
                rows_per_s=round(r.rows_per_s, 1),
                clips_per_s=round(r.clips_per_s, 1),
                ratio_to_original=round(r.tokens_per_s / base, 1) if r.tokens else None,
                first_call_seconds=round(r.first_seconds, 2) if r.first_seconds else None,
            )
            for r in results
        ],
        # projected from steady rates: compile time (first_call_seconds) excluded; `bench_job` times a real job
        "musiccaps_job_seconds_steady": {
            "dr": round(job_dr, 1),
            "original": round(job_original, 1),
            "dr_batch": best.batch,
        },
    }


class _StepModel(torch.nn.Module):
    """Stage-2 shape of DeepResonance for timing: projected audio clips + text through the LLM with LoRA."""

    def __init__(self, llm: torch.nn.Module) -> None:
        super().__init__()
        self.llama_model = llm
        self.llama_proj = torch.nn.Linear(1024, llm.config.hidden_size, device="cuda")

    def forward(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        text = self.llama_model.get_input_embeddings()(ids)
        embeds = torch.cat([self.llama_proj(feats.to(self.llama_proj.weight.dtype)).to(text.dtype), text], dim=1)
        labels = torch.cat([torch.full(feats.shape[:2], -100, device="cuda"), ids], dim=1)
        return self.llama_model(inputs_embeds=embeds, labels=labels).loss


def _trainable(llm: torch.nn.Module) -> None:
    """The original's stage-2 trainable set: LoRA, and the resized embed_tokens / lm_head."""
    llm.get_input_embeddings().requires_grad_(True)
    llm.get_output_embeddings().requires_grad_(True)


def bench_train(steps: int = 5, text_tokens: int = 128, dr_micro_batch: int = 16, log: Callable[[str], None] = print):
    """Stage-2 samples/s: the original's recipe (ImageBind on the fly, fp16, DeepSpeed ZeRO-2 with CPU optimizer
    offload, micro-batch 2) vs dr's (cached features, bf16 autocast over fp32 trainable weights, optimizer on the
    GPU, larger micro-batch). Needs DeepSpeed for the original's side."""
    import os

    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    out = {"device": torch.cuda.get_device_name(), "text_tokens": text_tokens}

    with torch.device("cuda"):
        encoder = MediaEncoder("huge")
    encoder.drop_unused_towers()
    encoder.to(dtype=torch.float16)
    model = _StepModel(full_size_llm(torch.float16, "eager", lora=True))
    _trainable(model.llama_model)
    model.train()
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "fp16": {"enabled": True, "initial_scale_power": 16},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.001}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)

    def original_step():
        audio = torch.randn(2, 3, 1, 128, 204, device="cuda", dtype=torch.float16)
        feats = encoder("audio", audio)
        ids = torch.randint(0, VOCAB, (2, text_tokens), device="cuda")
        loss = engine(feats, ids)
        engine.backward(loss)
        engine.step()

    seconds = timed(original_step, steps)
    out["original_samples_per_s"] = round(2 / seconds, 2)
    log(f"original recipe: {2 / seconds:.2f} samples/s ({seconds:.3f} s per step of 2)")
    engine.destroy()
    del model
    torch.cuda.empty_cache()

    llm = full_size_llm(torch.bfloat16, "sdpa", lora=True)
    model = _StepModel(llm)
    _trainable(llm)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.001, fused=True
    )
    cached = torch.randn(dr_micro_batch, 3, 1024, device="cuda")

    def dr_step():
        ids = torch.randint(0, VOCAB, (dr_micro_batch, text_tokens), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(cached, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(dr_step, steps)
    out["dr_samples_per_s"] = round(dr_micro_batch / seconds, 2)
    out["dr_micro_batch"] = dr_micro_batch
    out["ratio"] = round(out["dr_samples_per_s"] / out["original_samples_per_s"], 1)
    log(f"dr recipe: {dr_micro_batch / seconds:.2f} samples/s ({seconds:.3f} s per step of {dr_micro_batch})")
    return out


def bench_job(
    rows: int = MUSICCAPS_ROWS,
    seconds: float = 10.0,
    batch: int = 512,
    workdir: str = "/tmp/dr_job",
    decoder: str = "engine",
    log: Callable[[str], None] = print,
) -> dict:
    """A MusicCaps-sized `run_inference` job end to end, timed: wav files decoded and preprocessed on the CPU,
    ImageBind-huge batched on the GPU, then 64 greedy tokens per row from a Vicuna-7B-shaped model (random weights,
    with the stop and EOS rows of lm_head zeroed so every row makes all 64 tokens). The tokenizer is a small one
    trained on the fly, so embed_tokens/lm_head are smaller than Vicuna's (about 2% of the weights)."""
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    from ckpt.tiny import train_tokenizer
    from model.config import GenerationConfig
    from model.data.catalog import Row
    from model.data.row_features import DECODE_WORKERS
    from model.infer.job import run_inference
    from model.media.features import FeatureCache
    from model.network.deepresonance import DeepResonance
    from model.text.tokenizer import PromptTokenizer

    work = Path(workdir)
    audio = work / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    start = time.perf_counter()
    for i in range(rows):
        tone = 0.3 * np.sin(2 * np.pi * (110 + 3 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(audio / f"{i}.wav", tone.astype(np.float32), 16000)
    log(f"wrote {rows} wav files of {seconds} s in {time.perf_counter() - start:.1f} s")
    tok = PromptTokenizer(train_tokenizer(work / "tok"))
    config = LlamaConfig(**{**VICUNA_7B, "vocab_size": len(tok)}, tie_word_embeddings=False)
    with torch.device("cuda"):
        llm = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        encoder = MediaEncoder("huge")
    encoder.drop_unused_towers()
    model = DeepResonance(ModelConfig(variant="alpha"), llm, tok, encoder, 1024).to("cuda", torch.bfloat16).eval()
    model.merge_lora()
    with torch.no_grad():
        for token in {tok.eos_id, tok.stop_id, *tok.newline_stop}:
            model.llama_model.get_output_embeddings().weight[token] = 0
    data = [Row(str(i), "<Audio>", "Describe the music in detail.", "", ("audio",), (f"{i}.wav",)) for i in range(rows)]
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, decoder=decoder)
    out = work / "results" / "job.json"
    cache = FeatureCache.for_encoder(work / "features", encoder)
    torch.cuda.synchronize()
    start = time.perf_counter()
    summary = run_inference(model, data, audio, out, gen, batch_size=batch, cache=cache)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    log(f"job: {summary.answered} rows in {wall:.1f} s ({summary.answered / wall:.1f} rows/s)")
    return {
        "device": torch.cuda.get_device_name(),
        "rows": rows,
        "audio_seconds": seconds,
        "batch": batch,
        "decoder": decoder,
        "wall_seconds": round(wall, 1),
        "rows_per_s": round(summary.answered / wall, 2),
        "answered": summary.answered,
        "failed": len(summary.failed),
        "decode_workers": DECODE_WORKERS,
    }


def realistic_lengths(rows: int, tail: float = 0.0, seed: int = 0) -> list[int]:
    """Caption-like answer lengths: lognormal with median 80 tokens and log-sd 0.45, clipped to 8..512 (mean about
    91); `tail`: the share of rows that run to 512 instead, as degenerate sampled answers do."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(np.exp(np.log(80) + 0.45 * rng.standard_normal(rows))), 8, 512)
    lengths[rng.random(rows) < tail] = 512
    return lengths.astype(int).tolist()


def never_stopping_model(workdir: str, sizes: dict = VICUNA_7B, device: str = "cuda", vocab: int = VOCAB):
    """DeepResonance with a Vicuna-7B-shaped LLM (random bf16 weights, full 32006-row vocabulary, LoRA merged: no
    adapters) and no encoder (prompts carry clip features). The lm_head rows of EOS and of every piece holding "\\n" or
    "#" are zeroed so random weights never end a row (model/text/stopping.py): the benchmark's length oracle (each
    row's max_new_tokens) ends it. Ids past the tokenizer's decode as nothing (the engine decodes rows as they grow)."""
    from pathlib import Path

    from ckpt.tiny import train_tokenizer
    from model.network.deepresonance import DeepResonance
    from model.text.tokenizer import PromptTokenizer

    tok = PromptTokenizer(train_tokenizer(Path(workdir) / "tok"))
    config = LlamaConfig(**{**sizes, "vocab_size": len(tok)}, tie_word_embeddings=False, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(config, dtype=dtype)
    model = DeepResonance(ModelConfig(variant="alpha"), llm, tok, None, 1024, lora=False).to(device, dtype)
    model.llama_model.resize_token_embeddings(vocab, mean_resizing=False)
    decode, known = tok.decode, len(tok)
    tok.decode = lambda ids: decode([i for i in ids if i < known])
    with torch.no_grad():
        for token in [tok.eos_id, *(i for i in range(known) if set(decode([i])) & set("\n#"))]:
            model.llama_model.get_output_embeddings().weight[token] = 0
    return model.eval()


INSTRUCTION = "What is the genre of this music, and which instruments play in it?"  # a MusicQA-like question


def _audio_rows(rows: int) -> list:
    from model.network.deepresonance import Example

    g = torch.Generator().manual_seed(0)
    return [Example("<Audio>", INSTRUCTION, [("audio", torch.randn(3, 1024, generator=g))]) for _ in range(rows)]


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
    slots: int = 256,
    budget: int = 512,
    tails: tuple[float, ...] = (0.0, 0.02),
    compare_rows: tuple[int, int, int] = (512, 128, 512),
    workdir: str = "/tmp/dr_engine",
    only_engine: bool = False,
    log: Callable[[str], None] = print,
    save: Callable[[dict], None] = lambda report: None,
    sizes: dict = VICUNA_7B,
    device: str = "cuda",
) -> dict:
    """A realistic-length job (audio prompts, answers ending at caption-like lengths, `budget` max_new_tokens) through
    the engine and, on subsets of the same rows (`compare_rows` for the static loop, `generate` and transformers'
    continuous batching), the static-batch decoders (batches of 64 in dataset order, each running to its longest row,
    which is where real stopping would end it), and the original's way (one row at a time). Greedy; random weights
    never stop, so each row's own max_new_tokens is its drawn length (a length oracle inside this benchmark only).
    `save(report)` is called after each measurement, so a run cut short keeps what it finished."""
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
    examples = _audio_rows(rows)
    report["prompt_positions"] = model.example_length(examples[0])
    jobs = []
    for tail in tails:
        lengths = [min(n, budget) for n in realistic_lengths(rows, tail)]
        jobs.append(lengths)
        report["jobs"].append(
            {"tail": tail, "mean_length": round(sum(lengths) / rows, 1), "results": SavedList(save, report)}
        )

    def engine_run(engine: Engine, lengths: list[int]) -> float:
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
    engine = Engine(model, slots, cache_length(report["prompt_positions"], budget), budget, k_cap=1, kernel=kernel)
    report["engine_build_s"] = round(time.perf_counter() - built, 2)
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
