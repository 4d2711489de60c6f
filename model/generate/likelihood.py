"""Multiple choice by likelihood: each option scored by the model's log-probability of its text after the prompt.

Every (row, option) pair is one teacher-forced sequence, `[BOS] input-with-media ### Human: {instruction}\\n###
Assistant: {option}\\n###`, assembled by `DeepResonance.prepare` exactly as a training target, and batched. The score
is the sum of the log-probabilities of the tokens that spell the option (`option_tokens`); the end marker "\\n###"
that `layout_row` appends to every target is not scored where it is a token of its own (always with Vicuna's
tokenizer): lm-evaluation-harness scores the continuation alone, and the marker is no part of any option. Two picks
come out, as lm-evaluation-harness's `acc` and `acc_norm`: the highest sum, and the highest sum divided by the
option's length in characters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.data.row_features import row_media
from model.media.features import FeatureCache
from model.media.preprocess import MediaError
from model.network.deepresonance import DeepResonance, Example
from model.text.prompt import IGNORE, TARGET_END
from model.text.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class OptionScores:
    """One row's options: log-probability sums, token counts and character lengths, and the two picks."""

    logprobs: tuple[float, ...]
    tokens: tuple[int, ...]
    chars: tuple[int, ...]

    @property
    def pick(self) -> int:
        """lm-evaluation-harness `acc`: the option of highest total log-probability."""
        return max(range(len(self.logprobs)), key=lambda j: self.logprobs[j])

    @property
    def pick_norm(self) -> int:
        """lm-evaluation-harness `acc_norm`: the highest log-probability per character of the option text."""
        return max(range(len(self.logprobs)), key=lambda j: self.logprobs[j] / self.chars[j])


def option_tokens(tok: PromptTokenizer, option: str) -> int:
    """How many tokens of the answer target `option + "\\n###"` (tokenized as one piece, as training and
    `DeepResonance.prepare` do) spell the option: the fewest whose text covers it. With Vicuna's tokenizer that is
    exactly the option's own encoding ("\\n" is a byte piece that never merges); with a tokenizer that merges the
    option's last characters with the end marker (the demo's, trained on such targets, has `.\\n###`), that piece is
    included: it is how the model writes the option's end."""
    ids = tok.encode(option + TARGET_END)
    for n in range(1, len(ids) + 1):
        if len(tok.decode(ids[:n])) >= len(option):
            return n
    return len(ids)


@torch.inference_mode()
def option_logprobs(
    model: DeepResonance,
    examples: Sequence[Example],
    options: Sequence[Sequence[str]],
    batch_size: int = 16,
) -> list[OptionScores]:
    """Scores of `options[i]` after `examples[i]`'s prompt (its `output` is ignored); `batch_size` sequences a pass.

    Raises ValueError when a prompt and option do not fit the model's max_length (the option would be cut).
    """
    pairs = [(i, option) for i, opts in enumerate(options) for option in opts]
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = model.prepare(
            [Example(examples[i].input, examples[i].instruction, examples[i].media, o) for i, o in chunk]
        )
        targets = batch.labels[:, 1:]
        first = int((targets != IGNORE).int().argmax(dim=1).min())  # earliest target position of the batch
        # logits only from the earliest target's predecessor on (prompts are most of the length); the last position
        # predicts nothing
        keep = batch.embeds.shape[1] - first
        logits = model.llama_model(
            inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, logits_to_keep=keep
        ).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        tail = targets[:, first:]
        picked = logp.gather(-1, tail.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for b, (i, option) in enumerate(chunk):
            n = option_tokens(model.tokenizer, option)
            positions = (tail[b] != IGNORE).nonzero().squeeze(-1)[:n]
            if len(positions) < n:
                raise ValueError(
                    f"row {i}: prompt plus option {option!r} is longer than max_length {model.config.max_length}"
                )
            sums.append(float(picked[b, positions].sum()))
            counts.append(n)
    out, k = [], 0
    for opts in options:
        out.append(
            OptionScores(tuple(sums[k : k + len(opts)]), tuple(counts[k : k + len(opts)]), tuple(map(len, opts)))
        )
        k += len(opts)
    return out


def score_rows(
    model: DeepResonance,
    rows: Sequence,
    media_root: str | Path,
    cache: FeatureCache | None,
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> list[OptionScores | MediaError]:
    """Each `model.data.multiple_choice.ChoiceRow`'s option scores, or its media error; media go through the feature
    cache as in `dr infer` (encoded once per file), `batch_size` rows' media and option sequences at a time."""

    out: list[OptionScores | MediaError] = []
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        media = row_media(model, [r.row for r in group], Path(media_root), cache, batch_size)
        ready = [(k, r, m) for k, (r, m) in enumerate(zip(group, media, strict=True)) if not isinstance(m, MediaError)]
        scores = option_logprobs(
            model,
            [Example(r.row.input, r.row.instruction, m) for _, r, m in ready],
            [r.options for _, r, _ in ready],
            batch_size,
        )
        by_index = {k: s for (k, _, _), s in zip(ready, scores, strict=True)}
        out.extend(by_index.get(k, m) for k, m in enumerate(media))
        if on_progress:
            on_progress(len(group))
    return out
