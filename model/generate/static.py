"""A decode loop with a static KV cache and fixed-shape inputs, so compiled graphs (CUDA graphs) serve every batch.

`transformers.generate` spends milliseconds of host work per token (logits processors, stopping criteria, cache
bookkeeping); at batch 1 on an H100 that is as long as the step itself. Here the prefill is one compiled call and each
step is one compiled call plus an argmax (or a sample); stop checks sync with the host only every few steps. Greedy
tokens equal `generate`'s (tested), and rows are cut at the same stop sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StaticCache

from model.engine.kv_cache import kv_heads
from model.text.stopping import RowEnds, StopRule

SYNC_EVERY = 8  # steps between host checks for "all rows finished"
PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this: one compiled shape per bucket, not per length


def padded_shape(rows: int, length: int, max_new_tokens: int) -> tuple[int, int]:
    """(batch, cache length) the loop runs a batch at: rows filled up to a power of two, the prompt to the bucket."""
    return 1 << (rows - 1).bit_length(), -(-length // PROMPT_BUCKET) * PROMPT_BUCKET + max_new_tokens


@dataclass
class _Decoder:
    cache: StaticCache
    prefill: Callable[..., torch.Tensor]
    step: Callable[..., torch.Tensor]


_decoder: dict[tuple, _Decoder] = {}  # the last decoder built, reused while shapes match


def _static_decoder(llm: torch.nn.Module, embeds: torch.Tensor, total: int, compile: bool) -> _Decoder:
    batch, length, _ = embeds.shape
    key = (id(llm), batch, length, total, embeds.dtype, embeds.device, compile)
    if key not in _decoder:
        _decoder.clear()  # one cache at a time: a static cache holds batch x length keys and values per layer
        cache = StaticCache(config=llm.config, max_cache_len=total)
        # allocated here, not on the first update: inside a CUDA graph that would land in memory the next replay reuses
        cache.early_initialization(batch, *kv_heads(llm.config), embeds.dtype, embeds.device)

        def forward(mask, position_ids, **inputs):  # the cache writes at its own running length
            return llm(
                **inputs, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1
            ).logits[:, -1]

        def prefill(embeds, mask, position_ids):
            return forward(mask, position_ids, inputs_embeds=embeds)

        def step(ids, mask, position_ids):
            return forward(mask, position_ids, input_ids=ids)

        if compile:
            prefill, step = (torch.compile(f, mode="reduce-overhead", fullgraph=True) for f in (prefill, step))
        _decoder[key] = _Decoder(cache, prefill, step)
    decoder = _decoder[key]
    decoder.cache.reset()
    return decoder


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Greedy, or sampling as `generate` warps logits: temperature, then top-k, then top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.inference_mode()
def decode_static(
    llm: torch.nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    rule: StopRule,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    compile: bool = False,
) -> torch.Tensor:
    """New token ids [B, <= max_new_tokens] for left-padded prompt embeddings [B, L, H].

    Rows end by `rule`, checked on the host every SYNC_EVERY steps; the caller cuts them (`rule.cut`).
    Prompts are left-padded to a multiple of PROMPT_BUCKET and the batch is filled up to a power of two with empty
    rows, so a job's batches (the last, smaller one too) share a few compiled shapes.
    """
    rows, length, hidden = embeds.shape
    batch, total = padded_shape(rows, length, max_new_tokens)
    pad = total - max_new_tokens - length
    if pad or batch > rows:
        embeds = torch.nn.functional.pad(embeds, (0, 0, pad, 0, 0, batch - rows))
        attention_mask = torch.nn.functional.pad(attention_mask, (pad, 0, 0, batch - rows))
        length += pad
    device = embeds.device
    decoder = _static_decoder(llm, embeds, total, compile)
    valid = attention_mask.bool()
    # allowed[b, 0, q, k]: real keys up to the query; every query sees itself, so pad rows stay finite
    allowed = torch.zeros(batch, 1, length, total, dtype=torch.bool, device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed[:, 0, :, :length] = causal & valid[:, None, :]
    allowed[:, 0, :, :length] |= torch.eye(length, dtype=torch.bool, device=device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    logits = decoder.prefill(embeds, allowed, positions)

    step_mask = allowed[:, :, -1:, :].clone()  # the last real query's view, extended one key per step
    ends = RowEnds(rule, rows)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    real = out[:rows]
    position = positions[:, -1:]
    for i in range(max_new_tokens):
        token = _pick(logits, do_sample, temperature, top_p, top_k)
        out[:, i] = token
        last = i == max_new_tokens - 1
        if last or ((i + 1) % SYNC_EVERY == 0 and all(ends.add(real[:, i + 1 - SYNC_EVERY : i + 1].tolist()))):
            return real[:, : i + 1]
        step_mask[:, 0, 0, length + i] = True
        position = position + 1
        logits = decoder.step(token[:, None], step_mask, position)
    return real
