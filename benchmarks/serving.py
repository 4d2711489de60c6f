"""`dr bench serve`: requests/s and time to first / last token of `dr serve` under 1, 16 and 64 concurrent clients.

The server is the real one (model/serve/app.py over model/serve/worker.py, uvicorn on 127.0.0.1) in front of a full-size
random-weights model: a Vicuna-7B-shaped LLM that never stops on its own (benchmarks/workloads.py's
`never_stopping_model`) and ImageBind-huge, so each request pays for its audio's decoding, encoding, prefill and
decoding like a real one. Clients are `openai` streaming clients, each sending its requests one after another: a 10 s
wav and a MusicQA-like question, `max_tokens` drawn from `realistic_lengths` (caption-like answers; the model runs to
exactly that many tokens). Clients and server share one process, so the client side's Python work counts against
the server's: the numbers are a lower bound. Random weights: speed only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import soundfile as sf
import torch
from torch import nn

from benchmarks.workloads import INSTRUCTION, never_stopping_model, realistic_lengths
from model.config import LLAMA_TINY, VICUNA_7B, GenerationConfig
from model.engine.scheduler import Engine
from model.media.encoder import MediaEncoder
from model.serve.app import Limits, create_app, running
from model.serve.worker import EngineWorker

MODEL_ID = "deepresonance-bench"


def _wav_b64(seconds: float, freq: float) -> str:
    t = np.arange(int(16000 * seconds)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 4), "p95": round(float(p95), 4)}


async def _level(url: str, clients: int, lengths: list[int], audio: list[str]) -> dict:
    """`clients` concurrent streaming clients working through `lengths` (one request each), timed."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    todo = list(enumerate(lengths))
    first, last, tokens, short = [], [], [], []

    async def one_client() -> None:
        while todo:
            i, n = todo.pop()
            content = [
                {"type": "input_audio", "input_audio": {"data": audio[i % len(audio)], "format": "wav"}},
                {"type": "text", "text": INSTRUCTION},
            ]
            start = time.perf_counter()
            stream = await client.chat.completions.create(
                model=MODEL_ID,
                messages=[{"role": "user", "content": content}],
                max_tokens=n,
                stream=True,
                stream_options={"include_usage": True},
            )
            seen = None
            async for chunk in stream:
                if seen is None and chunk.choices and chunk.choices[0].delta.content:
                    seen = time.perf_counter() - start
                if chunk.usage:
                    tokens.append(chunk.usage.completion_tokens)
                    short.append(chunk.usage.completion_tokens < n)
            last.append(time.perf_counter() - start)
            first.append(seen if seen is not None else last[-1])

    async with client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(lengths),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(lengths) / wall, 3),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_answer_tokens": round(sum(tokens) / len(tokens), 1),
        "answers_short_of_max_tokens": sum(short),  # random weights that stopped anyway (expected: 0)
        "time_to_first_token_s": _percentiles(first),
        "time_to_last_token_s": _percentiles(last),
    }


def bench_serve(
    clients: Sequence[int] = (1, 16, 64),
    requests_per_client: int = 8,
    slots: int = 64,
    budget: int = 512,
    sizes: dict = VICUNA_7B,
    encoder_size: str = "huge",
    device: str = "cuda",
    workdir: str = "/tmp/dr_serve_bench",
    audio_seconds: float = 10.0,
    eager: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Each concurrency level in turn against one warm server (`slots` rows, answers of at most `budget` tokens).
    `sizes`, `encoder_size` and `device` make a tiny CPU run of the same code possible (the fast test's); `eager`
    decodes without torch.compile and CUDA graphs."""
    torch.manual_seed(0)  # the same random weights every run
    model = never_stopping_model(workdir, sizes, device)
    with torch.device(device):
        encoder = MediaEncoder(encoder_size)
    encoder.drop_unused_towers()
    model.visual_encoder = encoder.to(device, model.dtype)
    if encoder.out_dim != model.llama_proj.in_features:  # the tiny encoder's width
        model.llama_proj = nn.Linear(encoder.out_dim, model.llama_proj.out_features).to(device, model.dtype)
    pieces = len(model.tokenizer)  # the small stand-in tokenizer lacks most of the full-size vocabulary's ids
    decode = model.tokenizer.decode
    model.tokenizer.decode = lambda ids: decode([i % pieces for i in ids])  # so random picks decode as well
    engine = Engine.sized(model, model.config.max_length, budget, slots, compile=False if eager else None)
    worker = EngineWorker(model, engine, max_pending=max(clients) + 1)
    app = create_app(worker, MODEL_ID, limits=Limits(max_body_bytes=64 * 2**20), defaults=GenerationConfig())
    audio = [_wav_b64(audio_seconds, 110 + 7 * k) for k in range(16)]
    report = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "slots": worker.engine.slots,
        "budget": budget,
        "llm": "vicuna-7b shape" if sizes == VICUNA_7B else ("tiny" if sizes == LLAMA_TINY else sizes),
        "encoder": f"imagebind-{encoder_size}",
        "audio_seconds": audio_seconds,
        "compiled": device.startswith("cuda") and not eager,  # the engine compiles on CUDA unless told not to
        "levels": [],
    }
    with running(app, start_timeout=1800) as url:  # start-up includes the compiled step's warm-up on CUDA
        asyncio.run(_level(url, 1, [8], audio))  # first encoder and prefill calls, outside the timings
        for c in clients:
            lengths = [min(n, budget) for n in realistic_lengths(c * requests_per_client, seed=c)]
            level = asyncio.run(_level(url, c, lengths, audio))
            report["levels"].append(level)
            log(
                f"{c} clients: {level['requests_per_s']} req/s, {level['tokens_per_s']} tok/s, first token "
                f"p50 {level['time_to_first_token_s']['p50']} s / p95 {level['time_to_first_token_s']['p95']} s, "
                f"last p50 {level['time_to_last_token_s']['p50']} s / p95 {level['time_to_last_token_s']['p95']} s"
            )
    return report
