"""The rows of a benchmarked `dr infer` job, shaped like the catalog's sets, and what they cost at best: the row mix
(`mix_rows`), each row's own media files (`write_media`), a never-stopping model with its encoder (`job_model`), the
length oracle that ends each row at its drawn length (`oracle`) and the floor arithmetic of the rows (`floor`).
Shared by `dr bench job` (benchmarks/job.py) and benchmarks/profiling/job_phases.py."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.workloads import NEW_TOKENS, never_stopping
from model.config import VICUNA_7B

QUESTIONS = (
    "What is the genre of this music?",
    "Which instruments can you hear in this piece, and how do they interact with each other over time?",
    "Is the tempo of this song fast or slow?",
    "Describe the mood of this music and explain which musical elements, such as harmony, rhythm or timbre, create it.",
    "What is the key of this song?",
    "Would this music suit a film scene? Which kind of scene, and why would it fit there better than elsewhere?",
)
MC_OPTIONS = (
    (
        "a solo piano ballad",
        "an orchestral film score",
        "an electronic dance track with a heavy bass line",
        "a jazz trio",
    ),
    ("happy and energetic", "sad and slow", "tense, like a thriller soundtrack", "calm and meditative ambient music"),
)
# task -> (share of rows, input, media, answer length: (median tokens, log-sd), or a fixed length)
MIX = {
    "musicqa": (0.40, "<Audio>", ("audio",), (28, 0.6)),
    "musiccaps": (0.30, "<Audio>", ("audio",), (80, 0.45)),
    "mi2t": (0.12, "<Image><Audio>", ("image", "audio"), (60, 0.5)),
    "mv2t": (0.08, "<Video><Audio>", ("video", "audio"), (60, 0.5)),
    "muchomusic": (0.10, "<Audio>", ("audio",), (4, 0.0)),
}
MIXES = ("musiccaps", "catalog")
EXTENSION = {"audio": "wav", "image": "png", "video": "mp4"}
# Peak rates of the card the floor is for: the H200's measured copy rate and bf16 matrix rate (../.library notes)
BANDWIDTH, MATRIX_FLOPS = 4.3e12, 790e12


def mix_rows(rows: int, mix: str, seed: int = 0) -> tuple[list, list[int]]:
    """The job's rows and each row's answer length (its max_new_tokens: the length oracle). `musiccaps`: `dr bench
    job`'s first shape, one wav and "Describe the music in detail." per row, NEW_TOKENS each. `catalog`: the
    catalog's tasks in MIX's shares, in random order: MusicQA-style questions of varied length, MusicCaps captions,
    Music4way rows with an image or a video beside the music, MuChoMusic multiple-choice prompts with their options,
    each answered to a length drawn for its task."""
    from model.data.benchmarks import muchomusic_prompt
    from model.data.catalog import Row

    if mix == "musiccaps":
        data = [
            Row(str(i), "<Audio>", "Describe the music in detail.", "", ("audio",), (f"{i}.wav",)) for i in range(rows)
        ]
        return data, [NEW_TOKENS] * rows
    if mix != "catalog":
        raise ValueError(f"unknown mix {mix!r}: one of {', '.join(MIXES)}")
    rng = np.random.default_rng(seed)
    tasks = rng.permutation(np.repeat(list(MIX), _counts([share for share, *_ in MIX.values()], rows)))
    data, lengths = [], []
    for i, task in enumerate(tasks):
        _, text, kinds, (median, spread) = MIX[task]
        if task == "musiccaps":
            instruction = "Describe the music in detail."
        elif task == "muchomusic":
            options = list(MC_OPTIONS[i % len(MC_OPTIONS)])
            instruction = muchomusic_prompt("Which description fits this music best?", options)
        else:
            instruction = QUESTIONS[i % len(QUESTIONS)]
        names = tuple(f"{i}.{EXTENSION[k]}" for k in kinds)
        data.append(Row(str(i), text, instruction, "", kinds, names))
        lengths.append(int(np.clip(round(median * np.exp(spread * rng.standard_normal())), 2, 512)))
    return data, lengths


def _counts(shares: list[float], rows: int) -> list[int]:
    """Rows per task: the shares of `rows`, rounded by largest remainder (every task with a row's worth of share
    gets its rows, even in a small job)."""
    exact = np.array(shares) * rows
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[: rows - counts.sum()]] += 1
    return counts.tolist()


def write_media(folder: Path, data: list, seconds: float) -> None:
    """Each row's own files (unique content, so the feature cache cannot share them): 16 kHz wavs, 320x320 PNGs,
    224x224 mp4s at 8 frames/s, `seconds` long. Files already there are kept."""
    from fractions import Fraction

    import soundfile as sf
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    for row in data:
        i = int(row.id)
        for kind, name in zip(row.mm_names, row.mm_paths, strict=True):
            path = folder / name
            if path.exists():
                continue
            if kind == "audio":
                tone = 0.3 * np.sin(2 * np.pi * (110 + 3 * i) * t) + 0.05 * rng.standard_normal(t.size)
                sf.write(path, tone.astype(np.float32), 16000)
            elif kind == "image":
                Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(path)
            else:
                import av

                with av.open(str(path), "w") as container:
                    stream = container.add_stream("mpeg4", rate=Fraction(8))
                    stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv420p"
                    for k in range(max(1, int(8 * seconds))):
                        frame = np.full((224, 224, 3), (i * 7 + k * 13) % 256, dtype=np.uint8)
                        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                            container.mux(packet)
                    for packet in stream.encode(None):
                        container.mux(packet)


def job_model(work: Path, sizes: dict = VICUNA_7B, encoder_size: str = "huge", device: str = "cuda"):
    """DeepResonance with a random LLM of `sizes` (bf16 on CUDA, fp32 elsewhere; LoRA merged) and a random ImageBind
    of `encoder_size`. The tokenizer is a small one trained on the fly, so embed_tokens/lm_head are smaller than
    Vicuna's (about 2% of the weights). The lm_head rows of EOS and the stop pieces are zeroed: random weights never
    end a row, the length oracle does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckpt.tiny import train_tokenizer
    from model.config import ModelConfig
    from model.media.encoder import MediaEncoder
    from model.network.deepresonance import DeepResonance
    from model.text.tokenizer import PromptTokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = PromptTokenizer(train_tokenizer(work / "tok"))
    config = LlamaConfig(**{**sizes, "vocab_size": len(tok)}, tie_word_embeddings=False)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(config, dtype=dtype)
        encoder = MediaEncoder(encoder_size)
    encoder.drop_unused_towers()
    model = DeepResonance(ModelConfig(variant="alpha"), llm, tok, encoder, encoder.out_dim).to(device, dtype).eval()
    model.merge_lora()
    return never_stopping(model)


