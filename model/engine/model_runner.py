"""The engine's decode step: one token for each of the first `width` slots, through one compiled decoder layer that
serves every layer, the whole step replayed on CUDA as one CUDA graph per width; and its packed prefill, through the
eager layers or (COMPILE_PREFILL) one compiled decoder layer at any number of positions. The step runs the layer of
fused_layer.py (transformers' arithmetic with the q/k/v and gate/up projections each one matrix product); the prefill
runs transformers' layer, whose trace with the positions symbolic took Dynamo 1.07 s on a CPU against 2.1-2.5 s for
the fused layer's, for matrix products that at hundreds of positions gain nothing from being joined
(benchmarks/results/2026-12-06-cpu-fused-layer-trace/).

Compiling the whole step made Dynamo trace all 32 layers of a 7B model, 10-13 s of every process's start on an H200
(benchmarks/README.md, run 5), although the layers are the same code on same-shaped weights. Dynamo lifts a module's
parameters as inputs and guards on what its code reads, not on which layer it is, so a layer traced and compiled once
runs them all; the Python loop over the layers and the eager embedding, rotary and sampling glue cost launches that the
graph replay removes. A narrower width then costs one more trace of one layer, which is what lets the engine run a
job's last few rows at a width that fits them (model/engine/scheduler.py). Each compiled function is kept whole on
disk after its first compile (compile_cache.py `Precompiled`), so a later process loads it without that trace.

The prefill's layer is compiled the same way, with the number of positions symbolic (one trace for every prefill).
Eager, a prefill ran at 29-31 us a position on an H100, about 440 TFLOP/s for 13 GFLOP a position, where its matrix
products alone run near 600: the rest is the norms, rotary embeddings, activation and residual adds, each a kernel of
its own reading and writing every position; compiled, they fuse (21.5-22.1 us a position). Its build costs a process
a few seconds, which a job with short prompts does not win back (COMPILE_PREFILL_POSITIONS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

import torch

from model.engine import cuda_graphs
from model.engine.compile_cache import Precompiled
from model.engine.fused_layer import Fused, fused_weights, run_layer
from model.engine.kv_cache import PREFILL, LayerPrefill, LayerSlots, PagedKV
from model.engine.slot_state import SlotState, choose, ended
from model.io.transfer import to_device

# False: no engine's packed prefills run the compiled layer (prefill_layer_for), as before 2026-12-06. On an H100 the
# compiled layer ran a prefill at 21.5-22.1 us a position against 28.9-29.8 eager, 1.32-1.35x, and the engine alone
# 5-12% faster (benchmarks/results/2026-12-06-h100-compiled-prefill/)
COMPILE_PREFILL = True
# a job compiles the prefill's layer when its prompts hold at least this many positions: at 7.5 us a position saved,
# the layer's build is won back. The build delayed a warm H100 process's first rows by 6.9 s (16.6 s against 9.7,
# the decoding processes busy beside it; benchmarks/results/2026-12-06-h100-fresh-jobs/, a layer whose trace took
# Dynamo twice as long as this one's; 5.1 s alone in .../2026-12-06-h100-compiled-prefill/): 680,000-920,000 positions.
# MusicCaps- and catalog-sized jobs (100,000-130,000 positions) stay eager
COMPILE_PREFILL_POSITIONS = 1_000_000


def job_compiles_prefill(positions: int) -> bool | None:
    """A job's `compile_prefill` for the engine (scheduler.py) from its prompts' positions: None (the engine's
    default, compiled where its step is) from COMPILE_PREFILL_POSITIONS on, else False."""
    return None if positions >= COMPILE_PREFILL_POSITIONS else False


def decode_layer(
    layer: torch.nn.Module, fused: Fused | None, hidden: torch.Tensor, cos, sin, slots: LayerSlots
) -> torch.Tensor:
    """The decoder layer (fused_layer.py) over one new token per slot [width, 1, hidden]; it attends through
    model.engine.kv_cache.slot_attention, which finds the layer's slots in its keyword arguments."""
    return run_layer(layer, fused, hidden, cos, sin, slots=slots)


