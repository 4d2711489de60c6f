"""The encoder's calls replayed as CUDA graphs, one a (kind, size, input shape).

A job's loader queues each ImageBind call through Python, 665 kernels for a call of wavs and 1,554 for images or
videos (counted with a dispatch mode on ImageBind-huge), on a thread that shares the job's interpreter lock with the
engine's loop: a catalog-shaped job's calls took 106 ms of host time each on an H100
(benchmarks/results/2026-12-07-h100-queue-ahead/). A replay launches all of a call's kernels at once. A call's files
are padded with zeros up to the next of SIZES (their features dropped: ImageBind computes each file apart), so a kind
needs a few graphs; they share one memory pool, being replayed one at a time on the loader's stream with each call's
features copied out before the next replay (model/media/encoding.py).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch

from model.io import cuda_graphs
from model.media.encoder import CALL_FILES, MediaEncoder

SIZES = (8, 16, 32, 64)  # files a graph takes, at most the kind's CALL_FILES


def padded(files: int, most: int) -> int:
    """The size a call of `files` files replays at: the smallest of SIZES that holds it, else `most` (its kind's
    CALL_FILES, which no call exceeds)."""
    return next((size for size in SIZES if files <= size <= most), most)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # [size, ...] on the device: what a replay reads
    features: torch.Tensor  # [size, k, D]: what a replay writes


class EncoderGraphs:
    """One encoder's graphs, captured at a call of a (kind, size, input shape) first met and replayed for each call
    after. Captured again after the encoder's tensors move (`.to`, `.half`: a graph reads them where they were)."""

    def __init__(self, encoder: MediaEncoder) -> None:
        self.encoder = weakref.ref(encoder)  # not a strong one: the encoder keys these graphs in `_graphs`
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, Captured] = {}
        self.placed = self._placement()

    def _placement(self) -> tuple[int, ...]:
        encoder = self.encoder()
        return tuple(t.data_ptr() for t in itertools.chain(encoder.parameters(), encoder.buffers()))

    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """`encoder.embed(modality, inputs)` as a graph's replay, on the current stream: [B, k, D] features, a view of
        the graph's output, which its next replay overwrites (the caller copies them out first, on this stream)."""
        if self._placement() != self.placed:
            self.graphs.clear()
            self.pool, self.placed = torch.cuda.graph_pool_handle(), self._placement()
        files = inputs.shape[0]
        size = padded(files, CALL_FILES[modality])
        key = (modality, size, tuple(inputs.shape[1:]), inputs.dtype)
        captured = self.graphs.get(key)
        if captured is None:
            static = torch.zeros((size, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
            run = self.encoder().embed
            graph, out = cuda_graphs.capture(lambda: run(modality, static), self.pool, inputs.device)
            captured = self.graphs[key] = Captured(graph, static, out)
        captured.inputs[:files].copy_(inputs)
        captured.inputs[files:].zero_()
        captured.graph.replay()
        return captured.features[:files]


_graphs: weakref.WeakKeyDictionary[MediaEncoder, EncoderGraphs] = weakref.WeakKeyDictionary()


def graphs_of(encoder: MediaEncoder) -> EncoderGraphs:
    """The encoder's graphs, kept until `drop_graphs` or the encoder's end."""
    if encoder not in _graphs:
        _graphs[encoder] = EncoderGraphs(encoder)
    return _graphs[encoder]


def drop_graphs(encoder: MediaEncoder | None) -> None:
    """The encoder's graphs and their memory pool released (a job's end): the next job's engine is sized on the free
    memory, and a pool smaller by the graphs' memory would compile its step anew (model/engine/sizing.py)."""
    if encoder is not None:
        _graphs.pop(encoder, None)
