"""What compiling the packed prefill's layer (`prefill_layer_for` in model/engine/model_runner.py) adds to an engine's
build: each backend in a process of its own, timed around the warm-up that traces and compiles the layer. Dynamo's
trace depends on the code traced, not on the widths, so a small Llama on the CPU shows it: backend "eager" is
Dynamo alone, "aot_eager" adds the dynamic-shape graph of AOT autograd, "inductor" adds Inductor (its first process
compiles into the cache, the second loads from it, as a warm start of `dr infer` does).

`--shapes marked`: only the positions' and the prompts' dimensions marked dynamic, instead of `dynamic=True`.

    PYTHONPATH=. python benchmarks/profiling/prefill_trace.py OUT.json [--repeats 2] [--shapes dynamic|marked]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ONE = """
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from model.engine import model_runner
from model.engine.kv_cache import PagedKV, slot_attention_on
config = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=688, vocab_size=300)
lm = LlamaForCausalLM(config).eval()
kv = PagedKV(config, 4, 4, 40, torch.float32, torch.device("cpu"), "sdpa")
real = torch.compile
torch.compile = lambda fn, **options: real(fn, **{**options, "backend": sys.argv[1]})
if sys.argv[2] == "marked":  # only the positions' and the prompts' dimensions symbolic, the rest as first seen
    torch.compile = lambda fn, **options: mark(real(fn, **{**options, "backend": sys.argv[1], "dynamic": None}))

    def mark(compiled):
        def run(block, hidden, cos, sin, packed):
            for t, d in ((hidden, 1), (cos, 1), (sin, 1), (packed.index, 0), (packed.starts, 0)):
                torch._dynamo.mark_dynamic(t, d)
            return compiled(block, hidden, cos, sin, packed)

        return run

model_runner.COMPILE_PREFILL = True
begin = time.perf_counter()
with slot_attention_on(lm), torch.inference_mode():
    model_runner.prefill_layer_for(lm, kv, True)
print(time.perf_counter() - begin)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shapes", choices=["dynamic", "marked"], default="dynamic")
    args = parser.parse_args()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="dr_prefill_trace_")}
    report: dict = {"device": "cpu", "cores": os.cpu_count(), "torch": None, "shapes": args.shapes, "seconds": {}}
    runs = [
        ("eager", "eager"),
        ("aot_eager", "aot_eager"),
        ("inductor", "inductor cold"),
        ("inductor", "inductor warm"),
    ]
    for _ in range(args.repeats):
        for backend, name in runs:
            begin = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", ONE, backend, args.shapes], env=env, capture_output=True, text=True, check=True
            )
            report["seconds"].setdefault(name, []).append(
                {"warm_up": round(float(done.stdout.split()[-1]), 2), "process": round(time.perf_counter() - begin, 2)}
            )
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dr_prefill_trace_")  # the next cold run is cold
    import torch

    report["torch"] = torch.__version__
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
