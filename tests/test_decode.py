"""model/generate/static.py's token choice in the static-batch loop: draws follow transformers' warped distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model.generate.static import _pick


def warped(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities `generate` samples from: transformers' own warpers in its order, then softmax."""
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return torch.softmax(LogitsProcessorList(warpers)(None, logits.clone()), dim=-1)


@pytest.mark.parametrize(  # top-k alone, top-p alone, both, neither
    "temperature,top_k,top_p",
    [(1.0, 10, 1.0), (1.3, 0, 0.5), (0.7, 10, 0.8), (2.0, 5, 0.95), (0.5, 3, 0.9), (1.0, 0, 1.0)],
)
def test_sampled_tokens_follow_transformers_warped_distribution(temperature, top_k, top_p):
    """N draws per row: a token transformers' top-k or top-p removes is never drawn (an ignored top-p, or a top-k
    that keeps more tokens, draws them), and each token's share is within 5 binomial standard deviations of its
    warped probability (a wrong temperature or a mass moved between kept tokens shows there)."""
    g = torch.Generator().manual_seed(int(temperature * 10) + top_k)
    vocab, n = 60, 20000
    logits = torch.randn(3, vocab, generator=g) * 3
    expected = warped(logits, temperature, top_k, top_p)
    assert (expected == 0).any() == bool(top_k or top_p < 1.0)  # each filter in use removes tokens here
    torch.manual_seed(0)
    drawn = _pick(logits.repeat_interleave(n, 0), True, temperature, top_p, top_k).view(3, n)
    share = torch.stack([torch.bincount(r, minlength=vocab) for r in drawn]).double() / n
    assert not ((share > 0) & (expected == 0)).any()
    bound = 5 * (expected.double() * (1 - expected.double()) / n).sqrt() + 2 / n  # + 2 draws: rare tokens
    assert ((share - expected).abs() <= bound).all()


def test_greedy_takes_the_argmax_whatever_the_sampling_settings():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    assert _pick(logits, False, 5.0, 0.1, 2).tolist() == logits.argmax(-1).tolist()
