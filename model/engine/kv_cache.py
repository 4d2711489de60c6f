"""The paged keys and values of the continuous-batching engine, and the attention that reads them.

Every layer's keys (and values) are one pool [1, heads, blocks x block, head_dim]; a slot's row lives in the blocks its
row of the block table names (model/engine/block_pool.py keeps the table on the host; `sync` copies it here), so its
column c is at position table[c // block] x block + c % block. Rows of different lengths share one decode step: every
slot writes its new key at its own column and attends to columns 0..pos. The attention is plugged into the transformers
model as an attention implementation ("dr_slots") that takes the cache through the forward's keyword arguments (a
prefill: this object; a decode step: one layer's LayerSlots), so the model code is transformers' own.

Two kernels read the cache: "flex" (FlexAttention over the whole pool with a paged block mask: each row reads its own
blocks only, found through the table, so a step reads each row's live keys and nothing else; the mask is evaluated
on a partly filled last block only) and "sdpa" (each row's
blocks gathered into a dense tensor with a boolean mask: every backend, a reference for the paged one).

Blocks are zeroed when freed and the scratch block only ever receives zeros: a block a row reads holds its own keys
or zeros, and masked weight 0 x a non-finite value left by an earlier row (whose inputs were not finite) would be NaN.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention
from transformers import AttentionInterface

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.9: the masked SDPA serves
    varlen_attn = None

from model.engine.block_pool import BlockPool
from model.io.transfer import to_device

Kernel = Literal["sdpa", "flex"]
# varlen_attn's arguments, read once here rather than in the compiled prefill: torch 2.9-2.11 took is_causal and no
# scale, later versions a window and a scale
_VARLEN_PARAMS = inspect.signature(varlen_attn).parameters if varlen_attn is not None else {}
VARLEN_IS_CAUSAL, VARLEN_SCALE = "is_causal" in _VARLEN_PARAMS, "scale" in _VARLEN_PARAMS
# positions per cache block, FlexAttention's key block: a row reads its last block whole, so 32 reads at most 31 unused
# positions where 64 read 63 (the engine alone at 512 slots on an H100: 15,845 / 7,926 / 10,407 useful tok/s on
# short / long / varied prompts against 14,956 / 7,462 / 10,010, and the long rows' pool preempted 35 rows against
# 94; benchmarks/results/2026-12-07-h100-job-order-block32/)
BLOCK = 32
IMPLEMENTATION = "dr_slots"


def kv_heads(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a transformers LLaMA config."""
    heads = config.num_key_value_heads or config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def bytes_per_position(config, dtype: torch.dtype) -> int:
    """Cache bytes of one position of one row: a key and a value in every layer."""
    heads, head_dim = kv_heads(config)
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize


def int32_position_limit(config) -> int:
    """Pool positions whose one-layer cache stays under 2**31 elements: compiled kernels then index it with int32
    (torch 2.11's FlexAttention kernel fails to compile with the int64 indexing a larger tensor needs)."""
    heads, head_dim = kv_heads(config)
    return (2**31 - 1) // (heads * head_dim)


class FlexBlocks(NamedTuple):
    """The blocks a decode step's FlexAttention reads for each of n slots, as its block mask takes them: the blocks
    wholly before the slot's position (`full` [n, 1, 1], the first of its table row), read without a mask, and the
    block holding its last columns, if it is partly filled (`partial` [n, 1, 1], 0 or 1), masked to those columns;
    `partial_index` [n, 1, 1, per_row] names that block first. A finished or free slot reads none."""

    partial: torch.Tensor
    partial_index: torch.Tensor
    full: torch.Tensor


