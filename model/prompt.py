"""The one place for DeepResonance's prompt: template, BOS rule, media slots, labels, and batch assembly.

A row becomes `[BOS] input-pieces-with-media ### Human: {instruction}\\n### Assistant: [{output}\\n###]`, each text
piece tokenized on its own. Batches are assembled in one vectorized step (LLaVA style): token ids with -1 at media
slots are embedded, then the projected clip embeddings are written into the slots.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.tokenizer import PromptTokenizer

PLACEHOLDERS = {"<Audio>": "audio", "<Image>": "image", "<Video>": "video"}
SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
HUMAN = "### Human: "
ASSISTANT = "\n### Assistant: "
TARGET_END = "\n###"
MEDIA = -1  # id marking a media-clip slot
IGNORE = -100  # label of positions without loss


def answer_text(generated: str) -> str:
    """The original keeps the text before the first "\\n###"."""
    return generated.split(TARGET_END)[0]


def stop_sequences(tok: PromptTokenizer) -> list[list[int]]:
    """Generation stops after "▁###" (id 835, the original's only stop) or "\\n###" as it follows an answer: both come
    after the answer's end, which `answer_text` cuts at the first "\\n###", so answers are unchanged and rows end as
    soon as they are done."""
    return [[tok.stop_id], list(tok.newline_stop)]


def cut_at_stop(ids: list[int], eos: int, stops: Sequence[Sequence[int]]) -> list[int]:
    """Ids up to the first EOS (dropped) or the end of the first stop sequence (kept)."""
    end = len(ids)
    for i in range(len(ids)):
        if ids[i] == eos:
            end = i
            break
        if any(ids[max(0, i + 1 - len(s)) : i + 1] == list(s) for s in stops):
            end = i + 1
            break
    return ids[:end]


@dataclass(frozen=True)
class RowLayout:
    """One row's token ids (MEDIA at clip slots); the input segment is ids[:input_len]; labels start at target_start."""

    ids: list[int]
    input_len: int
    target_start: int


def layout_row(
    tok: PromptTokenizer,
    input_text: str,
    instruction: str,
    clips: Sequence[int],
    output: str | None = None,
) -> RowLayout:
    """`clips` holds the number of clip embeddings of each media item, in placeholder order."""
    pieces = SPLIT.split(input_text or " ")  # the original replaces an empty input by " "
    n_media = sum(piece in PLACEHOLDERS for piece in pieces)
    if n_media != len(clips):
        raise ValueError(f"input has {n_media} media placeholder(s) but {len(clips)} media item(s) were given")
    ids: list[int] = []
    media = iter(clips)
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        if piece in PLACEHOLDERS:
            ids.extend([MEDIA] * next(media))
        else:
            if i == 0:  # BOS only when the input begins with text
                ids.append(tok.bos_id)
            ids.extend(tok.encode(piece))
    input_len = len(ids)
    ids.extend(tok.encode(HUMAN + instruction + ASSISTANT))
    target_start = len(ids)
    if output is not None:
        ids.extend(tok.encode(output + TARGET_END))
    return RowLayout(ids, input_len, target_start)


@dataclass
class Batch:
    """Right-padded (training) or left-padded (generation) model inputs."""

    embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE outside targets
    lengths: torch.Tensor  # [B]


def assemble(
    layouts: Sequence[RowLayout],
    media: torch.Tensor | None,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    pad_id: int,
    max_length: int,
    fusion: Callable[..., torch.Tensor] | None = None,
    left_pad: bool = False,
) -> Batch:
    """Embeds a batch in one step. `media` holds every clip embedding of the batch, [N, H], in row-major slot order.

    Fusion (beta) runs over each row's input segment with a key padding mask, then the sequences are cut to
    `max_length` as the original does after assembly.
    """
    device = embed_tokens.weight.device if hasattr(embed_tokens, "weight") else None
    lengths = torch.tensor([len(lay.ids) for lay in layouts], device=device)
    longest = int(lengths.max())
    ids = torch.full((len(layouts), longest), pad_id, dtype=torch.long, device=device)
    starts = torch.tensor([lay.target_start for lay in layouts], device=device)
    for b, lay in enumerate(layouts):
        ids[b, : len(lay.ids)] = torch.tensor(lay.ids, device=device)
    slots = ids == MEDIA
    embeds = embed_tokens(ids.clamp(min=0))
    n_slots = int(slots.sum())
    if n_slots:
        if media is None or media.shape[0] != n_slots:
            got = 0 if media is None else media.shape[0]
            raise ValueError(f"batch has {n_slots} media slots but {got} clip embeddings")
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), media.to(embeds.dtype))
    pos = torch.arange(longest, device=device).unsqueeze(0)
    if fusion is not None:
        input_lens = torch.tensor([lay.input_len for lay in layouts], device=device)
        width = int(input_lens.max())
        inside = pos[:, :width] < input_lens.unsqueeze(1)
        fused = fusion(embeds[:, :width], src_key_padding_mask=~inside)
        embeds = torch.cat([torch.where(inside.unsqueeze(-1), fused, embeds[:, :width]), embeds[:, width:]], dim=1)
    valid = pos < lengths.unsqueeze(1)
    labels = torch.where(valid & (pos >= starts.unsqueeze(1)), ids, IGNORE)
    keep = min(longest, max_length)
    embeds, valid, labels = embeds[:, :keep], valid[:, :keep], labels[:, :keep]
    lengths = lengths.clamp(max=keep)
    if left_pad:
        shift = (pos[:, :keep] - (keep - lengths).unsqueeze(1)) % keep
        embeds = embeds.gather(1, shift.unsqueeze(-1).expand_as(embeds))
        valid, labels = valid.gather(1, shift), labels.gather(1, shift)
    return Batch(embeds, valid.long(), labels, lengths)
