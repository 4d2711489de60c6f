"""How many files one ImageBind call should take in a job: files/s and the call's peak memory above the weights, per
modality and batch size, on the job's inputs (the catalog mix's wavs, PNGs and mp4s through the job's own decoding:
model/media/decoders.py's load_or_error).

A job's encoder runs beside the engine's cache pool, which takes a share of the free memory (model/engine/sizing.py):
what a call allocates must fit in what the pool leaves. Batches that do not fit are reported as OOM.

    PYTHONPATH=. python benchmarks/profiling/encoder_batch.py OUT.json [--batches 16,64,512] [--size huge]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.job_workload import mix_rows, write_media
from model.media.decoders import load_or_error
from model.media.encoder import MediaEncoder


def random_encoder(size: str) -> MediaEncoder:
    """ImageBind of `size` with random weights, its unused towers dropped: bf16 on a GPU, fp32 on a CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        encoder = MediaEncoder(size)
    encoder.drop_unused_towers()
    return encoder.to(device, torch.bfloat16 if device == "cuda" else torch.float32)


def one_input(folder: Path, modality: str) -> torch.Tensor:
    """The encoder input of the catalog mix's first file of `modality`, decoded as a job decodes it."""
    data, _ = mix_rows(200, "catalog")
    row = next(r for r in data if modality in r.mm_names)
    write_media(folder, [row], 10.0)
    return load_or_error(modality, folder / row.mm_paths[row.mm_names.index(modality)])


def measure(encoder: MediaEncoder, modality: str, x: torch.Tensor, batch: int, repeats: int) -> dict:
    """files/s over `repeats` calls after one warm-up call, and the peak bytes a call allocated beyond what was
    allocated before it."""
    inputs = x.unsqueeze(0).expand(batch, *x.shape).contiguous()
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    if encoder.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    try:
        encoder(modality, inputs)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            encoder(modality, inputs)
        sync()
    except torch.OutOfMemoryError:
        return {"batch": batch, "oom": True}
    seconds = (time.perf_counter() - start) / repeats
    out = {"batch": batch, "files_per_s": round(batch / seconds, 1), "ms_per_call": round(1000 * seconds, 1)}
    if encoder.device.type == "cuda":
        out["peak_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batches", default="16,32,64,128,256,512")
    parser.add_argument("--size", default="huge")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    encoder = random_encoder(args.size)
    device = encoder.device.type
    folder = Path(tempfile.mkdtemp(prefix="dr_encoder_batch_"))
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": args.size}
    for modality in ("audio", "image", "video"):
        x = one_input(folder, modality)
        report[modality] = {"input_shape": list(x.shape), "runs": []}
        for batch in map(int, args.batches.split(",")):
            got = measure(encoder, modality, x, batch, args.repeats)
            report[modality]["runs"].append(got)
            print(modality, got, flush=True)
            if got.get("oom"):
                break
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
