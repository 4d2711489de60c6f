"""Where a whole `dr infer` job's time goes: `run_inference` on a MusicCaps-sized audio job (the shape of
`dr bench job`), with every phase timed from the outside, so the code measured is the shipped code unchanged.

Phases: media decoding and fbank (worker threads: summed thread-seconds and wall), the encoder, feature-cache reads
and writes, the main thread waiting for the background media thread, the engine's start-up (build, compile, first
rows), journal writes, and the GPU's busy share sampled through NVML. `--engine-only` runs the same rows' features
straight through the engine instead: the job's engine-alone figure, for the side-by-side ratio.

    PYTHONPATH=. python3 benchmarks/job_phases.py OUT.json [--rows 2858] [--tag cold] [--keep-features]
    PYTHONPATH=. python3 benchmarks/job_phases.py OUT.json --engine-only
    PYTHONPATH=. python3 benchmarks/job_phases.py OUT.json --tiny          # the CPU check: tiny shapes, 24 rows
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

from benchmarks.speed import MUSICCAPS_ROWS, NEW_TOKENS

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


def write_audio(folder: Path, rows: int, seconds: float) -> None:
    """`rows` distinct tones with noise, as `dr bench job` writes them (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.wav"))) >= rows:
        return
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    for i in range(rows):
        tone = 0.3 * np.sin(2 * np.pi * (110 + 3 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"{i}.wav", tone.astype(np.float32), 16000)


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


def run_job(work: Path, rows: int, tiny: bool, keep_features: bool, phases: Phases) -> dict:
    from model.config import GenerationConfig
    from model.data.catalog import Row
    from model.infer.job import run_inference
    from model.media.features import FeatureCache

    model = build_model(work, tiny)
    if not keep_features:
        shutil.rmtree(work / "features", ignore_errors=True)
    shutil.rmtree(work / "results", ignore_errors=True)
    instrument(phases)
    data = [Row(str(i), "<Audio>", "Describe the music in detail.", "", ("audio",), (f"{i}.wav",)) for i in range(rows)]
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False)
    cache = FeatureCache.for_encoder(work / "features", model.visual_encoder)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with GpuBusy() as busy:
        phases.start = start = CLOCK()
        summary = run_inference(model, data, work / "audio", work / "results" / "job.json", gen, 512, cache)
        sync()
        wall = CLOCK() - start
    first_rows = phases.finished[0][0] if phases.finished else None
    return {
        "wall_s": round(wall, 2),
        "rows": summary.answered,
        "rows_per_s": round(summary.answered / wall, 1),
        "useful_tokens_per_s": round(summary.answered * NEW_TOKENS / wall, 1),
        "first_rows_s": round(first_rows, 2) if first_rows is not None else None,
        "after_first_rows_tokens_per_s": round(summary.answered * NEW_TOKENS / (wall - first_rows), 1)
        if first_rows
        else None,
        "gpu_busy_share": busy.share(),
        "phases": phases.table(),
        "finished_per_second": _per_second(phases.finished),
    }


def run_engine_only(work: Path, rows: int, tiny: bool) -> dict:
    """The same rows' features (from the job's cache) straight through the engine: no media, no journal."""
    from model.config import GenerationConfig
    from model.data.catalog import Row
    from model.data.row_features import row_media
    from model.engine.scheduler import Request, engine_for
    from model.media.features import FeatureCache
    from model.network.deepresonance import Example

    model = build_model(work, tiny)
    data = [Row(str(i), "<Audio>", "Describe the music in detail.", "", ("audio",), (f"{i}.wav",)) for i in range(rows)]
    cache = FeatureCache.for_encoder(work / "features", model.visual_encoder)
    media = row_media(model, data, work / "audio", cache, 512)
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False)
    examples = [Example(r.input, r.instruction, m) for r, m in zip(data, media, strict=True)]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = CLOCK()
    engine = engine_for(model, [model.example_length(e) for e in examples], gen, most_slots=512)
    first = None
    done = 0
    for ended in engine.run(Request(i, e, gen, i) for i, e in enumerate(examples)):
        done += len(ended)
        first = first if first is not None else CLOCK() - start
    sync()
    wall = CLOCK() - start
    return {
        "wall_s": round(wall, 2),
        "rows": done,
        "slots": engine.slots,
        "useful_tokens_per_s": round(done * NEW_TOKENS / wall, 1),
        "first_rows_s": round(first, 2),
        "after_first_rows_tokens_per_s": round(done * NEW_TOKENS / (wall - first), 1),
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
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = parser.parse_args()
    rows = 24 if args.tiny else args.rows
    work = Path(args.work)
    begin = CLOCK()
    write_audio(work / "audio", rows, args.seconds)
    phases = Phases()
    if args.engine_only:
        result = run_engine_only(work, rows, args.tiny)
    else:
        result = run_job(work, rows, args.tiny, args.keep_features, phases)
    result = {
        "tag": args.tag,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "process_s": round(CLOCK() - begin, 1),
        **result,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "finished_per_second"}, indent=1))


if __name__ == "__main__":
    main()
