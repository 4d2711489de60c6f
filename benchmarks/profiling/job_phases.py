"""Where a whole `dr infer` job's time goes: `run_inference` on a MusicCaps-sized audio job (the shape of
`dr bench job`), with every phase timed from the outside, so the code measured is the shipped code unchanged.

Phases: media decoding and fbank (worker threads: summed thread-seconds and wall), the encoder, feature-cache reads
and writes, the main thread waiting for the background media thread, the engine's start-up (build, compile, first
rows), journal writes, and the GPU's busy share sampled through NVML. `--engine-only` runs the same rows' features
straight through the engine instead: the job's engine-alone figure, for the side-by-side ratio.

    PYTHONPATH=. python3 benchmarks/profiling/job_phases.py OUT.json [--rows 2858] [--tag cold] [--keep-features]
    PYTHONPATH=. python3 benchmarks/profiling/job_phases.py OUT.json --engine-only
    PYTHONPATH=. python3 benchmarks/profiling/job_phases.py OUT.json --mix catalog  # catalog-shaped rows
    PYTHONPATH=. python3 benchmarks/profiling/job_phases.py OUT.json --tiny  # the CPU check: tiny shapes

`--mix musiccaps` (the default) is `dr bench job`'s shape: one 10 s wav and "Describe the music in detail." per row,
64 tokens each. `--mix catalog` mixes the catalog's tasks: MusicQA-style questions of varied length, MusicCaps
captions, Music4way rows with an image or a video beside the music, and MuChoMusic multiple-choice prompts with their
options, each answered to a length drawn for its task (a length oracle: random weights never stop by themselves).
The report puts the whole job beside the floor arithmetic of its rows (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from benchmarks.workloads import MUSICCAPS_ROWS, NEW_TOKENS

CLOCK = time.perf_counter


class Phases:
    """Thread-safe sums of seconds and calls per phase, plus (time, rows) marks of finished rows."""

    def __init__(self) -> None:
        self.start = CLOCK()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.finished: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    @contextmanager
    def timed(self, name: str):
        begin = CLOCK()
        try:
            yield
        finally:
            end = CLOCK()
            with self._lock:
                self.seconds[name] += end - begin
                self.calls[name] += 1
                self.first.setdefault(name, begin - self.start)
                self.last[name] = end - self.start

    def wrap(self, owner: object, attr: str, name: str) -> None:
        """Times every call of `owner.attr` under `name`."""
        real: Callable = getattr(owner, attr)

        def timed_call(*args, **kwargs):
            with self.timed(name):
                return real(*args, **kwargs)

        setattr(owner, attr, timed_call)

    def table(self) -> dict:
        return {
            name: {
                "seconds": round(self.seconds[name], 2),
                "calls": self.calls[name],
                "first_s": round(self.first[name], 2),
                "last_s": round(self.last[name], 2),
            }
            for name in sorted(self.seconds, key=lambda n: self.first[n])
        }


class GpuBusy:
    """The GPU's utilization (NVML, every 50 ms) while the job runs: the share of samples in which a kernel ran."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (the CPU check): no samples
            return self

        def sample() -> None:
            while not self._stop.wait(0.05):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def share(self) -> float | None:
        return round(sum(s > 0 for s in self.samples) / len(self.samples), 3) if self.samples else None


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
EXTENSION = {"audio": "wav", "image": "png", "video": "mp4"}


def mix_rows(rows: int, mix: str, seed: int = 0) -> tuple[list, list[int]]:
    """The job's rows and each row's answer length (its max_new_tokens: the length oracle)."""
    from model.data.catalog import Row
    from model.data.multiple_choice import muchomusic_prompt

    if mix == "musiccaps":
        data = [
            Row(str(i), "<Audio>", "Describe the music in detail.", "", ("audio",), (f"{i}.wav",)) for i in range(rows)
        ]
        return data, [NEW_TOKENS] * rows
    rng = np.random.default_rng(seed)
    tasks = rng.choice(list(MIX), size=rows, p=[share for share, *_ in MIX.values()])
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


def write_media(folder: Path, data: list, seconds: float) -> None:
    """Each row's own files (unique content, so the feature cache cannot share them): 10 s wavs, 320x320 PNGs,
    10 s 224x224 mp4s at 8 frames/s. Kept between runs."""
    from fractions import Fraction

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
                    for k in range(int(8 * seconds)):
                        frame = np.full((224, 224, 3), (i * 7 + k * 13) % 256, dtype=np.uint8)
                        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                            container.mux(packet)
                    for packet in stream.encode(None):
                        container.mux(packet)


