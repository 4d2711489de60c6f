"""Keys and values of a fixed number of slots, and the attention that reads them, for the continuous-batching engine.

Each slot holds one row: its prompt's keys and values at columns 0..P-1 and one more column per generated token, so a
slot's column is its token's position. Rows of different lengths share one decode step: every slot writes its new key
at its own column and attends to columns 0..pos. The attention is plugged into the transformers model as an attention
implementation ("dr_slots") that takes the cache through the forward's keyword arguments (a prefill: this object; a
decode step: one layer's LayerSlots), so the model code is transformers' own.

Two kernels read the cache: "sdpa" (a boolean mask over all columns; every backend) and "flex" (FlexAttention with a
block mask that skips the blocks past each row's length, so a step reads each row's live keys only instead of the
whole cache; this is what keeps long `max_new_tokens` budgets cheap on a GPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention
from transformers import AttentionInterface

Kernel = Literal["sdpa", "flex"]
BLOCK = 128  # FlexAttention's key block: cache lengths are a multiple of it
IMPLEMENTATION = "dr_slots"


def kv_heads(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a transformers LLaMA config."""
    heads = config.num_key_value_heads or config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def bytes_per_position(config, dtype: torch.dtype) -> int:
    """Cache bytes of one position of one slot: a key and a value in every layer."""
    heads, head_dim = kv_heads(config)
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize


def int32_slot_limit(config, length: int) -> int:
    """Slots whose one-layer cache stays under 2**31 elements: compiled kernels then index it with int32 (torch 2.11's
    FlexAttention kernel fails to compile with the int64 indexing a larger tensor needs)."""
    heads, head_dim = kv_heads(config)
    return (2**31 - 1) // (heads * length * head_dim)


class LayerSlots(NamedTuple):
    """What one layer's decode step over the first n slots reads and writes: their keys and values [n, heads, length,
    dim], the columns they write next `pos` [n], their indices `every` [n], and what each may see: `visible`, an SDPA
    mask [n, 1, 1, length] (bool), or FlexAttention's count of blocks to read [n, 1, 1] (int32)."""

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    every: torch.Tensor
    visible: torch.Tensor


class SlotKV:
    """Per layer, [slots, heads, length, head_dim] keys and values; `pos[s]` is the column slot s writes next."""

    def __init__(self, config, slots: int, length: int, dtype: torch.dtype, device: torch.device, kernel: Kernel):
        heads, head_dim = kv_heads(config)
        shape = (slots, heads, length, head_dim)
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.slots, self.length, self.kernel = slots, length, kernel
        self.columns = torch.arange(length, device=device)
        self.every = torch.arange(slots, device=device)  # each slot's row index, for per-slot writes

    def step_inputs(self, width: int, alive: torch.Tensor) -> list[LayerSlots]:
        """Each layer's view of the first `width` slots for a decode step (`alive` [width]: the slots decoding). SDPA
        sees columns 0..pos (its prompt, its answer so far and the new key, written first); Flex reads columns
        0..pos-1 of the alive slots only (a finished or free slot reads no block), and `decode_attention` merges the
        new key in."""
        pos = self.pos[:width]
        if self.kernel == "sdpa":
            visible = (self.columns <= pos.unsqueeze(-1))[:, None, None, :]
        else:
            visible = torch.where(alive, (pos - 1).clamp(min=0) // BLOCK + 1, 0).to(torch.int32).view(-1, 1, 1)
        every = self.every[:width]
        layers = zip(self.keys, self.values, strict=True)
        return [LayerSlots(k[:width], v[:width], pos, every, visible) for k, v in layers]

    def prefill(self, layer: int, rows: torch.Tensor, q, k, v, scaling: float) -> torch.Tensor:
        """Right-padded prompts [R, heads, L, dim] of the slots `rows`: keys and values stored at columns 0..L-1,
        causal attention over the prompt itself (a real query never sees a padded key: pads come after it).

        The columns past L are zeroed: they still hold the slot's previous row, which a decode step reads with weight
        0 (SDPA reads every column, Flex the rest of each block it reads), and 0 x a non-finite value left by a row
        whose inputs were not finite would be NaN in the new row's attention."""
        length = k.shape[2]
        self.keys[layer][rows, :, :length] = k
        self.values[layer][rows, :, :length] = v
        for cache in (self.keys[layer], self.values[layer]):  # index_fill_: a Python value assigned by index is
            cache[:, :, length:].index_fill_(0, rows, 0)  # copied over first, which a captured prefill cannot do
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies the rows of slots `src` into slots `dst` (keys, values and position): how the engine gathers its
        last rows into the first slots, where a narrower step runs."""
        for t in (*self.keys, *self.values, self.pos):
            t[dst] = t[src]


def decode_attention(slots: LayerSlots, q, k, v, scaling: float) -> torch.Tensor:
    """One new token per slot [n, heads, 1, dim]: its key and value written at `pos`, attention over the slot."""
    keys, values, pos, every, visible = slots
    if visible.dtype == torch.bool:
        keys[every, :, pos] = k[:, :, 0]
        values[every, :, pos] = v[:, :, 0]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scaling)
    width, length = keys.shape[0], keys.shape[2]
    index = torch.arange(length // BLOCK, dtype=torch.int32, device=keys.device).expand(width, 1, 1, -1)
    mask = BlockMask.from_kv_blocks(
        visible, index, BLOCK_SIZE=BLOCK, mask_mod=lambda b, h, q, kv: kv < pos[b], seq_lengths=(1, length)
    )
    # compiled FlexAttention reads a cache written earlier in the same graph as it was before the write (seen with
    # torch 2.14): attend to the earlier columns, then merge the new key by its log-sum-exp. The log-sum-exp comes
    # through return_aux: the older return_lse flag records a warning in a module-level set, which Dynamo guards on,
    # so the layer would be traced and compiled twice
    past, aux = flex_attention(q, keys, values, block_mask=mask, scale=scaling, return_aux=AuxRequest(lse=True))
    lse = aux.lse
    new = (q.float() * k.float()).sum(-1) * scaling  # [n, heads, 1]
    top = torch.maximum(lse, new)
    w_past, w_new = torch.exp(lse - top).unsqueeze(-1), torch.exp(new - top).unsqueeze(-1)
    keys[every, :, pos] = k[:, :, 0]
    values[every, :, pos] = v[:, :, 0]
    return ((w_past * past.float() + w_new * v.float()) / (w_past + w_new)).to(q.dtype)


# Handed to the model as the prefill's attention mask: any 4-D mask makes transformers pass it through instead of
# building one (and detecting packed sequences from the position ids, a few ops per call); the prefill attends causally.
PREFILL = torch.empty(0, 0, 0, 0, dtype=torch.bool)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature. Decoding, the layer's slots come in `kwargs["slots"]` (a
    LayerSlots: nothing here reads the layer's index, so one compiled layer serves them all); prefilling, the cache in
    `kwargs["kv"]` and the rows' slots in `kwargs["kv_rows"]`."""
    if "slots" in kwargs:
        out = decode_attention(kwargs["slots"], query, key, value, scaling)
    else:
        out = kwargs["kv"].prefill(module.layer_idx, kwargs["kv_rows"], query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, slot_attention)


@contextmanager
def slot_attention_on(llm: torch.nn.Module):
    """The model's layers attend through SlotKV inside the block (its other users keep their implementation).
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
