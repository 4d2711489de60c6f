"""The static loop compiled with dynamic shapes from the start (`torch.compile(dynamic=True)`), to see whether one
compile can serve every batch shape. Output (H100, run 4):
benchmarks/results/2026-11-25-h100-infer-run4-compiled-prefill/static_dynamic_compile_h100.json (rejected: see README).

Run from the repo root on a CUDA machine: `PYTHONPATH=. python benchmarks/profiling/static_dynamic_compile.py OUT.json`.
"""

import functools
import json
import sys
from unittest import mock

import torch

from benchmarks.workloads import NEW_TOKENS, decode, full_size_llm

llm = full_size_llm(torch.bfloat16, "sdpa", lora=False)
results = []
with mock.patch.object(torch, "compile", functools.partial(torch.compile, dynamic=True)):
    for batch in (1, 64, 512):
        first, steady = decode(llm, batch, torch.bfloat16, original=False, static=True)
        tokens_per_s = round(NEW_TOKENS * batch / steady, 1)
        results.append(
            dict(batch=batch, first_call_seconds=round(first, 1), seconds=round(steady, 4), tokens_per_s=tokens_per_s)
        )
        print(results[-1], flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(results, f, indent=2)
