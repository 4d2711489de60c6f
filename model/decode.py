"""A decode loop with a static KV cache and fixed-shape inputs, so one compiled step (CUDA graphs) serves every token.

`transformers.generate` spends milliseconds of host work per token (logits processors, stopping criteria, cache
bookkeeping); at batch 1 on an H100 that is as long as the step itself. Here each step is one compiled call plus an
argmax (or a sample), and stop checks sync with the host only every few steps. Greedy tokens equal `generate`'s
(tested), and rows are cut at the same stop sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StaticCache

SYNC_EVERY = 8  # steps between host checks for "all rows finished"
CACHE_BUCKET = 256  # cache lengths are rounded up to this, so prompts of other lengths reuse the compiled step
_decoder: dict[tuple, tuple[StaticCache, Callable]] = {}  # the last (cache, step) built, reused while shapes match


def _static_decoder(llm: torch.nn.Module, batch: int, total: int, compile: bool) -> tuple[StaticCache, Callable]:
    key = (id(llm), batch, total, compile)
    if key not in _decoder:
        _decoder.clear()  # one cache at a time: a static cache holds batch x length keys and values per layer
        cache = StaticCache(config=llm.config, max_cache_len=total)

        def step(ids, position_ids, cache_position, mask):
            return llm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                cache_position=cache_position,
                use_cache=True,
            ).logits[:, -1]

        _decoder[key] = (cache, torch.compile(step, mode="reduce-overhead", fullgraph=True) if compile else step)
    cache, run = _decoder[key]
    cache.reset()
    return cache, run


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


def _finished(tokens: torch.Tensor, stops: Sequence[torch.Tensor], eos_id: int) -> torch.Tensor:
    """Rows whose tokens so far hold EOS or a stop sequence (checked at sync points, not every step)."""
    done = (tokens == eos_id).any(dim=1)
    for stop in stops:
        if tokens.shape[1] >= len(stop):
            done |= (tokens.unfold(1, len(stop), 1) == stop).all(dim=-1).any(dim=-1)
    return done


@torch.inference_mode()
def decode_static(
    llm: torch.nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stops: Sequence[Sequence[int]],
    eos_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    compile: bool = False,
) -> torch.Tensor:
    """New token ids [B, <= max_new_tokens] for left-padded prompt embeddings [B, L, H]."""
    batch, length, _ = embeds.shape
    device = embeds.device
    total = -(-(length + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    cache, run = _static_decoder(llm, batch, total, compile)
    valid = attention_mask.bool()
    # allowed[b, 0, q, k]: real keys up to the query; every query sees itself, so pad rows stay finite
    allowed = torch.zeros(batch, 1, length, total, dtype=torch.bool, device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed[:, 0, :, :length] = causal & valid[:, None, :]
    allowed[:, 0, :, :length] |= torch.eye(length, dtype=torch.bool, device=device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    logits = llm(
        inputs_embeds=embeds,
        attention_mask=allowed,
        position_ids=positions,
        past_key_values=cache,
        cache_position=torch.arange(length, device=device),
        use_cache=True,
    ).logits[:, -1]

    step_mask = allowed[:, :, -1:, :].clone()  # the last real query's view, extended one key per step

    stop_tensors = [torch.tensor(s, device=device) for s in stops]
    cache_positions = torch.arange(length, total, device=device)  # sliced per step: no host-to-device copy
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    position = positions[:, -1:]
    for i in range(max_new_tokens):
        token = _pick(logits, do_sample, temperature, top_p, top_k)
        out[:, i] = token
        last = i == max_new_tokens - 1
        if last or ((i + 1) % SYNC_EVERY == 0 and bool(_finished(out[:, : i + 1], stop_tensors, eos_id).all())):
            return out[:, : i + 1]
        step_mask[:, 0, 0, length + i] = True
        position = position + 1
        logits = run(token[:, None], position, cache_positions[i : i + 1], step_mask)
    return out