class LayerSlots(NamedTuple):
    """What one layer's decode step over the first n slots reads and writes: the layer's pools `keys` and `values`
    [1, heads, positions, dim] of blocks of `block` positions, each slot's next column `pos` [n] and the pool position
    it writes there `write` [n] (the scratch block for a dead slot), which slots decode `alive` [n], their block table
    rows `table` [n, per_row], each block's holder `owner` and place in its row `place` [blocks], and what each slot
    may see: `visible`, an SDPA mask over its gathered columns
    [n, 1, 1, per_row x block] (bool), or FlexAttention's blocks (FlexBlocks)."""

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    write: torch.Tensor
    alive: torch.Tensor
    table: torch.Tensor
    owner: torch.Tensor
    place: torch.Tensor
    visible: torch.Tensor | FlexBlocks
    block: int


class LayerPrefill(NamedTuple):
    """What one layer's packed prefill writes and reads: the layer's pools `keys` and `values` [1, heads, positions,
    dim], the pool position of each packed prompt position `index` [T], where each prompt starts `starts` [R + 1]
    and the longest prompt's length `longest`. The layer's index is not in it: nothing a compiled layer reads tells
    the layers apart, so one trace serves them all (model/engine/model_runner.py)."""

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    starts: torch.Tensor
    longest: int


