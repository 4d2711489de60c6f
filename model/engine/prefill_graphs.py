"""The engine's small prefills replayed as CUDA graphs, one per (rows, padded width), captured on first use.

A lone request (a server's single client, a one-slot engine) waits for its prefill before its first token, and an
eager 32-layer prefill spends about 30 ms launching kernels from Python (H200, one row: as much as six decode steps).
A captured graph launches in well under a millisecond. Large prefills stay eager: their launches queue behind the
decode steps already running, so they cost no wall time. torch.compile is not used here: its trace of the model adds
about 10 s to every process's start-up, while capturing an eager pass costs three of its runs per shape.

Rows are not padded (each row count up to GRAPH_ROWS has its own graphs); widths are padded to a multiple of
POSITION_STEP by the caller, whose write positions send the padding columns to the cache's scratch block
(model/engine/block_pool.py): a prompt's causal attention never looks right, so the padding changes no row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.engine import cuda_graphs

GRAPH_ROWS = 8  # prefills of at most this many rows replay a graph
POSITION_STEP = 64  # graphs' prompt widths are multiples of this

Pass = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (embeds, index, last) -> logits


@dataclass
class Captured:
    """One shape's static inputs, its graph (None where graphs are not captured) and the graph's output."""

    embeds: torch.Tensor  # [R, W, H]
    index: torch.Tensor  # [R, W], the cache positions each column writes
    last: torch.Tensor  # [R], the column of each row's last prompt position
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


def padded_width(width: int, length: int) -> int:
    """The positions a prefill of `width` runs at: up to a multiple of POSITION_STEP, at most the slot length."""
    return min(-(-width // POSITION_STEP) * POSITION_STEP, length)


class PrefillGraphs:
    """Runs `run` (the prefill's LLM pass, writing keys and values at the cache positions given) at padded widths,
    replaying a CUDA graph per shape when `capture`; otherwise the same padded pass runs eagerly (so CPU tests cover
    it)."""

    def __init__(self, run: Pass, capture: bool) -> None:
        self.run, self.capture = run, capture
        self.shapes: dict[tuple[int, int], Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, embeds: torch.Tensor, index: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits at each row's `last` column [rows, vocab], the rows' keys and values written at `index` [rows,
        padded_width(...)]. Columns past `embeds`' width are zeroed, not left as an earlier call's: padding from zero
        embeddings stays finite whatever rows came before."""
        rows, width = embeds.shape[:2]
        shape = tuple(index.shape)
        entry = self.shapes.get(shape)
        new = entry is None
        if new:
            entry = self.shapes[shape] = Captured(
                embeds.new_zeros(*shape, embeds.shape[-1]), torch.empty_like(index), torch.empty_like(last)
            )
        entry.embeds[:, :width].copy_(embeds)
        entry.embeds[:, width:].zero_()
        entry.index.copy_(index)
        entry.last.copy_(last)
        if not self.capture:
            return self.run(entry.embeds, entry.index, entry.last)
        if new:
            # the warm-up runs prefill the call's own rows into its own blocks, as the replay does again
            run = lambda: self.run(entry.embeds, entry.index, entry.last)  # noqa: E731
            entry.graph, entry.logits = cuda_graphs.capture(run, self.pool, embeds.device)
        entry.graph.replay()
        return entry.logits
