"""Where a paged engine's decode time goes: a full engine of rows (full-size shapes, random weights) decoding, timed per
advance, then the same advances under torch.profiler with the kernels that took the most device time, per kernel
("flex" and "sdpa" engines in turn, one process). "flex-masked" is the flex engine with every block it reads
listed as partly filled, so its mask is evaluated on each (as before full blocks were listed): the same compiled
kernel, for the side-by-side ratio. A "/N" suffix runs that engine with cache blocks of N positions instead of
kv_cache.BLOCK's (the same memory in more or fewer blocks): a row then reads at most N - 1 unused positions of its
last block.

    PYTHONPATH=. python3 benchmarks/profiling/paged_step.py [--slots 512] [--prompt 40] [--budget 64]
    ... paged_step.py --slots 256 --prompt 170 --budget 96 --kernels flex,flex-masked  # full blocks against none
    ... paged_step.py --slots 512 --prompt 170 --budget 96 --kernels flex,flex/64,flex/16  # blocks of BLOCK, 64, 16
    PYTHONPATH=. python3 benchmarks/profiling/paged_step.py --tiny  # the CPU check
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.job_workload import job_model
from model.config import LLAMA_TINY, VICUNA_7B, GenerationConfig
from model.engine import kv_cache
from model.engine.scheduler import Engine
from model.engine.sequence import Request
from model.engine.sizing import engine_size
from model.network.deepresonance import Example


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def masked_everywhere() -> None:
    """The step's FlexAttention told that every block it reads is partly filled (its mask evaluated on each)."""
    real = kv_cache.PagedKV.step_inputs

    def step_inputs(self, width, alive):
        layers = real(self, width, alive)
        blocks = layers[0].visible
        if not isinstance(blocks, kv_cache.FlexBlocks):
            return layers
        table = layers[0].table
        every = kv_cache.FlexBlocks(
            blocks.partial + blocks.full, table.view(width, 1, 1, -1), torch.zeros_like(blocks.full)
        )
        return [layer._replace(visible=every) for layer in layers]

    kv_cache.PagedKV.step_inputs = step_inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--kernels", default="flex,sdpa")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    sizes, encoder, device = (LLAMA_TINY, "tiny", "cpu") if args.tiny else (VICUNA_7B, "huge", "cuda")
    model = job_model(Path(tempfile.mkdtemp()), sizes, encoder, device)
    gen = GenerationConfig(max_new_tokens=args.budget, do_sample=False, decoder="engine")
    example = Example("", "Describe the music in detail.", [])
    real_inputs = kv_cache.PagedKV.step_inputs
    for kernel in args.kernels.split(","):
        kv_cache.PagedKV.step_inputs = real_inputs
        name, _, block = kernel.partition("/")
        if name == "flex-masked":
            masked_everywhere()
        begin = time.perf_counter()
        slots, length, blocks = engine_size(model, args.prompt, args.budget, args.slots)
        block = int(block or kv_cache.BLOCK)
        engine = Engine(
            model, slots, length, args.budget, blocks=blocks and blocks * kv_cache.BLOCK // block, block=block, k_cap=1,
            kernel=name.split("-")[0],
        )  # fmt: skip
        sync()
        print(
            f"{kernel}: built in {time.perf_counter() - begin:.1f} s; {engine.slots} slots, {engine.book.blocks} blocks"
        )
        engine.submit([Request(i, example, gen, i) for i in range(4 * engine.slots)])
        for _ in range(4):
            engine.advance()
        sync()
        begin, advances = time.perf_counter(), 20
        for _ in range(advances):
            engine.advance()
        sync()
        per_step = (time.perf_counter() - begin) / advances / engine.sync_every * 1e3
        print(f"{kernel}: {per_step:.2f} ms a step ({engine.active} rows active)")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                engine.advance()
            sync()
        by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=by, row_limit=14, max_name_column_width=70))
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
