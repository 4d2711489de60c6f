"""CPU: the continuous-batching engine against `generate` on a `run_inference` job with the tiny checkpoint set
(random weights, so rows never stop early and the engine's refills bring nothing: this measures its overhead).

Usage: PYTHONPATH=. python benchmarks/profiling/cpu_engine_vs_generate.py OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ckpt.layout import layout
from ckpt.tiny import write_tiny_set
from model.config import GenerationConfig
from model.data.catalog import Row
from model.infer.job import run_inference
from model.network.checkpoint import load_model


def main(out: Path) -> None:
    torch.set_num_threads(1)  # the machine's other jobs share its cores
    work = Path(tempfile.mkdtemp())
    paths = layout(write_tiny_set(work / "ckpt"))
    model = load_model(paths.vicuna, paths.delta_dir("alpha"), paths.imagebind)
    model.merge_lora()
    rows = [Row(f"r{i}", "", f"Question number {i} about music?", "") for i in range(48)]
    results = []
    for repeat in range(3):
        for decoder in ("generate", "engine"):
            for do_sample in (False, True):
                gen = GenerationConfig(max_new_tokens=32, do_sample=do_sample, decoder=decoder)
                start = time.perf_counter()
                run_inference(model, rows, work, work / f"{repeat}{decoder}{do_sample}" / "r.json", gen, batch_size=8)
                seconds = time.perf_counter() - start
                results.append(dict(repeat=repeat, decoder=decoder, sampled=do_sample, seconds=round(seconds, 3)))
                print(results[-1])
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
