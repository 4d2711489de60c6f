"""The next token of each row: greedy, or sampled as `generate` warps logits, from per-row counter-based randomness.

Sampling runs on the device with no host sync: each row's uniform draw for its n-th token is a hash of (row key, n),
and the token is the inverse CDF of the warped distribution at that draw. A row's sampled answer therefore depends on
its own key and logits only, not on which rows share its batch, on the batch size or on the number of GPUs (a
`torch.Generator` per row would need one kernel launch per row and step).
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFF_FFFF


def row_key(seed: int | None, row_id: str, instruction: str) -> int:
    """A 63-bit random key for one row, the same in every process: blake2b of (seed, id, instruction)."""
    digest = hashlib.blake2b(f"{seed}\0{row_id}\0{instruction}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds) in int64 arithmetic; multipliers below 2**31 keep every
    product below 2**63, so nothing overflows on any backend."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _MASK32
    return x ^ (x >> 16)


def uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform draws in [0, 1), one per row: a hash of the row's 63-bit key and its counter (int64 tensors)."""
    h = _mix32(counters * 0x9E3779B1 ^ (keys >> 32))
    h = _mix32(h ^ keys)
    h = _mix32(h + (keys >> 32) * 0x632BE5AB)
    return (h >> 8).float() * (1.0 / (1 << 24))


def next_token(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    k_cap: int,
) -> torch.Tensor:
    """Token ids [B] from logits [B, V] with per-row settings [B]: argmax where `greedy`, else a draw at `u` from the
    distribution `generate` samples from: logits / temperature, then top-k (0: off), then top-p (1.0: off).

    Top-k keeps the k largest; top-p then removes every token whose ascending cumulative probability is at most
    1 - top_p (transformers' TopPLogitsWarper, so the most likely token always stays). `k_cap` bounds the candidates
    (the largest top-k in use, or the vocabulary when a row has top-k off).
    """
    logits = logits.float()
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    values, order = scaled.topk(min(k_cap, logits.shape[-1]), dim=-1)  # sorted, largest first
    rank = torch.arange(values.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, values.shape[-1]).unsqueeze(-1)
    probs = torch.softmax(values.masked_fill(rank >= k, float("-inf")), dim=-1)
    ascending_cumsum = 1.0 - (probs.cumsum(-1) - probs)  # mass of this token and every less likely one
    removed = (ascending_cumsum <= (1.0 - top_p).unsqueeze(-1)) & (top_p < 1.0).unsqueeze(-1) & (rank > 0)
    cdf = probs.masked_fill(removed, 0.0).cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=values.shape[-1] - 1)
    sampled = order.gather(-1, pick).squeeze(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)
