"""How full the engine's decode steps are, whatever the device: `dr bench engine`'s rows (realistic answer lengths,
a prompt shape) through the real scheduler on a tiny model, counting each step's width and the slots decoding in it
(and how many wide steps a narrower width would have held), the prefill calls and their positions. The steps a job
needs are set by the scheduler alone (when a freed slot is seen and refilled), so a CPU measures them as a GPU would;
a step's cost is the device's (benchmarks/README.md).

    PYTHONPATH=. python benchmarks/profiling/occupancy.py OUT.json --prompts long --slots 512 --blocks 6400 \
        [--refill-min 16] [--sync-every 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.workloads import never_stopping_model, prompt_rows, realistic_lengths
from model.config import LLAMA_TINY, GenerationConfig
from model.engine.scheduler import SYNC_EVERY, Engine
from model.engine.sequence import Request
from model.engine.sizing import cache_length

HOLDING = (64, 128, 256, 384)  # slot counts a narrower step width would hold


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--prompts", default="long")
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=6400, help="the pool (6,336-6,400 on an H200 at 7B, bf16)")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--refill-min", type=int, default=None, help="the engine's default: slots // 8")
    parser.add_argument("--sync-every", type=int, default=SYNC_EVERY)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = never_stopping_model(tempfile.mkdtemp(), LLAMA_TINY, "cpu")
    examples = prompt_rows(model, args.rows, args.prompts)
    lengths = [min(n, args.budget) for n in realistic_lengths(args.rows)]
    length = cache_length(max(model.example_length(e) for e in examples), args.budget)
    engine = Engine(
        model, args.slots, length, args.budget, k_cap=1, blocks=args.blocks, sync_every=args.sync_every,
        refill_min=args.refill_min,
    )  # fmt: skip
    steps: list[tuple[int, int]] = []
    prefills: list[int] = []
    step, prefill = engine.step, engine._prefill
    engine.step = lambda width: steps.append((width, int((~engine.state.done[:width]).sum()))) or step(width)
    engine._prefill = lambda requests, slots: prefills.append(sum(r.size for r in requests)) or prefill(requests, slots)
    greedy = GenerationConfig(max_new_tokens=args.budget, do_sample=False)
    engine.submit(
        Request(i, ex, replace(greedy, max_new_tokens=n), i)
        for i, (ex, n) in enumerate(zip(examples, lengths, strict=True))
    )
    begin = time.perf_counter()
    while engine.pending:
        engine.advance()
    wide = [alive for width, alive in steps if width == args.slots]
    tokens = sum(lengths)
    report = {
        "args": vars(args),
        "useful_tokens": tokens,
        "steps": len(steps),
        "wide_steps": len(wide),
        "narrow_steps": len(steps) - len(wide),
        "fewest_steps": -(-tokens // args.slots),  # every step full
        "wide_occupancy": round(sum(wide) / (args.slots * len(wide)), 3),
        # how many of the wide steps a narrower width would have held: what adding that width could save
        "wide_steps_holding_at_most": {n: sum(alive <= n for alive in wide) for n in HOLDING},
        "decoding_slot_steps": sum(alive for _, alive in steps),
        "prefill_calls": len(prefills),
        "prefill_positions": sum(prefills),
        "preempted": engine.preempted,
        "advances": engine.advances,
        "cpu_s": round(time.perf_counter() - begin, 1),
        "per_step": [list(s) for s in steps],  # (width, slots decoding), in order
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
