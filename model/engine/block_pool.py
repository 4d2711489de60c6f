"""The host's book of the paged cache (vLLM's block manager): which blocks of the pool each slot's row holds, in
order, and which are free.

A slot reserving its longest possible row (the longest prompt and the whole token budget) keeps most of its memory
empty on real jobs, whose answers are mostly far shorter than their budget: on an H100 a 512-token job fitted 96 such
slots. Here a row holds the blocks its positions fill and takes one more when it grows past a block's end, so the rows
decoding together are bounded by the tokens they hold. The host decides every allocation (it knows each row's
position bound without reading the device) and the device copy of the table follows it (model/engine/kv_cache.py).

Block 0 is the scratch block: never given to a row, it is where dead slots and a prefill's padding write.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

SCRATCH = 0


class BlockPool:
    """`blocks` blocks of `block` positions (block 0 the scratch), for `slots` rows of at most `per_row` blocks."""

    def __init__(self, blocks: int, slots: int, per_row: int, block: int) -> None:
        if blocks < 2:
            raise ValueError(f"a pool needs the scratch block and one more, not {blocks}")
        self.block, self.per_row = block, per_row
        self.free: deque[int] = deque(range(1, blocks))
        self.table = torch.full((slots, per_row), SCRATCH, dtype=torch.int32)  # each slot's blocks, in column order
        self.held = [0] * slots
        # per block: the slot holding it (-1: none) and its place in that slot's row, what the attention's mask reads
        self.owner = torch.full((blocks,), -1, dtype=torch.int32)
        self.place = torch.zeros(blocks, dtype=torch.int32)
        self.released: list[int] = []  # freed since the device last synced: their contents are zeroed then
        self.changed = False

    @property
    def blocks(self) -> int:
        return self.owner.shape[0]

    @property
    def available(self) -> int:
        return len(self.free)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block)

    def grow(self, slot: int, positions: int) -> bool:
        """Gives `slot` the blocks its first `positions` positions need; False (and nothing given) if too few are
        free."""
        need = self.blocks_for(positions) - self.held[slot]
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for place in range(self.held[slot], self.held[slot] + need):
            b = self.free.popleft()
            self.table[slot, place] = b
            self.owner[b], self.place[b] = slot, place
        self.held[slot] += need
        self.changed = True
        return True

    def release(self, slot: int) -> None:
        """Returns `slot`'s blocks to the pool."""
        mine = self.table[slot, : self.held[slot]].tolist()
        self.free.extend(mine)
        self.released += mine
        self.owner[mine] = -1
        self.table[slot] = SCRATCH
        self.held[slot] = 0
        self.changed = True

    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Slot `src[i]`'s blocks now belong to the free slot `dst[i]`: a row changes slots without a copy."""
        for s, d in zip(src, dst, strict=True):
            self.table[d], self.held[d] = self.table[s], self.held[s]
            self.owner[self.table[d, : self.held[d]].long()] = d
            self.table[s], self.held[s] = SCRATCH, 0
        self.changed = True

    def prefill_index(self, slots: Sequence[int], sizes: Sequence[int], width: int) -> torch.Tensor:
        """[rows, width] cache positions a prefill writes: row r's columns 0..sizes[r]-1 in its slot's blocks, its
        padding columns in the scratch block."""
        columns = torch.arange(width)
        blocks = self.table[list(slots)][:, (columns // self.block).clamp(max=self.per_row - 1)].long()
        own = blocks * self.block + columns % self.block
        return torch.where(columns < torch.tensor(sizes).unsqueeze(-1), own, columns % self.block)
