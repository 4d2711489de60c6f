"""Keys and values of a fixed number of slots, and the attention that reads them, for the continuous-batching engine.

Each slot holds one row: its prompt's keys and values at columns 0..P-1 and one more column per generated token, so a
slot's column is its token's position. Rows of different lengths share one decode step: every slot writes its new key
at its own column and attends to columns 0..pos. The attention is plugged into the transformers model as an attention
implementation ("dr_slots") that takes this object through the forward's keyword arguments, so the model code is
transformers' own.

Two kernels read the cache: "sdpa" (a boolean mask over all columns; every backend) and "flex" (FlexAttention with a
block mask that skips the blocks past each row's length, so a step reads each row's live keys only instead of the
whole cache; this is what keeps long `max_new_tokens` budgets cheap on a GPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

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
        self.block_index = torch.arange(length // BLOCK, dtype=torch.int32, device=device).expand(slots, 1, 1, -1)
        for t in (*self.keys, *self.values, self.pos, self.every):
            torch._dynamo.mark_static_address(t)  # updated in place (or read) inside CUDA graphs

    def decode_mask(self, alive: torch.Tensor) -> torch.Tensor | BlockMask:
        """What each slot's query may see in the cache this step. SDPA: columns 0..pos (its prompt, its answer so far
        and the new key, written first). Flex: columns 0..pos-1 of the `alive` slots only (a finished or free slot
        reads no block); the new key is merged in by `decode`."""
        if self.kernel == "sdpa":
            return (self.columns <= self.pos.unsqueeze(-1))[:, None, None, :]
        pos = self.pos.clone()  # a snapshot: the step advances self.pos after attending
        blocks = torch.where(alive, (pos - 1).clamp(min=0) // BLOCK + 1, 0).to(torch.int32).view(-1, 1, 1)
        return BlockMask.from_kv_blocks(
            blocks,
            self.block_index,
            BLOCK_SIZE=BLOCK,
            mask_mod=lambda b, h, q, kv: kv < pos[b],
            seq_lengths=(1, self.length),
        )

    def prefill(self, layer: int, rows: torch.Tensor, q, k, v, scaling: float) -> torch.Tensor:
        """Right-padded prompts [R, heads, L, dim] of the slots `rows`: keys and values stored at columns 0..L-1,
        causal attention over the prompt itself (a real query never sees a padded key: pads come after it)."""
        length = k.shape[2]
        self.keys[layer][rows, :, :length] = k
        self.values[layer][rows, :, :length] = v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)

    def decode(self, layer: int, mask: torch.Tensor | BlockMask, q, k, v, scaling: float) -> torch.Tensor:
        """One new token per slot [S, heads, 1, dim]: its key and value written at `pos`, attention over the slot."""
        every = self.every
        if isinstance(mask, BlockMask):
            # compiled FlexAttention reads a cache written earlier in the same graph as it was before the write
            # (seen with torch 2.14): attend to the earlier columns, then merge the new key by its log-sum-exp
            # the log-sum-exp through return_aux: the older return_lse flag records a warning in a module-level set,
            # which Dynamo guards on, so the step would be traced and compiled twice (12 s of every start)
            past, aux = flex_attention(
                q, self.keys[layer], self.values[layer], block_mask=mask, scale=scaling, return_aux=AuxRequest(lse=True)
            )
            lse = aux.lse
            new = (q.float() * k.float()).sum(-1) * scaling  # [S, heads, 1]
            top = torch.maximum(lse, new)
            w_past, w_new = torch.exp(lse - top).unsqueeze(-1), torch.exp(new - top).unsqueeze(-1)
            out = ((w_past * past.float() + w_new * v.float()) / (w_past + w_new)).to(q.dtype)
        self.keys[layer][every, :, self.pos] = k[:, :, 0]
        self.values[layer][every, :, self.pos] = v[:, :, 0]
        if isinstance(mask, BlockMask):
            return out
        return F.scaled_dot_product_attention(q, self.keys[layer], self.values[layer], attn_mask=mask, scale=scaling)


# Handed to the model as the prefill's attention mask: any 4-D mask makes transformers pass it through instead of
# building one (and detecting packed sequences from the position ids, a few ops per call); the prefill attends causally.
PREFILL = torch.empty(0, 0, 0, 0, dtype=torch.bool)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature; the slot cache comes in `kwargs["kv"]`, and `attention_mask` is
    `decode_mask()`'s when decoding (the prefill's slots come in `kwargs["kv_rows"]`)."""
    kv: SlotKV = kwargs["kv"]
    rows = kwargs.get("kv_rows")
    if rows is not None:
        out = kv.prefill(module.layer_idx, rows, query, key, value, scaling)
    else:
        out = kv.decode(module.layer_idx, attention_mask, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, slot_attention)


@contextmanager
def slot_attention_on(llm: torch.nn.Module):
    """The model's layers attend through SlotKV inside the block (its other users keep their implementation)."""
    config = llm.config
    saved = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = saved
