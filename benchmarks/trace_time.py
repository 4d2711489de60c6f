"""How long Dynamo takes to trace the engine's decode step: the part of a second process's start-up that the compile
cache does not save (issue #12: 12-13 s of the 14-15 s on an H200 machine). The trace depends on the layer count,
not on the widths, so a 32-layer Llama of tiny widths on the CPU shows it; Dynamo runs alone (backend "eager").

`PYTHONPATH=. python benchmarks/trace_time.py` traces the step as shipped; `... trace_time.py nested` first wraps
each decoder layer's forward in `torch.compiler.nested_compile_region` (trace a repeated block once, reuse it);
`... trace_time.py sdpa` traces the step with the SDPA kernel instead of FlexAttention (the share of FlexAttention's
32 calls); `... trace_time.py toy` times the first two ways on 32 identical small blocks, where reuse has nothing in
its way.
"""

import sys
import time

import torch

from benchmarks.speed import _audio_rows, never_stopping_model
from model.config import LLAMA_TINY, GenerationConfig
from model.engine import Engine, Request, cache_length


def toy(nested: bool) -> float:
    """Seconds Dynamo takes over 32 identical blocks (10 norm-linear-SiLU-linear residuals each)."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.a, self.b = torch.nn.LayerNorm(64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(10):
                x = x + self.b(torch.nn.functional.silu(self.a(self.norm(x))))
            return x

    if nested:
        Block.forward = torch.compiler.nested_compile_region(Block.forward)
    blocks = torch.nn.Sequential(*(Block() for _ in range(32)))
    start = time.perf_counter()
    torch.compile(blocks, backend="eager", fullgraph=True)(torch.randn(4, 64))
    return time.perf_counter() - start


if sys.argv[1:] == ["toy"]:
    print(f"toy, 32 blocks: as they are {toy(False):.1f} s, in nested compile regions {toy(True):.1f} s")
    sys.exit()
nested, kernel = sys.argv[1:] == ["nested"], "sdpa" if sys.argv[1:] == ["sdpa"] else "flex"
model = never_stopping_model("/tmp/dr_trace_time", {**LLAMA_TINY, "num_hidden_layers": 32}, "cpu", vocab=512)
if nested:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    LlamaDecoderLayer.forward = torch.compiler.nested_compile_region(LlamaDecoderLayer.forward)
real_compile = torch.compile
torch.compile = lambda fn, mode=None, **options: real_compile(fn, backend="eager", **options)
examples = _audio_rows(4)
gen = GenerationConfig(max_new_tokens=8, do_sample=False)
engine = Engine(model, 4, cache_length(model.example_length(examples[0]), 8), 8, k_cap=1, kernel=kernel, compile=True)
engine.submit([Request(i, ex, gen, i) for i, ex in enumerate(examples)])
engine.advance()  # the first advance only prefills
start = time.perf_counter()
engine.advance()  # the first steps: Dynamo traces the step
way = "nested regions" if nested else f"as shipped, {kernel}"
print(f"{way}: first steps (the trace) {time.perf_counter() - start:.1f} s")
times = torch._dynamo.utils.compile_times(repr="csv")
for name, value in zip(*times, strict=True):
    if name in ("_compile.compile_inner", "bytecode_tracing", "get_fake_value", "build_guards"):
        print(f"  {name}: {value}")