@contextmanager
def oracle(model, data: list, lengths: list[int]) -> Iterator[dict]:
    """While open, `run_inference` answers each row to its own length: the engine's requests ask for it (installed
    where the job builds them); a static decoder's batch runs to its longest row (where real stopping would end it).
    Yields what the job did: {"tokens": the tokens of every answer it made, counted where it turns ids into text,
    "slots": its engine's slot count (None with a static decoder), "engine": the engine (its pool and preemptions),
    "encoded": the media files its encoder ran on}."""
    from model.infer import job, kept_engine

    by_id = {r.id: n for r, n in zip(data, lengths, strict=True)}
    request, decode_media, generate, engine = job.Request, job.decode_media, job.generate, kept_engine.Engine
    batches: deque[int] = deque()  # each loaded group's longest answer, consumed in the order groups load
    made = {"tokens": 0, "slots": None, "engine": None, "encoded": 0}
    encoder = model.visual_encoder
    encode = encoder.embed

    def encoded(modality, inputs):
        made["encoded"] += len(inputs)
        return encode(modality, inputs)

    def built(*args, **kwargs):
        made["engine"] = engine(*args, **kwargs)
        made["slots"] = made["engine"].slots
        return made["engine"]

    def loaded(model, group, *args, **kwargs):
        batches.append(max(by_id[r.id] for r in group))
        return decode_media(model, group, *args, **kwargs)

    def answer(ids):
        made["tokens"] += len(ids)
        return type(model).answer(model, ids)

    job.Request = lambda row, example, gen, key: request(row, example, replace(gen, max_new_tokens=by_id[row.id]), key)
    job.decode_media = loaded
    job.generate = lambda model, rows, gen: generate(model, rows, replace(gen, max_new_tokens=batches.popleft()))
    kept_engine.Engine = built
    model.answer = answer
    encoder.embed = encoded
    try:
        yield made
    finally:
        job.Request, job.decode_media, job.generate, kept_engine.Engine = request, decode_media, generate, engine
        del model.answer, encoder.embed


def floor(model, data: list, lengths: list[int], slots: int) -> dict:
    """The job's floor on an H200. Decoding: every step reads the weights once and each live row's cache, and every
    token is 2 FLOP per matrix weight (all weights but the input embedding, which is a lookup); a step takes at
    least the longer of its reads and its matrix work, so decoding takes at least the longer of their sums (at 512
    slots the matrix work is the longer). Prefill is matrix work, 2 FLOP per matrix weight per prompt position.
    Steps: the answer tokens packed `slots` to a step; a row of prompt p answering n tokens reads p + k cached
    positions at its k-th token."""
    config = model.llama_model.config
    weights = sum(p.numel() * p.element_size() for p in model.llama_model.parameters())
    lookup = model.llama_model.get_input_embeddings().weight.numel()
    per_position = 2 * config.num_hidden_layers * config.hidden_size * model.dtype.itemsize
    prompts = [model.prompt_length(r.input, r.instruction, [model.clips(m) for m in r.mm_names]) for r in data]
    tokens = sum(lengths)
    steps = -(-tokens // slots)
    cache_reads = sum(n * p + n * (n + 1) // 2 for p, n in zip(prompts, lengths, strict=True)) * per_position
    flop_per_position = 2 * (weights / model.dtype.itemsize - lookup)
    seconds = {
        "decode_weight_reads_s": steps * weights / BANDWIDTH,
        "decode_cache_reads_s": cache_reads / BANDWIDTH,
        "decode_matrix_s": tokens * flop_per_position / MATRIX_FLOPS,
        "prefill_matrix_s": sum(prompts) * flop_per_position / MATRIX_FLOPS,
    }
    reads = seconds["decode_weight_reads_s"] + seconds["decode_cache_reads_s"]
    total = max(reads, seconds["decode_matrix_s"]) + seconds["prefill_matrix_s"]
    return {
        **{k: figures(v) for k, v in seconds.items()},
        "slots": slots,
        "floor_s": figures(total),
        "useful_tokens": tokens,
        "useful_tokens_per_s": round(tokens / total, 1),
        "mean_prompt_positions": round(sum(prompts) / len(prompts), 1),
        "mean_answer_tokens": round(tokens / len(lengths), 1),
    }


def figures(seconds: float) -> float:
    """Seconds to four significant figures: a full-size job takes tens of seconds, a tiny one milliseconds, and a
    tiny floor is microseconds."""
    return float(f"{seconds:.4g}")
