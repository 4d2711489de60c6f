"""The engine's packed prefill alone, eager against its compiled layer (`prefill_layer_for` in
model/engine/model_runner.py), on a Vicuna-7B-shaped Llama with random bf16 weights: device time a prompt position
(CUDA events around each call, after warm-up calls) for a call of long prompts (96 of 170 positions) and one of varied
prompts (16-210), the seconds the compiled layer's build took (a fresh machine's first process compiles it cold; a
second process loads it from the compile cache), and how far the compiled logits are from the eager ones.

    PYTHONPATH=. python3 benchmarks/profiling/prefill_speed.py OUT.json [--repeats 5]
    PYTHONPATH=. python3 benchmarks/profiling/prefill_speed.py OUT.json --tiny  # the CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from functools import partial

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import LLAMA_TINY, VICUNA_7B
from model.engine import model_runner
from model.engine.compile_cache import compile_cache_dir
from model.engine.kv_cache import PagedKV, slot_attention_on
from model.engine.model_runner import packed_prefill, prefill_layer


def timed(run, repeats: int, cuda: bool) -> list[float]:
    """Seconds of each of `repeats` calls of `run` (after two untimed ones)."""
    for _ in range(2):
        run()
    out = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            run()
            out.append(time.perf_counter() - begin)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda = not args.tiny
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))  # where `dr infer` keeps it
    config = LlamaConfig(**(VICUNA_7B if cuda else {**LLAMA_TINY, "vocab_size": 300}))
    with torch.device(device):
        lm = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    draw = random.Random(0)
    calls = {"long": [170] * 96, "varied": [draw.randint(16, 210) for _ in range(140)]}
    if args.tiny:
        calls = {name: sizes[:8] for name, sizes in calls.items()}
    block, per_row = 64, 4
    kv = PagedKV(config, 160, per_row, 160 * per_row + 1, dtype, device, "flex" if cuda else "sdpa", block)
    flops = 2 * sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "gflop_a_position": round(flops / 1e9, 2),
        "calls": {},
    }
    with slot_attention_on(lm), torch.inference_mode():
        model_runner.COMPILE_PREFILL = True
        begin = time.perf_counter()
        compiled = model_runner.prefill_layer_for(lm, kv, True)
        if cuda:
            torch.cuda.synchronize()
        report["compiled_layer_build_s"] = round(time.perf_counter() - begin, 2)
        for name, sizes in calls.items():
            slots = list(range(len(sizes)))
            for s, n in zip(slots, sizes, strict=True):
                assert kv.book.grow(s, n)
            kv.sync()
            index = kv.book.prefill_index(slots, sizes, max(sizes))
            embeds = torch.randn(len(sizes), max(sizes), config.hidden_size, device=device, dtype=dtype)
            result = {"rows": len(sizes), "positions": sum(sizes)}
            logits = {}
            for label, layer in (("eager", prefill_layer), ("compiled", compiled)):
                run = partial(packed_prefill, lm, kv, embeds, index, sizes, layer)
                seconds = timed(run, args.repeats, cuda)
                logits[label] = run().float()
                best = min(seconds)
                result[label] = {
                    "seconds": [round(s, 4) for s in seconds],
                    "us_a_position": round(best / sum(sizes) * 1e6, 2),
                    "tflops": round(flops * sum(sizes) / best / 1e12, 1),
                }
            result["compiled_over_eager"] = round(
                result["eager"]["us_a_position"] / result["compiled"]["us_a_position"], 3
            )
            result["logits_max_abs_difference"] = round(float((logits["eager"] - logits["compiled"]).abs().max()), 4)
            result["same_next_tokens"] = float(
                (logits["eager"].argmax(-1) == logits["compiled"].argmax(-1)).float().mean()
            )
            report["calls"][name] = result
            for s in slots:
                kv.book.release(s)
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
