"""The engine's decode step with its q/k/v and gate/up projections joined (model/engine/fused_layer.py) against
transformers' layers, in one process on one model (full-size shapes, random weights): for each slot count, an engine
each way (built in turn, twice, so that neither side always runs first) fills its slots with rows of a short prompt,
then times the step alone (its CUDA graph replayed, CUDA events: device milliseconds a step) and whole advances
(wall milliseconds a step, the host's work included). One slot is where joining should count: its step is a
matrix-vector pass over every weight.

    PYTHONPATH=. python3 benchmarks/profiling/fused_step.py OUT.json [--slots 1,64,512] [--steps 40]
    PYTHONPATH=. python3 benchmarks/profiling/fused_step.py OUT.json --tiny  # the CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.job_workload import job_model
from model.config import LLAMA_TINY, VICUNA_7B, GenerationConfig
from model.engine import fused_layer
from model.engine.scheduler import Engine
from model.engine.sequence import Request
from model.engine.sizing import engine_size
from model.network.deepresonance import Example

BUDGET = 256  # new tokens a row may take: more than the warm-up and the timed steps run


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def step_ms(engine: Engine, steps: int, cuda: bool) -> float:
    """Milliseconds a step of the step alone at the engine's current width (device time on CUDA)."""
    width = engine._width()
    if not cuda:
        begin = time.perf_counter()
        for _ in range(steps):
            engine.step(width)
        return (time.perf_counter() - begin) / steps * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        engine.step(width)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def measure(model, slots: int, steps: int, cuda: bool) -> dict:
    """An engine of `slots` slots, every slot decoding: the step alone and whole advances, milliseconds a step."""
    gen = GenerationConfig(max_new_tokens=BUDGET, do_sample=False, decoder="engine")
    example = Example("", "Describe the music in detail.", [])
    begin = time.perf_counter()
    size, length, blocks = engine_size(model, 40, BUDGET, slots)
    engine = Engine(model, size, length, BUDGET, blocks=blocks, k_cap=1, narrow=())
    sync(cuda)
    built = time.perf_counter() - begin
    engine.submit([Request(i, example, gen, i) for i in range(engine.slots)])
    for _ in range(3):
        engine.advance()
    sync(cuda)
    alone = step_ms(engine, steps, cuda)
    advances = max(1, steps // engine.sync_every)
    begin = time.perf_counter()
    for _ in range(advances):
        engine.advance()
    sync(cuda)
    wall = (time.perf_counter() - begin) / advances / engine.sync_every * 1e3
    result = {"slots": engine.slots, "active": engine.active, "build_s": round(built, 2)}
    result |= {"step_ms": round(alone, 3), "advance_ms_a_step": round(wall, 3)}
    result["tok_s"] = round(engine.active / wall * 1e3, 1)
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--slots", default="1,64,512")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda = not args.tiny
    sizes, encoder, device = (LLAMA_TINY, "tiny", "cpu") if args.tiny else (VICUNA_7B, "tiny", "cuda")
    model = job_model(Path(tempfile.mkdtemp()), sizes, encoder, device)
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "runs": {}}
    for slots in (int(s) for s in args.slots.split(",")):
        runs: dict[str, list[dict]] = {"unfused": [], "fused": []}
        for fused in (False, True, True, False):
            fused_layer.FUSE_PROJECTIONS = fused
            runs["fused" if fused else "unfused"].append(measure(model, slots, args.steps, cuda))
        summary = {
            side: {key: statistics.median(r[key] for r in rs) for key in ("step_ms", "advance_ms_a_step", "tok_s")}
            for side, rs in runs.items()
        }
        summary["step_unfused_over_fused"] = round(summary["unfused"]["step_ms"] / summary["fused"]["step_ms"], 3)
        report["runs"][slots] = {"each": runs, "median": summary}
        print(slots, json.dumps(summary), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