def floor(model, data: list, lengths: list[int], slots: int) -> dict:
    """The job's floor on this card: every decode step reads the weights once and each live row's cache, prefill is
    matrix work. Steps: the answer tokens packed `slots` to a step. Bandwidth 4.3 TB/s and 790 TFLOP/s are the H200's
    measured copy rate and bf16 matrix rate (../.library notes; KINDS.md)."""
    bandwidth, flops = 4.3e12, 790e12
    config = model.llama_model.config
    weights = sum(p.numel() * p.element_size() for p in model.llama_model.parameters())
    per_position = 2 * config.num_hidden_layers * config.hidden_size * model.dtype.itemsize
    prompts = [model.prompt_length(r.input, r.instruction, [model.clips(m) for m in r.mm_names]) for r in data]
    tokens = sum(lengths)
    steps = -(-tokens // slots)
    cache_reads = sum(n * p + n * (n + 1) // 2 for p, n in zip(prompts, lengths, strict=True)) * per_position
    flop_per_position = 2 * (weights / model.dtype.itemsize)
    seconds = {
        "decode_weight_reads_s": steps * weights / bandwidth,
        "decode_cache_reads_s": cache_reads / bandwidth,
        "prefill_matrix_s": sum(prompts) * flop_per_position / flops,
    }
    total = sum(seconds.values())
    return {
        **{k: round(v, 2) for k, v in seconds.items()},
        "floor_s": round(total, 2),
        "floor_useful_tokens_per_s": round(tokens / total, 1),
        "useful_tokens": tokens,
        "mean_prompt_positions": round(sum(prompts) / len(prompts), 1),
        "mean_answer_tokens": round(tokens / len(lengths), 1),
    }


def build_model(work: Path, tiny: bool):
    """A never-stopping full-size model (random bf16 weights) with ImageBind-huge, or tiny shapes on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckpt.tiny import train_tokenizer
    from model.config import LLAMA_TINY, VICUNA_7B, ModelConfig
    from model.media.encoder import MediaEncoder
    from model.network.deepresonance import DeepResonance
    from model.text.tokenizer import PromptTokenizer

    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    tok = PromptTokenizer(train_tokenizer(work / "tok"))
    sizes = LLAMA_TINY if tiny else VICUNA_7B
    config = LlamaConfig(**{**sizes, "vocab_size": len(tok)}, tie_word_embeddings=False)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(config, dtype=dtype)
        encoder = MediaEncoder("tiny" if tiny else "huge")
    encoder.drop_unused_towers()
    model = DeepResonance(ModelConfig(variant="alpha"), llm, tok, encoder, encoder.out_dim).to(device, dtype).eval()
    model.merge_lora()
    with torch.no_grad():
        for token in {tok.eos_id, tok.stop_id, *tok.newline_stop}:
            model.llama_model.get_output_embeddings().weight[token] = 0
    return model


def instrument(phases: Phases) -> None:
    """Timers around the job's phases, installed on the modules that call them."""
    from model.data import row_features
    from model.engine import scheduler
    from model.infer import job, journal
    from model.media import encoder, features, preprocess

    phases.wrap(features, "_load", "media decode + fbank (thread-seconds)")
    phases.wrap(encoder.MediaEncoder, "forward", "encoder forward")
    phases.wrap(features.FeatureCache, "file_hash", "cache: hash file")
    phases.wrap(features.FeatureCache, "get", "cache: read")
    phases.wrap(features.FeatureCache, "put", "cache: write")
    phases.wrap(row_features, "row_media", "row_media (a group, background)")
    phases.wrap(journal.Journal, "write", "journal write")
    phases.wrap(scheduler.Engine, "__init__", "engine build")
    phases.wrap(scheduler.Engine, "_prefill", "engine prefill (host)")
    job.row_media = row_features.row_media  # job imported the name before the wrap
    real_prefetched = job.prefetched

    def prefetched(groups, load):
        it = real_prefetched(groups, load)
        while True:
            with phases.timed("main thread waits for media"):
                item = next(it, None)
            if item is None:
                return
            yield item

    job.prefetched = prefetched
    real_write = journal.Journal.write

    def write(self, entries):
        real_write(self, entries)
        if entries:
            phases.finished.append((CLOCK() - phases.start, len(entries)))

    journal.Journal.write = write
    del preprocess


def oracle_requests(lengths: dict[str, int]) -> None:
    """Each row's Request asks for its own answer length (the oracle): installed where the job builds requests."""
    from dataclasses import replace

    from model.engine.scheduler import Request
    from model.infer import job

    job.Request = lambda row, example, gen, key: Request(
        row, example, replace(gen, max_new_tokens=lengths[row.id]), key
    )


def run_job(work: Path, data: list, lengths: list[int], tiny: bool, keep_features: bool, phases: Phases) -> dict:
    from model.config import GenerationConfig
    from model.infer.job import run_inference
    from model.media.features import FeatureCache

    model = build_model(work, tiny)
    if not keep_features:
        shutil.rmtree(work / "features", ignore_errors=True)
    shutil.rmtree(work / "results", ignore_errors=True)
    instrument(phases)
    oracle_requests({r.id: n for r, n in zip(data, lengths, strict=True)})
    gen = GenerationConfig(max_new_tokens=max(lengths) if tiny else 512, do_sample=False)
    cache = FeatureCache.for_encoder(work / "features", model.visual_encoder)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with GpuBusy() as busy:
        phases.start = start = CLOCK()
        summary = run_inference(model, data, work / "media", work / "results" / "job.json", gen, 512, cache)
        sync()
        wall = CLOCK() - start
    first_rows = phases.finished[0][0] if phases.finished else None
    useful = sum(lengths)
    return {
        "wall_s": round(wall, 2),
        "rows": summary.answered,
        "failed": len(summary.failed),
        "rows_per_s": round(summary.answered / wall, 1),
        "useful_tokens_per_s": round(useful / wall, 1),
        "first_rows_s": round(first_rows, 2) if first_rows is not None else None,
        "gpu_busy_share": busy.share(),
        "floor": floor(model, data, lengths, 256),
        "phases": phases.table(),
        "finished_per_second": _per_second(phases.finished),
    }


def run_engine_only(work: Path, data: list, lengths: list[int], tiny: bool) -> dict:
    """The same rows' features (from the job's cache) straight through the engine: no media, no journal."""
    from dataclasses import replace

    from model.config import GenerationConfig
    from model.data.row_features import row_media
    from model.engine.scheduler import Request, engine_for
    from model.media.features import FeatureCache
    from model.network.deepresonance import Example

    model = build_model(work, tiny)
    cache = FeatureCache.for_encoder(work / "features", model.visual_encoder)
    media = row_media(model, data, work / "media", cache, 512)
    gen = GenerationConfig(max_new_tokens=max(lengths) if tiny else 512, do_sample=False)
    examples = [Example(r.input, r.instruction, m) for r, m in zip(data, media, strict=True)]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = CLOCK()
    engine = engine_for(model, [model.example_length(e) for e in examples], gen, most_slots=512)
    requests = (
        Request(i, e, replace(gen, max_new_tokens=n), i) for i, (e, n) in enumerate(zip(examples, lengths, strict=True))
    )
    first, done = None, 0
    for ended in engine.run(requests):
        done += len(ended)
        first = first if first is not None else CLOCK() - start
    sync()
    wall = CLOCK() - start
    return {
        "wall_s": round(wall, 2),
        "rows": done,
        "slots": engine.slots,
        "useful_tokens_per_s": round(sum(lengths) / wall, 1),
        "first_rows_s": round(first, 2),
        "floor": floor(model, data, lengths, engine.slots),
    }


def _per_second(marks: list[tuple[float, int]]) -> list[int]:
    """Rows finished in each second of the job."""
    if not marks:
        return []
    out = [0] * (int(marks[-1][0]) + 1)
    for t, n in marks:
        out[int(t)] += n
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=MUSICCAPS_ROWS)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--work", default="/tmp/dr_job_phases")
    parser.add_argument("--tag", default="")
    parser.add_argument("--keep-features", action="store_true", help="reuse the feature cache of an earlier run")
    parser.add_argument("--engine-only", action="store_true")
    parser.add_argument("--mix", choices=("musiccaps", "catalog"), default="musiccaps")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = parser.parse_args()
    rows = 24 if args.tiny else args.rows
    work = Path(args.work)
    begin = CLOCK()
    data, lengths = mix_rows(rows, args.mix)
    if args.tiny:
        lengths = [min(n, 12) for n in lengths]
    write_media(work / "media", data, args.seconds)
    if args.engine_only:
        result = run_engine_only(work, data, lengths, args.tiny)
    else:
        result = run_job(work, data, lengths, args.tiny, args.keep_features, Phases())
    result = {
        "tag": args.tag,
        "mix": args.mix,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "process_s": round(CLOCK() - begin, 1),
        **result,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "finished_per_second"}, indent=1))


if __name__ == "__main__":
    main()
