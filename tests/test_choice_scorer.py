"""model/generate/likelihood.py: the likelihood scorer against values derived without it.

- A hand-built model whose lm_head is a bias only (weights zero) gives every position the same next-token
  distribution, softmax(bias); one option's tokens get a large bias, so that option is certain, and every option's
  log-probability is a sum of `bias[t] - logsumexp(bias)` over its own tokens, computed here with numpy. Scoring the
  wrong positions (off by one, the "\\n###" end marker, prompt tokens) or the wrong tokens changes those sums.
- On the tiny random model, each option's score equals a one-row teacher-forced forward pass built by hand from
  token ids (and, for audio, the projected clip features), `log_softmax` of its logits gathered at the option's
  tokens. Batching, padding, `logits_to_keep` and the label bookkeeping are all outside that derivation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.generate.likelihood import OptionScores, option_logprobs, option_tokens
from model.network.checkpoint import load_model
from model.network.deepresonance import Example
from model.text.prompt import ASSISTANT, HUMAN

OPTIONS = ["piano", "guitar", "drums", "flute"]


@pytest.fixture(scope="module")
def alpha(tiny_layout):
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    model.merge_lora()
    return model.eval()


def features(seed: int) -> torch.Tensor:
    """Three clip embeddings, as the feature cache holds them (2-D: the encoder is skipped)."""
    return torch.randn(3, 32, generator=torch.Generator().manual_seed(seed))


def examples() -> list[Example]:
    return [
        Example("<Audio>", "What instrument is playing?", [("audio", features(0))]),
        Example("", "Which instrument?", []),
        Example(
            "Some text first <Audio>", "And now a much longer question about the instrument?", [("audio", features(1))]
        ),
    ]


def test_a_bias_only_lm_head_makes_one_option_certain(tiny_layout):
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind).eval()
    model.merge_lora()
    tok = model.tokenizer
    vocab, hidden = model.llama_model.lm_head.weight.shape
    favoured = tok.encode("drums")
    bias = np.zeros(vocab)
    bias[favoured] = 30.0
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.from_numpy(bias))
    model.llama_model.lm_head = head

    scores = option_logprobs(model, examples(), [OPTIONS] * 3, batch_size=5)
    log_z = np.log(np.exp(bias - bias.max()).sum()) + bias.max()
    expected = [sum(bias[t] - log_z for t in tok.encode(o)) for o in OPTIONS]
    for s in scores:
        assert s.pick == s.pick_norm == OPTIONS.index("drums")
        np.testing.assert_allclose(s.logprobs, expected, rtol=1e-5, atol=1e-4)
        assert s.tokens == tuple(len(tok.encode(o)) for o in OPTIONS) and s.chars == tuple(map(len, OPTIONS))


def by_hand(model, example: Example, option: str, answer: list[int] | None = None) -> float:
    """One row, teacher-forced, from token ids: [BOS if text first] input (clips projected) prompt option (its own
    encoding unless `answer` gives the ids to score)."""
    tok, embed = model.tokenizer, model.embed_tokens
    parts: list[torch.Tensor] = []
    text, _, rest = example.input.partition("<Audio>")
    if text or not example.input:  # the original's BOS rule: only when the input starts with text (" " if empty)
        parts.append(embed(torch.tensor([tok.bos_id] + tok.encode(text or " "))))
    if example.media:
        parts.append(model.llama_proj(example.media[0][1]))
    assert not rest
    prompt = tok.encode(HUMAN + example.instruction + ASSISTANT)
    answer = tok.encode(option) if answer is None else answer
    parts.append(embed(torch.tensor(prompt + answer)))
    embeds = torch.cat(parts).unsqueeze(0)
    logits = model.llama_model(inputs_embeds=embeds).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    length = embeds.shape[1]
    return sum(float(logp[length - len(answer) - 1 + k, t]) for k, t in enumerate(answer))


@torch.inference_mode()
def test_scores_equal_a_one_row_teacher_forced_pass(alpha):
    rows = examples()
    scores = option_logprobs(alpha, rows, [OPTIONS, OPTIONS[:2], OPTIONS[1:]], batch_size=3)  # padded batches
    expected = [
        [by_hand(alpha, ex, o) for o in opts]
        for ex, opts in zip(rows, [OPTIONS, OPTIONS[:2], OPTIONS[1:]], strict=True)
    ]
    for s, e in zip(scores, expected, strict=True):
        np.testing.assert_allclose(s.logprobs, e, rtol=1e-4, atol=1e-4)
    assert len({round(v, 3) for v in scores[0].logprobs}) == 4  # a random model: the options do differ


@pytest.mark.parametrize("variant", ["alpha", "beta"])
def test_batch_size_does_not_change_scores(tiny_layout, variant):
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir(variant), tiny_layout.imagebind).eval()
    batched = option_logprobs(model, examples(), [OPTIONS] * 3, batch_size=7)
    single = option_logprobs(model, examples(), [OPTIONS] * 3, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-4)


def test_acc_norm_divides_by_characters():
    s = OptionScores(logprobs=(-3.0, -4.0), tokens=(1, 4), chars=(2, 8))
    assert (s.pick, s.pick_norm) == (0, 1)  # -3/2 = -1.5 < -4/8 = -0.5


def test_an_option_cut_by_max_length_is_an_error(alpha):
    long = Example("", "word " * 600, [])
    with pytest.raises(ValueError, match="longer than max_length"):
        option_logprobs(alpha, [long], [OPTIONS])


def test_option_tokens_cover_the_option_and_no_more(alpha):
    """The scored tokens are the fewest of the answer target that spell the option; on this tokenizer the test
    options are their own encoding, and an option ending in "." may share its last piece with the end marker."""
    tok = alpha.tokenizer
    for option in OPTIONS:
        assert option_tokens(tok, option) == len(tok.encode(option))
        assert tok.encode(option + "\n###")[: len(tok.encode(option))] == tok.encode(option)  # what by_hand assumes
    for option in ["A calm piano piece in C major with a slow tempo and soft dynamics.", "Hi.", "x"]:
        ids, n = tok.encode(option + "\n###"), option_tokens(tok, option)
        assert tok.decode(ids[:n]).startswith(option) and len(tok.decode(ids[: n - 1])) < len(option)


def test_an_option_merged_with_the_end_marker_is_scored_as_trained(tiny_layout, tmp_path):
    """A tokenizer trained on answers (as the demo's) has a `.\\n###` piece: the option "The music is loud." is then
    written, as in training, with that piece last, not with a lone ".", and that is what is scored."""
    from ckpt.tiny import train_tokenizer
    from model.text.tokenizer import PromptTokenizer

    corpus = [f"The {w} is {v}." for w in ("music", "tempo", "song") for v in ("loud", "soft", "fast", "slow")]
    tok = PromptTokenizer(train_tokenizer(tmp_path / "tok", corpus, vocab_size=300))
    option = "The music is loud."
    target = tok.encode(option + "\n###")
    assert tok.sp.id_to_piece(target[-1]) == ".\n###" and target[:-1] == tok.encode(option)[:-1]
    assert option_tokens(tok, option) == len(target)

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind).eval()
    model.tokenizer = tok  # a random model: any ids below its vocabulary size will do
    example = Example("", "How loud is it?", [])
    [score] = option_logprobs(model, [example], [[option, "The music is soft."]])
    with torch.inference_mode():
        expected = by_hand(model, example, option, answer=target)
        alone = by_hand(model, example, option)  # the option's own encoding, ending in a lone "."
    assert score.logprobs[0] == pytest.approx(expected, abs=1e-4)
    assert abs(alone - expected) > 1e-3  # so scoring the lone-"." encoding would fail the line above
