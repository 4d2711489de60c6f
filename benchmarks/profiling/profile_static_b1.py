"""Where a batch-1 step of the static loop spends its time on a GPU, next to two floors: the model's linear layers
chained in one CUDA graph (cuBLAS GEMV), and the copy bandwidth. Output (H100, run 4):
benchmarks/results/2026-11-25-h100-infer-run4-compiled-prefill/profile_static_b1_h100.log.

Run from the repo root on a CUDA machine: `PYTHONPATH=. python benchmarks/profiling/profile_static_b1.py`.
"""

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.timing import seconds_per_call as seconds
from benchmarks.workloads import PROMPT, full_size_llm
from model.generate.static import decode_static
from model.text.stopping import StopRule

llm = full_size_llm(torch.bfloat16, "sdpa", lora=False)
linears = [m for m in llm.modules() if isinstance(m, torch.nn.Linear)]
inputs = [torch.randn(1, m.in_features, device="cuda", dtype=torch.bfloat16) for m in linears]


def chain():
    for m, x in zip(linears, inputs, strict=True):
        F.linear(x, m.weight)


side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    chain()
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    chain()
gb = sum(m.weight.numel() for m in linears) * 2 / 1e9
dt = seconds(graph.replay, 50)
print(f"linear weights {gb:.2f} GB; cuBLAS GEMV chain in a CUDA graph: {dt * 1e3:.2f} ms, {gb / dt:.0f} GB/s")


def copy_bandwidth(gigabytes: int = 4) -> float:
    src = torch.randn(gigabytes * 10**9 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * gigabytes / seconds(lambda: dst.copy_(src), 10)


print(f"copy: {copy_bandwidth():.0f} GB/s (read + write)")

embeds = torch.randn(1, PROMPT, llm.config.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
mask = torch.ones(1, PROMPT, dtype=torch.long, device="cuda")


def run():
    decode_static(llm, embeds, mask, 64, StopRule(-1, ((-5,),), lambda ids: ""), compile=True)


print(f"first call (compile): {seconds(run, 1):.1f} s")
seconds(run, 2)  # CUDA graph trees record on the second call
print(f"steady: {seconds(run, 1):.4f} s for 64 tokens")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
