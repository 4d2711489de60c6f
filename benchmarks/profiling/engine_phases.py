"""Where an engine's time goes on `dr bench engine`'s jobs (2,048 rows, realistic answer lengths, short / long / varied
prompts): the device's busy time in decode steps and in prefills (CUDA events around each, so the host never waits
for them), the device's idle share, and the host's time per part of an advance (growth, sync, step launches, waiting
for the state copy, reading it, preparing prompts, prefill launches). Then a window of the long job under
torch.profiler: the kernels that took the most device time. The engine is shipped code, wrapped from outside.

    PYTHONPATH=. python3 benchmarks/profiling/engine_phases.py OUT.json [--rows 2048] [--slots 256]
    PYTHONPATH=. python3 benchmarks/profiling/engine_phases.py OUT.json --tiny  # the CPU check
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import replace

import torch

from benchmarks.workloads import never_stopping_model, prompt_rows, realistic_lengths
from model.config import LLAMA_TINY, VICUNA_7B, GenerationConfig
from model.engine import slot_state
from model.engine.scheduler import Engine
from model.engine.sequence import Request

CLOCK = time.perf_counter
MISSING = object()


class Spans:
    """Device time of wrapped calls, through CUDA events recorded on the stream (none on a CPU: host time)."""

    def __init__(self) -> None:
        self.pairs: dict[str, list] = defaultdict(list)
        self.host: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def device(self, name: str, fn):
        def wrapper(*args, **kwargs):
            if torch.cuda.is_available():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.pairs[name].append((start, end))
            else:
                begin = CLOCK()
                out = fn(*args, **kwargs)
                self.pairs[name].append(CLOCK() - begin)
            return out

        return wrapper

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            begin = CLOCK()
            out = fn(*args, **kwargs)
            self.host[name] += CLOCK() - begin
            self.calls[name] += 1
            return out

        return wrapper

    def report(self) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        device = {
            name: round(sum(p if isinstance(p, float) else p[0].elapsed_time(p[1]) / 1e3 for p in pairs), 3)
            for name, pairs in self.pairs.items()
        }
        return {
            "device_s": device,
            "device_calls": {name: len(pairs) for name, pairs in self.pairs.items()},
            "host_s": {name: round(s, 3) for name, s in self.host.items()},
            "host_calls": dict(self.calls),
        }


def instrumented(engine: Engine, spans: Spans, prefill_positions: list) -> list[tuple[object, str, object]]:
    """Wraps the engine's parts (instance attributes only; the class is untouched); returns what to put back."""
    saved = [
        (owner, name, owner.__dict__.get(name, MISSING))
        for owner, name in [
            (engine, n)
            for n in ("step", "packed_prefill", "graphs", "_grow", "_collect", "_refill", "_gather", "advance")
        ]
        + [(engine.kv, "sync"), (engine.model, "prepare")]
    ]
    engine.step = spans.device("decode_step", spans.timed("step_launch", engine.step))

    def counted(run, name):
        """A prefill call's rows and the positions it ran (a graph's padded width; a packed call's prompts: its
        `sizes`, on the host) and the prompts' own positions where the host knows them (a graph's need the device)."""

        def wrapper(embeds, index, third):
            packed = isinstance(third, (list, tuple))
            real = sum(third) if packed else None
            prefill_positions.append((index.shape[0], real if packed else int(index.numel()), real))
            return spans.device(name, spans.timed(name + "_launch", run))(embeds, index, third)

        return wrapper

    engine.packed_prefill = counted(engine.packed_prefill, "prefill_packed")
    if engine.graphs is not None:
        engine.graphs = type("Timed", (), {"__call__": staticmethod(counted(engine.graphs, "prefill_graph"))})()
    for name in ("_grow", "_collect", "_refill", "_gather", "advance"):
        setattr(engine, name, spans.timed(name, getattr(engine, name)))
    engine.kv.sync = spans.timed("kv_sync", engine.kv.sync)
    engine.model.prepare = spans.timed("prepare", engine.model.prepare)
    return saved


def restored(saved: list[tuple[object, str, object]]) -> None:
    for owner, name, value in saved:
        if value is MISSING:
            owner.__dict__.pop(name, None)
        else:
            setattr(owner, name, value)


def run_job(engine: Engine, examples: list, lengths: list[int], gen: GenerationConfig) -> float:
    begin = CLOCK()
    refused = engine.submit(
        Request(i, ex, replace(gen, max_new_tokens=k), i)
        for i, (ex, k) in enumerate(zip(examples, lengths, strict=True))
    )
    assert not refused, refused[0].error
    while engine.pending:
        engine.advance()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return CLOCK() - begin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--prompts", default="short,long,varied")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    sizes, device = (LLAMA_TINY, "cpu") if args.tiny else (VICUNA_7B, "cuda")
    model = never_stopping_model(tempfile.mkdtemp(), sizes, device)
    gen = GenerationConfig(max_new_tokens=args.budget, do_sample=False, decoder="engine")
    lengths = [min(n, args.budget) for n in realistic_lengths(args.rows)]
    shapes = {shape: prompt_rows(model, args.rows, shape) for shape in args.prompts.split(",")}
    longest = max(model.example_length(e) for rows in shapes.values() for e in rows)
    engine = Engine.sized(
        model, longest, args.budget, args.slots, k_cap=1, kernel="flex" if device == "cuda" else "sdpa"
    )
    warm = shapes[next(iter(shapes))][: engine.slots]
    run_job(engine, warm, [16] * len(warm), gen)  # compile, capture
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "slots": engine.slots,
        "pool_blocks": engine.book.blocks,
        "useful_tokens": sum(lengths),
        "shapes": {},
    }
    waits = []
    real_landed = slot_state.StateCopy.landed

    def landed(copy):
        begin = CLOCK()
        out = real_landed(copy)
        waits.append(CLOCK() - begin)
        return out

    slot_state.StateCopy.landed = landed
    for shape, examples in shapes.items():
        spans, prefills = Spans(), []
        saved = instrumented(engine, spans, prefills)
        waits.clear()
        advances = engine.advances
        wall = run_job(engine, examples, lengths, gen)
        restored(saved)
        entry = spans.report() | {
            "wall_s": round(wall, 3),
            "useful_tokens_per_s": round(sum(lengths) / wall, 1),
            "advances": engine.advances - advances,
            "waiting_for_state_copy_s": round(sum(waits), 3),
            "prefill_calls": len(prefills),
            "prefill_rows": sum(p[0] for p in prefills),
            "prefill_positions_run": sum(p[1] for p in prefills),
            "prefill_positions_real_packed": sum(p[2] for p in prefills if p[2] is not None),
        }
        busy = sum(entry["device_s"].values())
        entry["device_idle_share"] = round(max(0.0, 1 - busy / wall), 3)
        report["shapes"][shape] = entry
        print(shape, json.dumps(entry))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    slot_state.StateCopy.landed = real_landed
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    last = list(shapes)[-1]
    engine.submit(
        Request(i, ex, replace(gen, max_new_tokens=k), i)
        for i, (ex, k) in enumerate(zip(shapes[last][:1024], lengths[:1024], strict=True))
    )
    for _ in range(10):
        engine.advance()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(20):
            engine.advance()
        if device == "cuda":
            torch.cuda.synchronize()
    by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=by, row_limit=20, max_name_column_width=80)
    print(f"{last} prompts, 20 advances in steady state:\n{table}")
    report["profile_table"] = table
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
