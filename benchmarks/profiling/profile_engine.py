"""Where the engine's time goes on a realistic-length job (issue #12): the host's share of each `advance` (refill,
step launches, collect), the GPU's share (a decode step at full occupancy, a prefill chunk), `torch.profiler` kernel
tables, and the engine at one slot (batch-1 latency). Full-size random weights, as `dr bench engine`.

Run from the repo root on a CUDA machine: `PYTHONPATH=. python benchmarks/profiling/profile_engine.py`, then
`PYTHONPATH=. python benchmarks/profiling/profile_engine.py start` (a second process's start-up, with Dynamo's phase
times).
"""

import sys
import time
from collections import defaultdict
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.workloads import audio_rows, never_stopping_model, realistic_lengths
from model.config import GenerationConfig
from model.engine.kv_cache import slot_attention_on
from model.engine.scheduler import SYNC_EVERY, Engine
from model.engine.sequence import Request
from model.engine.sizing import cache_length

SLOTS, BUDGET = 256, 512


def sync() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def requests(examples, lengths, greedy):
    return [
        Request(i, ex, replace(greedy, max_new_tokens=k), i)
        for i, (ex, k) in enumerate(zip(examples, lengths, strict=True))
    ]


def run_job(engine: Engine, reqs) -> tuple[float, int, int]:
    """(seconds, useful tokens, advances) of a whole job."""
    start = sync()
    engine.submit(reqs)
    advances = 0
    while engine.pending:
        engine.advance()
        advances += 1
    return sync() - start, sum(r.gen.max_new_tokens for r in reqs), advances


def host_share(engine: Engine, spent: dict) -> None:
    """Wraps the engine's phases with host timers (collect includes waiting for the GPU's steps)."""
    for name in ("_refill", "_collect", "step"):
        fn = getattr(engine, name)

        def timed(*a, fn=fn, name=name, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[name] += time.perf_counter() - t
            return out

        setattr(engine, name, timed)


def kernel_table(prof, rows: int = 25) -> str:
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=80)


def gpu_busy(prof) -> float:
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


if sys.argv[1:] == ["start"]:  # a second process: start-up from the compile cache the first one filled
    model = never_stopping_model("/tmp/dr_profile")
    examples = audio_rows(SLOTS)
    t0 = time.perf_counter()
    engine = Engine(model, SLOTS, cache_length(model.example_length(examples[0]), BUDGET), BUDGET, k_cap=1)
    engine.submit(requests(examples, [16] * SLOTS, GenerationConfig(do_sample=False)))
    while not engine.advance():
        pass
    print(f"second process: engine built and first rows done in {sync() - t0:.1f} s")
    print(torch._dynamo.utils.compile_times(repr="str"))
    sys.exit()

model = never_stopping_model("/tmp/dr_profile")
greedy = GenerationConfig(max_new_tokens=BUDGET, do_sample=False)
examples = audio_rows(2048)
prompt = model.example_length(examples[0])
length = cache_length(prompt, BUDGET)
print(f"prompt {prompt} positions, slot length {length}, {SLOTS} slots")

t0 = time.perf_counter()
engine = Engine(model, SLOTS, length, BUDGET, k_cap=1)
engine.submit(requests(examples[:SLOTS], [16] * SLOTS, greedy))
while not engine.advance():
    pass
print(f"build + first rows done (compile): {sync() - t0:.1f} s")
while engine.pending:
    engine.advance()

lengths = realistic_lengths(2048)
spent: dict = defaultdict(float)
host_share(engine, spent)
wall, useful, advances = run_job(engine, requests(examples[:1024], lengths[:1024], greedy))
print(f"job 1024 rows, sync_every {engine.sync_every}: {wall:.2f} s, {useful / wall:,.0f} tok/s, {advances} advances")
print("  host seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()))
for every in (4, 8, 16):
    engine.sync_every = every
    wall, useful, advances = run_job(engine, requests(examples, lengths, greedy))
    print(f"job 2048 rows, sync_every {every}: {wall:.2f} s, {useful / wall:,.0f} useful tok/s, {advances} advances")
engine.sync_every = SYNC_EVERY

# a decode step at full occupancy, no refill
engine.submit(requests(examples[:SLOTS], [BUDGET] * SLOTS, greedy))
engine.advance()
with slot_attention_on(engine.llm), torch.inference_mode():
    for width in reversed(engine.widths):
        start = sync()
        for _ in range(64):
            engine.step(width)
        step = (sync() - start) / 64
        print(f"decode step, width {width}, every slot busy: {step * 1e3:.2f} ms ({width / step:,.0f} tok/s)")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    with slot_attention_on(engine.llm), torch.inference_mode():
        for _ in range(16):
            engine.step(SLOTS)
    sync()
print(f"16 steps: GPU busy {gpu_busy(prof) * 1e3:.1f} ms")
print(kernel_table(prof))

# prefill chunks alone (they overwrite busy slots: timing only)
for rows in (1, 8, 32, 64):
    chunk = requests(examples[:rows], [BUDGET] * rows, greedy)
    start = sync()
    for _ in range(3):
        batch = model.prepare([r.example for r in chunk])
    prep = (sync() - start) / 3
    start = sync()
    for _ in range(3):
        engine._prefill(chunk, list(range(rows)))
    print(f"prefill {rows} rows: {(sync() - start) / 3 * 1e3:.1f} ms, of which prepare {prep * 1e3:.1f} ms")
while engine.pending:
    for h in list(engine.handles):
        if h is not None:
            engine.cancel(h)
    engine.advance()

# steady-state advances of a job, refills included
engine.submit(requests(examples, lengths, greedy))
for _ in range(40):
    engine.advance()
sync()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    start = time.perf_counter()
    for _ in range(10):
        engine.advance()
    wall = sync() - start
print(f"10 steady advances: wall {wall * 1e3:.1f} ms, GPU busy {gpu_busy(prof) * 1e3:.1f} ms")
print(kernel_table(prof))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=80))
while engine.pending:
    engine.advance()
del engine
torch._dynamo.reset()
torch.cuda.empty_cache()

# batch 1: one slot, compiled, each kernel
for kernel in ("flex", "sdpa"):
    t0 = time.perf_counter()
    one = Engine(model, 1, length, BUDGET, k_cap=1, kernel=kernel)
    for n in range(3):
        start = sync()
        run_job(one, requests(examples[:1], [64], greedy))
        seconds = sync() - start
        print(f"batch 1 ({kernel}), 64 tokens, call {n}: {seconds:.3f} s ({64 / seconds:.1f} tok/s, prefill included)")
    print(f"batch-1 engine ({kernel}) total incl. compile: {time.perf_counter() - t0:.1f} s")
    del one
    torch._dynamo.reset()