class PagedKV:
    """Per layer a pool of `blocks` blocks of `block` positions; `pos[s]` is the column slot s writes next."""

    def __init__(
        self,
        config,
        slots: int,
        per_row: int,
        blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        kernel: Kernel,
        block: int = BLOCK,
    ) -> None:
        heads, head_dim = kv_heads(config)
        shape = (1, heads, blocks * block, head_dim)
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.book = BlockPool(blocks, slots, per_row, block)
        self.table = self.book.table.to(device)
        self.owner, self.place = self.book.owner.to(device), self.book.place.to(device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.slots, self.per_row, self.block, self.kernel = slots, per_row, block, kernel
        self.columns = torch.arange(per_row * block, device=device)
        self.order = torch.arange(per_row, device=device)

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def sync(self) -> None:
        """Brings the device up to the host's book, queued behind the work already launched: freed blocks zeroed (no
        step queued later reads or writes them for their old row), then the table and the holders copied."""
        book = self.book
        if book.released:
            index = to_device(torch.tensor(book.released), self.device)
            for pool in (*self.keys, *self.values):
                heads, _, dim = pool.shape[1:]
                pool.view(heads, book.blocks, self.block, dim).index_fill_(1, index, 0)
            book.released = []
        if book.changed:
            for mine, theirs in ((self.table, book.table), (self.owner, book.owner), (self.place, book.place)):
                mine.copy_(to_device(theirs, self.device))
            book.changed = False

    def step_inputs(self, width: int, alive: torch.Tensor) -> list[LayerSlots]:
        """Each layer's view of the first `width` slots for a decode step (`alive` [width]: the slots decoding). SDPA
        sees columns 0..pos (its prompt, its answer so far and the new key, written first); Flex reads the blocks
        holding columns 0..pos-1 of the alive slots only, all but a partly filled last one without a mask (the mask
        is evaluated at every position of a block it applies to), and `decode_attention` merges the new key in. Built
        once a step, shared by the layers."""
        pos, table = self.pos[:width], self.table[:width]
        held = (pos // self.block).clamp(max=self.per_row - 1)
        write = table.gather(1, held.unsqueeze(-1)).squeeze(-1).long() * self.block + pos % self.block
        if self.kernel == "sdpa":
            visible = (self.columns <= pos.unsqueeze(-1))[:, None, None, :]
        else:
            partial = (alive & (pos % self.block != 0)).to(torch.int32).view(-1, 1, 1)
            full = torch.where(alive, pos // self.block, 0).to(torch.int32).view(-1, 1, 1)
            first = table.gather(1, (held.unsqueeze(-1) + self.order) % self.per_row)  # the partial block in front
            visible = FlexBlocks(partial, first.view(width, 1, 1, -1), full)
        return [
            LayerSlots(k, v, pos, write, alive, table, self.owner, self.place, visible, self.block)
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def packed_inputs(self, index: torch.Tensor, starts: torch.Tensor, longest: int) -> list[LayerPrefill]:
        """Each layer's view of a packed prefill (prompts end to end, row r in columns starts[r]:starts[r + 1], written
        at the pool positions `index` [T])."""
        return [LayerPrefill(k, v, index, starts, longest) for k, v in zip(self.keys, self.values, strict=True)]

    def prefill(self, layer: int, index: torch.Tensor, q, k, v, scaling: float) -> torch.Tensor:
        """Right-padded prompts [R, heads, L, dim]: keys and values stored at the pool positions `index` [R, L]
        (model/engine/block_pool.py: prefill_index; padding columns point into the scratch block, where zeros are
        written), causal attention over the prompt itself (a real query never sees a padded key: pads come after it).
        """
        real = (index >= self.block).unsqueeze(1).unsqueeze(-1)  # [R, 1, L, 1]: not the scratch block
        flat = index.flatten()
        for pool, new in ((self.keys[layer], k), (self.values[layer], v)):
            pool[0][:, flat] = torch.where(real, new, 0).transpose(0, 1).flatten(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)

    def move(self, src: list[int], dst: list[int]) -> None:
        """The rows of slots `src` now in slots `dst` (their blocks and position; no key is copied): how the engine
        gathers its last rows into the first slots, where a narrower step runs."""
        self.book.move(src, dst)
        s, d = (to_device(torch.tensor(x), self.device) for x in (src, dst))
        self.pos[d] = self.pos[s]


def packed_attention(q, k, v, starts: torch.Tensor, longest: int, scaling: float) -> torch.Tensor:
    """Causal attention within each of the prompts packed in q, k, v [T, heads, dim] (row r in starts[r]:starts[r + 1]):
    torch's variable-length flash attention where it runs (CUDA, half precision), else SDPA with the equivalent
    block-diagonal causal mask [T, T] (the CPU, fp32 on a GPU; exact, and a prompt's T is small there)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_attn is not None:
        cu = starts.to(torch.int32)
        causal = {"is_causal": True} if VARLEN_IS_CAUSAL else {"window_size": (-1, 0)}
        if VARLEN_SCALE:
            causal["scale"] = scaling
        elif abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
            raise ValueError(f"this torch's varlen_attn has no scale argument; the model attends at scale {scaling}")
        return varlen_attn(q, k, v, cu, cu, longest, longest, **causal)
    total = q.shape[0]
    row = torch.searchsorted(starts, torch.arange(total, device=q.device), right=True)  # each position's row, + 1
    column = torch.arange(total, device=q.device)
    mask = (row.unsqueeze(-1) == row) & (column <= column.unsqueeze(-1))
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask, scale=scaling)
    return out.transpose(0, 1)


def store(keys: torch.Tensor, values: torch.Tensor, at: torch.Tensor, new_k, new_v) -> None:
    """New keys and values [n, heads, dim] into the pools [1, heads, positions, dim] at the positions `at` [n],
    written by index on the pools themselves, not through the view keys[0]: compiled, a write through a view of a
    graph input copies the whole input (the pool, every layer, every step: 147 ms against 0.03 ms for a 256 MB pool
    on a CPU), where a write to the input is done in place."""
    first = torch.zeros_like(at)
    keys[first, :, at] = new_k
    values[first, :, at] = new_v


def packed_prefill_attention(packed: LayerPrefill, q, k, v, scaling: float) -> torch.Tensor:
    """Packed prompts [1, heads, T, dim]: their keys and values written at `packed.index`, each prompt attending
    causally to itself."""
    store(packed.keys, packed.values, packed.index, k[0].transpose(0, 1), v[0].transpose(0, 1))
    out = packed_attention(*(x[0].transpose(0, 1) for x in (q, k, v)), packed.starts, packed.longest, scaling)
    return out.transpose(0, 1).unsqueeze(0)


def paged_block_mask(slots: LayerSlots) -> BlockMask:
    """FlexAttention's mask for a decode step over the slots' cached columns 0..pos-1 (FlexBlocks says which blocks
    are read, and which of them masked)."""
    _, _, pos, _, _, table, owner, place, visible, block = slots

    def mask_mod(b, h, q_idx, kv):  # the whole rule (FlexAttention's eager path applies it everywhere)
        held = kv // block
        return (owner[held] == b) & (place[held] * block + kv % block < pos[b])

    # no query blocks: they serve only the backward pass, and building them makes a dense map of every row against
    # every block of the pool, each layer of each step
    return BlockMask.from_kv_blocks(
        visible.partial,
        visible.partial_index,
        visible.full,
        table.view(table.shape[0], 1, 1, -1),
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(1, slots.keys.shape[2]),
        compute_q_blocks=False,
    )


def decode_attention(slots: LayerSlots, q, k, v, scaling: float) -> torch.Tensor:
    """One new token per slot [n, heads, 1, dim]: its key and value written at `write`, attention over the row."""
    keys, values, _, write, alive, table, _, _, visible, block = slots
    new_k = torch.where(alive[:, None, None], k[:, :, 0], 0)  # [n, heads, dim]
    new_v = torch.where(alive[:, None, None], v[:, :, 0], 0)
    heads, dim = keys.shape[1], keys.shape[3]
    if not isinstance(visible, FlexBlocks):
        store(keys, values, write, new_k, new_v)
        rows = table.long()
        dense_k = keys[0].view(heads, -1, block, dim)[:, rows].flatten(2, 3).transpose(0, 1)  # [n, heads, columns, dim]
        dense_v = values[0].view(heads, -1, block, dim)[:, rows].flatten(2, 3).transpose(0, 1)
        return F.scaled_dot_product_attention(q, dense_k, dense_v, attn_mask=visible, scale=scaling)

    mask = paged_block_mask(slots)
    # compiled FlexAttention reads a cache written earlier in the same graph as it was before the write (seen with
    # torch 2.14): attend to the earlier columns, then merge the new key by its log-sum-exp. The log-sum-exp comes
    # through return_aux: the older return_lse flag records a warning in a module-level set, which Dynamo guards on,
    # so the layer would be traced and compiled twice
    past, aux = flex_attention(q, keys, values, block_mask=mask, scale=scaling, return_aux=AuxRequest(lse=True))
    lse = aux.lse
    new = (q.float() * k.float()).sum(-1) * scaling  # [n, heads, 1]
    top = torch.maximum(lse, new)
    w_past, w_new = torch.exp(lse - top).unsqueeze(-1), torch.exp(new - top).unsqueeze(-1)
    store(keys, values, write, new_k, new_v)
    return ((w_past * past.float() + w_new * v.float()) / (w_past + w_new)).to(q.dtype)


# Handed to the model as the prefill's attention mask: any 4-D mask makes transformers pass it through instead of
# building one (and detecting packed sequences from the position ids, a few ops per call); the prefill attends causally.
PREFILL = torch.empty(0, 0, 0, 0, dtype=torch.bool)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature. Decoding, the layer's slots come in `kwargs["slots"]` (a
    LayerSlots), and a packed prefill's pools and prompts in `kwargs["packed"]` (a LayerPrefill): nothing here reads
    the layer's index, so one compiled layer serves them all. A padded prefill (prefill_graphs.py) passes the cache in
    `kwargs["kv"]` and the pool positions the prompts go to in `kwargs["kv_index"]`."""
    if "slots" in kwargs:
        out = decode_attention(kwargs["slots"], query, key, value, scaling)
    elif "packed" in kwargs:
        out = packed_prefill_attention(kwargs["packed"], query, key, value, scaling)
    else:
        out = kwargs["kv"].prefill(module.layer_idx, kwargs["kv_index"], query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, slot_attention)


@contextmanager
def slot_attention_on(llm: torch.nn.Module):
    """The model's layers attend through PagedKV inside the block (its other users keep their implementation).
    `llm`: a transformers model, or a PeftModel around one. A switch visits every module (about 1.5 ms for a 32-layer
    LoRA model on a CPU), so a nested block switches nothing."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    saved = base.config._attn_implementation
    if saved == IMPLEMENTATION:
        yield
        return
    base.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        base.set_attn_implementation(saved)
