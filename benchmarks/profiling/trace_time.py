"""How long Dynamo takes to trace the engine's decode step: the part of a second process's start-up that the compile
cache does not save (issue #12). Since run 6 the step compiles one decoder layer, which serves every layer, and the
step's end, once per width (model/engine/model_runner.py); a trace depends on the code traced, not on the widths, so a
32-layer Llama of tiny widths on the CPU shows it. Dynamo runs alone (backend "eager"); each traced frame's time is
printed. Output: benchmarks/results/2026-12-02-cpu-dynamo-trace-time/trace_time_cpu.log.

`PYTHONPATH=. python benchmarks/profiling/trace_time.py` traces the step with FlexAttention, `... trace_time.py sdpa`
with SDPA.
Run 5's measurements of the whole-model trace (nested compile regions, 32 toy blocks; benchmarks/README.md) were made
with this script as it was at commit e7fdc6a.
"""

import sys
import time

import torch

from benchmarks.workloads import audio_rows, never_stopping_model
from model.config import LLAMA_TINY, GenerationConfig
from model.engine.scheduler import Engine
from model.engine.sequence import Request
from model.engine.sizing import cache_length

kernel = "sdpa" if sys.argv[1:] == ["sdpa"] else "flex"
model = never_stopping_model("/tmp/dr_trace_time", {**LLAMA_TINY, "num_hidden_layers": 32}, "cpu", vocab=512)
real_compile = torch.compile
torch.compile = lambda fn, mode=None, **options: real_compile(fn, backend="eager", **options)
examples = audio_rows(4)
gen = GenerationConfig(max_new_tokens=8, do_sample=False)
engine = Engine(model, 4, cache_length(model.example_length(examples[0]), 8), 8, k_cap=1, kernel=kernel, compile=True)
engine.submit([Request(i, ex, gen, i) for i, ex in enumerate(examples)])
engine.advance()  # the first advance only prefills
start = time.perf_counter()
engine.advance()  # the first steps: Dynamo traces the step
print(f"{kernel}: first steps (the traces and the eager CPU run) {time.perf_counter() - start:.1f} s")
times = torch._dynamo.utils.compile_times(repr="csv")
for name, value in zip(*times, strict=True):
    if name in ("_compile.compile_inner", "bytecode_tracing", "get_fake_value", "build_guards"):
        print(f"  {name}: {value}")
