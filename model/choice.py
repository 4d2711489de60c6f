"""Multiple choice by likelihood: each option scored by the model's log-probability of its text after the prompt.

Every (row, option) pair is one teacher-forced sequence, `[BOS] input-with-media ### Human: {instruction}\\n###
Assistant: {option}`, laid out by `layout_row` and assembled by `assemble` as `DeepResonance.prepare` does for a
training target, and batched. The score is the sum of the log-probabilities of exactly the option's tokens (its
sentencepiece encoding as an answer piece, with the leading "▁"). The end marker "\\n###" that `layout_row` appends
to training targets is left out: lm-evaluation-harness scores the continuation alone, and the marker is not part of
any option (it would also favour options after which the model expects the answer to end). Two picks come out, as
lm-evaluation-harness's `acc` and `acc_norm`: the highest sum, and the highest sum divided by the option's length in
characters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.deepresonance import DeepResonance, Example
from model.features import FeatureCache
from model.media import MediaError
from model.prompt import IGNORE, Batch, RowLayout, assemble, layout_row


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


def prepare_options(model: DeepResonance, examples: Sequence[Example], options: Sequence[str]) -> Batch:
    """`DeepResonance.prepare` with `options[k]` as the target of `examples[k]`, tokenized alone.

    `prepare` tokenizes a target as one piece, `output + "\n###"`; where a tokenizer merges across that boundary (the
    demo's, trained on such targets, has pieces like `.\n###`), its first tokens are not the option's own, so the
    prompt is laid out here by `layout_row` without a target and the option's encoding is appended. With Vicuna's
    tokenizer ("\n" is a byte piece that never merges) the two are the same tokens.
    """
    tok = model.tokenizer
    media = model.encode_media([item for ex in examples for item in ex.media])
    layouts, start = [], 0
    for ex, option in zip(examples, options, strict=True):
        clips = [f.shape[0] for f in media[start : start + len(ex.media)]]
        prompt = layout_row(tok, ex.input, ex.instruction, clips)
        layouts.append(RowLayout(prompt.ids + tok.encode(option), prompt.input_len, prompt.target_start))
        start += len(ex.media)
    projected = model.llama_proj(torch.cat(media).to(model.device, model.dtype)) if media else None
    return assemble(
        layouts, projected, model.embed_tokens, tok.pad_id, model.config.max_length, fusion=model.preencoding
    )


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
        batch = prepare_options(model, [examples[i] for i, _ in chunk], [o for _, o in chunk])
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
            n = len(model.tokenizer.encode(option))
            positions = (tail[b] != IGNORE).nonzero().squeeze(-1)
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
    """Each `model.mc_data.ChoiceRow`'s option scores, or its media error; media go through the feature cache as in
    `dr infer` (encoded once per file), `batch_size` rows' media and option sequences at a time."""
    from model.inference import row_media

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
