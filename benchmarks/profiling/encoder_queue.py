"""What one encoder call costs a job's loader on the host (model/media/encoding.py `Queued.call`), per kind at its
CALL_FILES files: its parts timed apart (the inputs stacked into pinned memory, the queued copy to the device, the
queued ImageBind call, the queued copy back) and then the wait for its GPU work, with the GPU idle and with another
stream kept busy as the engine's steps keep it (matrix products queued ahead of the call). A part that takes as long
as the busy stream's work waits for the whole device; every synchronizing call PyTorch detects in a call
(`torch.cuda.set_sync_debug_mode`) is listed with where it was made. (Its run of 2026-12-07 also timed each call as a
CUDA graph's replay, since removed: benchmarks/results/2026-12-07-h100-next-b/.)

A catalog-shaped job's 64 calls took 106 ms each to queue on an H100 while their read-backs took 13 ms
(benchmarks/results/2026-12-07-h100-queue-ahead/): this tells which part waits.

    PYTHONPATH=. python benchmarks/profiling/encoder_queue.py OUT.json [--repeats 5] [--busy-ms 300]
    PYTHONPATH=. python benchmarks/profiling/encoder_queue.py OUT.json --tiny  # the CPU check: tiny encoder
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks.profiling.encoder_batch import one_input
from model.media.encoder import CALL_FILES, MediaEncoder

CLOCK = time.perf_counter


def chunk_views(x: torch.Tensor, files: int) -> list[torch.Tensor]:
    """`files` copies of one input as a job's loader holds them: views into a tensor in fresh shared memory (a chunk
    the decoding processes sent, model/media/decoders.py `Found.inputs`)."""
    return list(x.unsqueeze(0).expand(files, *x.shape).contiguous().share_memory_())


def busy(ms: float) -> None:
    """About `ms` of matrix products queued on a stream of their own (none with ms 0)."""
    if ms <= 0:
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        a @ a
        end.record()
    end.synchronize()
    per = max(start.elapsed_time(end), 0.01)
    with torch.cuda.stream(stream):
        for _ in range(int(ms / per)):
            a @ a


def one_call(encoder: MediaEncoder, modality: str, xs: list[torch.Tensor]) -> dict:
    """`Queued.call`'s steps as it takes them, each part's host milliseconds, then the wait for the features."""
    on_cuda = encoder.device.type == "cuda"
    marks = [CLOCK()]
    stacked = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, pin_memory=on_cuda)
    torch.stack(xs, out=stacked)
    marks.append(CLOCK())
    inputs = stacked.to(encoder.device, non_blocking=True).to(encoder.dtype)
    marks.append(CLOCK())
    features = encoder.embed(modality, inputs)
    marks.append(CLOCK())
    if on_cuda:
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    marks.append(CLOCK())
    if on_cuda:
        done.synchronize()
    marks.append(CLOCK())
    names = ("stack_into_pinned", "copy_queued", "embed_queued", "copy_back_queued", "wait_for_features")  # 6 marks
    return {f"{n}_ms": round(1000 * (b - a), 2) for n, a, b in zip(names, marks, marks[1:], strict=False)}


def syncs(encoder: MediaEncoder, modality: str, xs: list[torch.Tensor]) -> list[str]:
    """Each synchronizing call PyTorch reports in one call, with the line of this project's code that made it."""
    if encoder.device.type != "cuda":
        return []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_call(encoder, modality, xs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in seen if "ynchroniz" in str(w.message)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy-ms", type=float, default=300.0, help="GPU work queued on another stream first")
    parser.add_argument("--tiny", action="store_true", help="tiny encoder on the CPU (checks the script)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    with torch.device(device):
        encoder = MediaEncoder("tiny" if args.tiny else "huge")
    encoder.drop_unused_towers()
    encoder = encoder.to(device, torch.float32 if args.tiny else torch.bfloat16)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "kinds": {}}
    with tempfile.TemporaryDirectory() as folder:
        for modality in ("audio", "image", "video"):
            x, files = one_input(Path(folder), modality), CALL_FILES[modality]
            one_call(encoder, modality, chunk_views(x, files))  # warm-up: kernels chosen, pinned blocks cached
            kind: dict = {"files": files, "input_mb": round(files * x.numel() * x.element_size() / 2**20, 1)}
            for label, ms in (("idle", 0.0), ("busy", 0.0 if args.tiny else args.busy_ms)):
                runs = []
                for _ in range(args.repeats):
                    xs = chunk_views(x, files)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    busy(ms)
                    runs.append(one_call(encoder, modality, xs))
                kind[label] = {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
            try:
                kind["syncs"] = syncs(encoder, modality, chunk_views(x, files))
            except Exception:  # the listing is a diagnosis: its failure is reported, not fatal
                kind["syncs"] = [traceback.format_exc(limit=2)]
            report["kinds"][modality] = kind
            print(modality, json.dumps(kind), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
