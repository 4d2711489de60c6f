"""The decode step's layer: transformers' LLaMA layer with its query, key and value projections run as one matrix
product and its gate and up projections as another (vLLM's QKVParallelLinear and MergedColumnParallelLinear, gpt-fast's
wqkv). A decode step at one row is a matrix-vector pass over every weight: the model's separate products, chained in a
CUDA graph, read their weights at 2.36-2.43 TB/s of an H100's 3.35 (benchmarks/README.md, targets), and a
4096 x 12288 product needs one launch and one pass where three 4096 x 4096 ones need three. On an H100 one slot's step
took 5.84 ms against 6.26 (the engine alone 163.8 tok/s against 152.4); at 512 rows, where a step is matrix work and
cache reads, nothing changed (benchmarks/results/2026-12-07-h100-fused-encoder-jobs/).

The joined weights are the model's own: each projection's weight becomes a view into them, so the model's memory
does not grow and transformers' layers (the engine's prefills, `generate`) read the same numbers.
A layer whose projections are not plain linear layers (LoRA not merged into them) runs as transformers' layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from model.engine.kv_cache import slot_attention

# False: every layer runs as transformers' layer (the projections apart), for comparing the two on a device
FUSE_PROJECTIONS = True


class Joined(NamedTuple):
    """Linear layers' weights (and biases) as one product: `sizes` output features each."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]


class Fused(NamedTuple):
    """One layer's joined products: query/key/value, gate/up."""

    qkv: Joined
    gate_up: Joined


# the joined weights by the first linear layer they hold, so an engine built again on a model reuses them (another
# join would leave the earlier engine's copy alive beside the model's: 8.7 GB on a 7B model)
_JOINED: WeakKeyDictionary[nn.Module, Joined] = WeakKeyDictionary()


def _views_of(linears: Sequence[nn.Linear], joined: Joined) -> bool:
    """Whether the linears' parameters are still views into `joined` (not moved, cast or replaced since)."""
    starts = accumulate((0, *joined.sizes))
    for linear, start in zip(linears, starts, strict=False):
        if linear.weight.data_ptr() != joined.weight[start].data_ptr():
            return False
        if joined.bias is not None and linear.bias.data_ptr() != joined.bias[start].data_ptr():
            return False
    return True


@torch.inference_mode(False)  # the engine builds in inference mode; the weights must stay usable by autograd
@torch.no_grad()
def join(linears: Sequence[nn.Linear]) -> Joined:
    """The linears' weights (and biases) concatenated, each linear's parameters made a view into the result."""
    known = _JOINED.get(linears[0])
    if known is not None and _views_of(linears, known):
        return known
    sizes = tuple(linear.out_features for linear in linears)
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears]) if linears[0].bias is not None else None
    for linear, part in zip(linears, weight.split(sizes), strict=True):
        linear.weight = nn.Parameter(part, requires_grad=linear.weight.requires_grad)
    for linear, part in zip(linears, bias.split(sizes) if bias is not None else (), strict=False):
        linear.bias = nn.Parameter(part, requires_grad=linear.bias.requires_grad)
    joined = Joined(weight, bias, sizes)
    _JOINED[linears[0]] = joined
    return joined


def fuse(layer: nn.Module) -> Fused | None:
    """The layer's joined products, or None where its projections are not all plain linear layers."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
    if not FUSE_PROJECTIONS or any(type(m) is not nn.Linear for m in (*qkv, *gate_up)):
        return None
    return Fused(join(qkv), join(gate_up))  # a LLaMA config gives q, k and v biases together, and gate and up


def fused_weights(lm: nn.Module) -> list[Fused | None]:
    """`fuse` for every decoder layer of a transformers LLaMA causal LM."""
    return [fuse(layer) for layer in lm.model.layers]


def run_layer(
    layer: nn.Module, fused: Fused | None, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attention
) -> torch.Tensor:
    """transformers' LlamaDecoderLayer forward over `hidden` [rows, positions, hidden], attending through
    kv_cache.slot_attention with `attention` (its `slots` or `packed`): the same operations in the same order, the
    projections joined where `fused` has them."""
    if fused is None:
        return layer(hidden, position_embeddings=(cos, sin), **attention)
    attn, mlp = layer.self_attn, layer.mlp
    # one view of the whole product into heads, then q, k and v split off it: views of its non-contiguous parts took
    # Dynamo longer to trace (benchmarks/results/2026-12-06-cpu-fused-layer-trace/)
    qkv = F.linear(layer.input_layernorm(hidden), fused.qkv.weight, fused.qkv.bias)
    qkv = qkv.view(*hidden.shape[:-1], -1, attn.head_dim)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([n // attn.head_dim for n in fused.qkv.sizes], dim=-2))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out, _ = slot_attention(attn, q, k, v, None, scaling=attn.scaling, **attention)
    hidden = hidden + attn.o_proj(out.reshape(*hidden.shape[:-1], -1).contiguous())
    normed = layer.post_attention_layernorm(hidden)
    gate, up = F.linear(normed, fused.gate_up.weight, fused.gate_up.bias).split(fused.gate_up.sizes, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)
