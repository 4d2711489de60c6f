"""`dr bench job`: a MusicCaps-sized `dr infer` job end to end (audio decoding, ImageBind-huge, decoding), timed."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.workloads import MUSICCAPS_ROWS, NEW_TOKENS
from model.config import VICUNA_7B, ModelConfig
from model.media.encoder import MediaEncoder


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