def prefill_layer(layer: torch.nn.Module, hidden: torch.Tensor, cos, sin, packed: LayerPrefill) -> torch.Tensor:
    """transformers' decoder layer over prompts packed end to end [1, T, hidden]; it attends through
    model.engine.kv_cache.slot_attention, which finds the layer's pools in its keyword arguments."""
    return layer(hidden, position_embeddings=(cos, sin), packed=packed)


def prefill_pass(
    lm: torch.nn.Module, kv: PagedKV, embeds: torch.Tensor, index: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """`lm` over right-padded prompts [R, L, H], their keys and values written at the pool positions `index` [R, L]
    of `kv`: the logits at each row's `last` column [R, vocab]."""
    positions = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
    hidden = lm.model(
        inputs_embeds=embeds, position_ids=positions, attention_mask=PREFILL, use_cache=False, kv=kv, kv_index=index
    ).last_hidden_state
    return lm.lm_head(hidden[torch.arange(embeds.shape[0], device=embeds.device), last])


def packed_prefill(
    lm: torch.nn.Module,
    kv: PagedKV,
    embeds: torch.Tensor,
    index: torch.Tensor,
    sizes: Sequence[int],
    layer: Callable[..., torch.Tensor] = prefill_layer,
) -> torch.Tensor:
    """`prefill_pass` without the padding: right-padded prompts [R, L, H] (row r's first sizes[r] columns real) and
    their pool positions `index` [R, L] on the host go through `lm` end to end as one sequence of sum(sizes)
    positions, each prompt attending causally to itself alone (kv_cache.packed_attention), each decoder layer run by
    `layer` (prefill_layer, or it compiled). A call whose prompts differ in length computes no padding: a varied job's
    calls of 64 padded rows ran 84% more positions than its prompts held
    (benchmarks/results/2026-12-05-h100-engine-phases/). Built from host lengths, so nothing here waits for the
    device."""
    rows, width = index.shape
    real = torch.arange(width) < torch.tensor(sizes).unsqueeze(-1)
    flat = (torch.arange(rows).unsqueeze(-1) * width + torch.arange(width))[real]
    starts = torch.tensor([0, *accumulate(sizes)])
    total = len(flat)
    columns = torch.arange(width).expand(rows, -1)[real]
    moved = to_device(torch.cat([flat, columns, index[real], starts]), kv.device)  # one queued copy
    flat, columns, at, starts = moved.split([total, total, total, rows + 1])
    model = lm.model
    hidden = embeds.flatten(0, 1)[flat].unsqueeze(0)
    cos, sin = model.rotary_emb(hidden, columns.unsqueeze(0))
    for block, packed in zip(model.layers, kv.packed_inputs(at, starts, max(sizes)), strict=True):
        hidden = layer(block, hidden, cos, sin, packed)
    return lm.lm_head(model.norm(hidden[0, starts[1:] - 1]))


def prefill_layer_for(lm: torch.nn.Module, kv: PagedKV, compiled: bool) -> Callable[..., torch.Tensor]:
    """`prefill_layer`, or for a `compiled` engine (COMPILE_PREFILL) it compiled with the number of positions symbolic,
    compiled now, or its stored form loaded (compile_cache.Precompiled), through two short prompts of zero embeddings
    written at the pool's first positions and zeroed again after, rather than at a job's or a server's first large
    prefill."""
    if not (compiled and COMPILE_PREFILL):
        return prefill_layer
    layer = Precompiled(prefill_layer, dynamic=True)
    sizes = [13, 11]  # equal sizes would share one symbol in the trace (heads, head_dim, rows: 32, 128, 3 on a 7B)
    index = torch.arange(len(sizes) * max(sizes)).view(len(sizes), max(sizes))  # [rows, columns] -> pool position
    embeds = torch.zeros(len(sizes), max(sizes), lm.config.hidden_size, dtype=kv.keys[0].dtype, device=kv.device)
    packed_prefill(lm, kv, embeds, index, sizes, layer)
    for pool in (*kv.keys, *kv.values):
        pool[:, :, : index.numel()].zero_()
    return layer


class SlotStep:
    def __init__(
        self,
        lm: torch.nn.Module,
        kv: PagedKV,
        state: SlotState,
        eos: int,
        stops: list[torch.Tensor],
        k_cap: int,
        widths: Sequence[int],
        compiled: bool,
        graphs: bool,
    ) -> None:
        """A step per width in `widths` over `lm` (a transformers LLaMA causal LM) and the engine's slots. `compiled`:
        the layer and the step's end go through torch.compile, a compiled form of each per width, stored for the next
        process (compile_cache.Precompiled; static shapes only: with automatic dynamic shapes a third slot count
        compiled a symbolic-slot step whose answers were wrong,
        benchmarks/results/2026-12-02-h200-engine-run5-prefill-graphs/engine_sequence_wrong_answers_h200.log).
        Each layer runs with its projections joined (fused_layer.fused_weights; the model's weights become views).
        `graphs`: each width's step is captured as a CUDA graph now, while every slot is still free (the capture runs
        the step three times)."""
        self.lm, self.kv, self.fused = lm, kv, fused_weights(lm)
        self.eos, self.stops, self.k_cap = eos, stops, k_cap
        self.views = {w: state.head(w) for w in widths}
        # one compiled form per width (static shapes): each stored on disk for the next process (compile_cache.py)
        self.layers = {w: Precompiled(decode_layer, dynamic=False) if compiled else decode_layer for w in widths}
        self.finishes = {w: Precompiled(finish_step, dynamic=False) if compiled else finish_step for w in widths}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if graphs:
            device = state.out.device
            for w in widths:
                self.graphs[w], _ = cuda_graphs.capture(
                    lambda w=w: self._run(w), torch.cuda.graph_pool_handle(), device
                )

    def __call__(self, width: int) -> None:
        """One decode step of the first `width` slots (dead slots run along and change nothing)."""
        graph = self.graphs.get(width)
        if graph is None:
            self._run(width)
        else:
            graph.replay()

    def _run(self, width: int) -> None:
        state, model = self.views[width], self.lm.model
        alive = ~state.done
        hidden = model.embed_tokens(state.last.unsqueeze(-1))
        cos, sin = model.rotary_emb(hidden, self.kv.pos[:width].unsqueeze(-1))
        layer_step = self.layers[width]
        for layer, fused, slots in zip(model.layers, self.fused, self.kv.step_inputs(width, alive), strict=True):
            hidden = layer_step(layer, fused, hidden, cos, sin, slots)
        self.finishes[width](self.lm, hidden, state, self.kv.pos[:width], alive, self.eos, self.stops, self.k_cap)


def finish_step(
    lm: torch.nn.Module,
    hidden: torch.Tensor,
    state: SlotState,
    pos: torch.Tensor,
    alive: torch.Tensor,
    eos: int,
    stops: list[torch.Tensor],
    k_cap: int,
) -> None:
    """A decode step's end: the logits of each slot's new position, its next token, and the slot's state advanced
    (alive slots). A function of its arguments alone, so that its compiled form can be stored (compile_cache.py)."""
    logits = lm.lm_head(lm.model.norm(hidden[:, -1]))
    rows = torch.arange(logits.shape[0], device=logits.device)
    token = choose(state, logits, rows, state.count, k_cap)
    column = state.count.clamp(max=state.out.shape[1] - 1)
    state.out[rows, column] = torch.where(alive, token, state.out[rows, column])
    state.last.copy_(torch.where(alive, token, state.last))
    state.count.add_(alive.long())
    pos.add_(alive.long())
    state.done.copy_(state.done | ended(state, eos, stops))
