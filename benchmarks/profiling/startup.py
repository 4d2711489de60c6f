"""Where an engine's start-up goes, in this process: the cache pool's allocation, each step width's compile (or load
from the compile cache) and CUDA-graph capture, how many compiled forms were loaded whole (model/engine/
compile_cache.py), Dynamo's and Inductor's own counters, and the first rows through it. Run it twice on one machine:
the first process compiles cold, the second shows what a warm compile cache leaves.

    PYTHONPATH=. python3 benchmarks/profiling/startup.py OUT.json [--slots 256] [--prompt 40] [--budget 64]
    PYTHONPATH=. python3 benchmarks/profiling/startup.py OUT.json --tiny [--compile]  # the CPU check: tiny shapes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.job_workload import job_model
from model.config import LLAMA_TINY, VICUNA_7B, GenerationConfig
from model.engine import cuda_graphs, kv_cache, scheduler
from model.engine.compile_cache import Precompiled
from model.engine.scheduler import Engine
from model.engine.sequence import Request
from model.network.deepresonance import Example

CLOCK = time.perf_counter


def timed_calls(owner, name: str, into: list[float]) -> None:
    """Wraps owner.name so each call's seconds (device synchronized) are appended to `into`."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        begin = CLOCK()
        out = real(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        into.append(round(CLOCK() - begin, 3))
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compile on a CPU too (a CUDA engine always does)")
    args = parser.parse_args()
    sizes, encoder, device = (LLAMA_TINY, "tiny", "cpu") if args.tiny else (VICUNA_7B, "huge", "cuda")
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "args": vars(args)}
    begin = CLOCK()
    model = job_model(Path(tempfile.mkdtemp()), sizes, encoder, device)
    report["model_build_s"] = round(CLOCK() - begin, 2)
    captures: list[float] = []
    pools: list[float] = []
    prefill_layers: list[float] = []  # the prefill's layer compiled or loaded (whether a job below
    # model_runner.COMPILE_PREFILL_POSITIONS would win back a stored form's load)
    timed_calls(cuda_graphs, "capture", captures)
    timed_calls(kv_cache.PagedKV, "__init__", pools)
    timed_calls(scheduler, "prefill_layer_for", prefill_layers)
    torch._dynamo.utils.counters.clear()
    begin = CLOCK()
    engine = Engine.sized(model, args.prompt, args.budget, args.slots, k_cap=1, compile=args.compile or None)
    report["engine_build_s"] = round(CLOCK() - begin, 2)
    report["engine"] = {"slots": engine.slots, "length": engine.length, "blocks": engine.book.blocks}
    report["pool_alloc_s"] = pools
    report["prefill_layer_s"] = prefill_layers
    report["step_captures_s"] = {str(w): s for w, s in zip(engine.widths, captures, strict=False)}
    gen = GenerationConfig(max_new_tokens=args.budget, do_sample=False, decoder="engine")
    example = Example("", "Describe the music in detail. " * max(1, args.prompt // 8), [])
    begin = CLOCK()
    first = None
    for _ in engine.run(Request(i, example, gen, i) for i in range(engine.slots)):
        first = first if first is not None else CLOCK() - begin
    report["first_rows_s"] = round(first, 2)
    report["one_engine_full_s"] = round(CLOCK() - begin, 2)
    report["prefill_graph_captures_s"] = captures[len(engine.widths) :]
    forms = [*engine.step.layers.values(), *engine.step.finishes.values(), engine.packed_prefill.keywords["layer"]]
    forms = [f for f in forms if isinstance(f, Precompiled) and f.compiled is not None]  # those the process ran
    report["compiled_forms"] = {
        "loaded": sum(f.loaded for f in forms),
        "compiled and stored": sum(f.stored and not f.loaded for f in forms),
        "compiled, not stored": sum(not f.stored for f in forms),  # each with its warning in the output
        "refused": [f"{f.fn.__qualname__}: {f.refused}" for f in forms if f.refused],  # stored, not loaded: why
        # the process-wide settings each form met (a form stored under other settings is compiled again)
        "settings": sorted({f.settings for f in forms if f.settings is not None}),
    }
    counters = torch._dynamo.utils.counters
    report["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "inductor", "aot_autograd")}
    report["compile_times"] = torch._dynamo.utils.compile_times(repr="str")
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "compile_times"}, indent=1, default=str))


if __name__ == "__main__":
    main()
