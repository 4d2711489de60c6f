"""Batch order for training: the original's dataset mixing, grouped by length, deterministic and resumable.

The original (`DistributedMultiDatasetBatchSampler`) draws every batch from a single dataset and visits the datasets
round-robin; an epoch is `ceil(largest / batch)` rounds, so smaller datasets are reshuffled and repeated until the
largest one has been seen once. A global batch (micro-batch x world size) is drawn, then each rank takes its slice.

Here the same order is built from (seed, epoch) alone, so a resumed run replays it exactly; within each pass over a
dataset, rows are sorted by length inside shuffled windows of `group_size` batches (padding waste drops, the batch
order stays random).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _mix(*values: int) -> int:
    """A stable 63-bit seed from several integers (the same in every process and Python version)."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + v) & 0x7FFF_FFFF_FFFF_FFFF
    return out


class MixedBatchSampler:
    def __init__(
        self,
        lengths: Sequence[Sequence[int]],
        batch_size: int,
        seed: int = 12,
        rank: int = 0,
        world_size: int = 1,
        group_size: int = 16,
    ) -> None:
        """`lengths[d][i]` is the token length of row i of dataset d; `batch_size` is the global batch."""
        if not lengths or any(len(d) == 0 for d in lengths):
            raise ValueError("every dataset needs at least one row")
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by world size {world_size}")
        self.lengths = [torch.as_tensor(d) for d in lengths]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.group_size = group_size
        self.offsets = [0]
        for d in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        """Batches per epoch (per rank: every rank takes a slice of each global batch)."""
        return len(self.lengths) * math.ceil(max(len(d) for d in self.lengths) / self.batch_size)

    def _pass(self, dataset: int, epoch: int, cycle: int) -> list[list[int]]:
        """One shuffled pass over a dataset as global batches (the last partial batch dropped, as the original)."""
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, dataset, cycle))
        n = len(self.lengths[dataset])
        perm = torch.randperm(n, generator=g)
        if n < self.batch_size:  # too small for one batch: wrap around instead of never yielding
            perm = perm.repeat(math.ceil(self.batch_size / n))[: self.batch_size]
        usable = len(perm) // self.batch_size * self.batch_size
        window = self.batch_size * self.group_size
        batches = []
        for start in range(0, usable, window):
            chunk = perm[start : min(start + window, usable)]
            chunk = chunk[torch.argsort(self.lengths[dataset][chunk], descending=True, stable=True)]
            batches.extend(chunk.view(-1, self.batch_size).tolist())
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of an epoch, as indices into the concatenation of the datasets."""
        rounds = math.ceil(max(len(d) for d in self.lengths) / self.batch_size)
        streams = []
        for d in range(len(self.lengths)):
            stream: list[list[int]] = []
            cycle = 0
            while len(stream) < rounds:
                stream.extend(self._pass(d, epoch, cycle))
                cycle += 1
            streams.append(stream)
        per_rank = self.batch_size // self.world_size
        lo = self.rank * per_rank
        out = []
        for r in range(rounds):
            for d, stream in enumerate(streams):
                out.append([self.offsets[d] + i for i in stream[r][lo : lo + per_rank]])
        return out
