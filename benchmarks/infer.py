"""`dr bench infer`: decode tokens/s and encoder clips/s, the original's way beside dr's in one process on one GPU,
and a MusicCaps-sized job projected from them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.timing import timed
from benchmarks.workloads import MUSICCAPS_ROWS, NEW_TOKENS, decode, full_size_llm
from model.config import VICUNA_7B
from model.media.encoder import MediaEncoder


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
