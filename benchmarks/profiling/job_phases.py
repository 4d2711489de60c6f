"""Where a whole `dr infer` job's time goes: `run_inference` on a MusicCaps-sized audio job (the shape of
`dr bench job`), with every phase timed from the outside, so the code measured is the shipped code unchanged.

Phases: media decoding and fbank (worker threads: summed thread-seconds and wall), the encoder, feature-cache reads
and writes, the main thread waiting for the background media thread, the engine's start-up (build, compile, first
rows), journal writes, the GPU's busy share sampled through NVML, and how late a thread of the job's process gets the
interpreter lock back after a 1 ms sleep (`LockProbe`: what every loader thread's Python work waits). `--engine-only`
runs the same rows' features straight through the engine instead: the job's engine-alone figure, for the side-by-side
ratio.

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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from benchmarks.job import engine_only, token_budget, whole_job
from benchmarks.job_workload import MIXES, floor, job_model, mix_rows, write_media
from benchmarks.workloads import MUSICCAPS_ROWS
from model.config import LLAMA_TINY, VICUNA_7B, GenerationConfig
from model.engine.sizing import CUDA_SLOTS

CLOCK = time.perf_counter
SHAPES = {False: (VICUNA_7B, "huge", "cuda"), True: (LLAMA_TINY, "tiny", "cpu")}  # --tiny: (sizes, encoder, device)


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


class LockProbe:
    """How long a thread of the job's process waits for the interpreter lock: a probe thread sleeps 1 ms at a time
    (releasing the lock) and counts how late it wakes. A loader thread's Python work waits as long, beside the
    engine's loop (a hashing thread beside a loop holding the lock two thirds of the time ran at 37% of a process's
    rate: benchmarks/results/2026-12-07-cpu-gil-hashing/)."""

    NAP = 0.001

    def __init__(self) -> None:
        self.late: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = CLOCK()
            time.sleep(self.NAP)
            self.late.append(CLOCK() - start - self.NAP)

    def __enter__(self) -> LockProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict:
        """Naps taken, the median and 99th-percentile lateness (ms), and the share of the probe's time spent late."""
        if not self.late:
            return {}
        late = sorted(self.late)
        return {
            "naps": len(late),
            "late_ms_median": round(late[len(late) // 2] * 1000, 3),
            "late_ms_p99": round(late[int(0.99 * (len(late) - 1))] * 1000, 3),
            "late_share": round(sum(late) / (sum(late) + self.NAP * len(late)), 3),
        }


def instrument(phases: Phases) -> None:
    """Timers around the job's phases, installed on the modules that call them."""
    from model.data import row_features
    from model.engine import model_runner, scheduler
    from model.infer import job, journal
    from model.media import decoders, encoder, encoding, feature_stores, features

    threads = encoding.in_threads  # encode_files' default decoder

    def in_threads(workers):
        decode = threads(workers)

        def timed(modality, paths):
            with phases.timed("media decode, threads (a group's wall)"):
                return decode(modality, paths)

        return timed

    encoding.in_threads = in_threads
    phases.wrap(decoders.DecodeProcesses, "find", "media decode, processes: a group handed to them")
    phases.wrap(features.LookupInProcesses, "result", "media decode, processes: waiting for a group's inputs")
    phases.wrap(decoders.DecodeProcesses, "_start", "decoding processes started (a thread of their own)")
    phases.wrap(encoder.MediaEncoder, "embed", "encoder calls (queued)")
    phases.wrap(encoding.Queued, "finish", "encoder: waiting for a call's features")
    phases.wrap(features.FeatureCache, "file_hash", "cache: hash file")
    phases.wrap(features.FeatureCache, "get", "cache: read")
    phases.wrap(features.FeatureCache, "put", "cache: write")
    phases.wrap(feature_stores.ProcessStores, "put", "cache: write, handed to the processes")
    phases.wrap(row_features, "decode_media", "decode_media: a group's lookups and decoding (loader stage 1)")
    phases.wrap(row_features, "encode_media", "encode_media: a group's encoding and stores (loader stage 2)")
    phases.wrap(journal.Journal, "write", "journal write")
    phases.wrap(scheduler.Engine, "__init__", "engine build")
    phases.wrap(model_runner.SlotStep, "__init__", "engine build: steps traced, compiled or loaded, captured")
    phases.wrap(scheduler.Engine, "_prefill", "engine prefill (host)")
    job.decode_media, job.encode_media = row_features.decode_media, row_features.encode_media  # imported before

    class TimedPrefetch(job.Prefetch):
        def __iter__(self):
            it = super().__iter__()
            while True:
                with phases.timed("main thread waits for media"):
                    item = next(it, None)
                if item is None:
                    return
                yield item

    job.Prefetch = TimedPrefetch
    real_write = journal.Journal.write

    def write(self, entries):
        real_write(self, entries)
        if entries:
            phases.finished.append((CLOCK() - phases.start, len(entries)))

    journal.Journal.write = write


def job_rows(rows: int, mix: str, tiny: bool) -> tuple[list, list[int]]:
    """The mix's rows and answer lengths; a tiny run (the CPU check): 24 rows, answers of at most 12 tokens."""
    data, lengths = mix_rows(24 if tiny else rows, mix)
    return data, [min(n, 12) for n in lengths] if tiny else lengths


def job_generation(mix: str, lengths: list[int], tiny: bool) -> GenerationConfig:
    """Greedy decoding with the mix's budget as `dr bench job` sets it (a tiny run: its own longest answer), so the
    job and the engine alone size to the compiled shapes of `dr bench job`'s processes."""
    return GenerationConfig(max_new_tokens=max(lengths) if tiny else token_budget(mix, lengths), do_sample=False)


def run_job(
    work: Path, data: list, lengths: list[int], mix: str, tiny: bool, keep_features: bool, phases: Phases
) -> dict:
    """The job timed by `dr bench job`'s own code, with the phase timers installed and the GPU sampled. Its decoding
    processes start before the model's build, as `dr infer` starts them before its load (phases of theirs that began
    before the job's call have negative start times)."""
    from model.data.catalog import media_files
    from model.media.decoders import start_decoders

    instrument(phases)
    sizes, encoder_size, device = SHAPES[tiny]
    decoders = start_decoders(media_files(data), torch.device(device))
    model = job_model(work, sizes, encoder_size, device)
    if not keep_features:
        shutil.rmtree(work / "features", ignore_errors=True)
    gen = job_generation(mix, lengths, tiny)
    with GpuBusy() as busy, LockProbe() as probe, ExitStack() as closing:
        if decoders is not None:
            closing.callback(decoders.close)
        phases.start = CLOCK()
        result = whole_job(model, data, lengths, work, gen, CUDA_SLOTS["job"], fresh_features=False, decoders=decoders)
    return {
        **result,
        "gpu_busy_share": busy.share(),
        "lock_probe": probe.figures(),
        "floor": floor(model, data, lengths, result["slots"]),
        "phases": phases.table(),
        "finished_per_second": _per_second(phases.finished),
    }


def run_engine_only(work: Path, data: list, lengths: list[int], mix: str, tiny: bool) -> dict:
    """The same rows' features (from the job's cache) straight through the engine: no media, no journal."""
    model = job_model(work, *SHAPES[tiny])
    gen = job_generation(mix, lengths, tiny)
    result = engine_only(model, data, lengths, work, gen, CUDA_SLOTS["job"])
    return {**result, "floor": floor(model, data, lengths, result["slots"])}


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
    parser.add_argument("--mix", choices=MIXES, default="musiccaps")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = parser.parse_args()
    work = Path(args.work)
    begin = CLOCK()
    data, lengths = job_rows(args.rows, args.mix, args.tiny)
    write_media(work / "media", data, args.seconds)
    if args.engine_only:
        result = run_engine_only(work, data, lengths, args.mix, args.tiny)
    else:
        result = run_job(work, data, lengths, args.mix, args.tiny, args.keep_features, Phases())
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
