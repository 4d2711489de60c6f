"""The one place for DeepResonance's prompt: template, BOS rule, media slots, labels, and the batching of ids.

A row becomes `[BOS] input-pieces-with-media ### Human: {instruction}\\n### Assistant: [{output}\\n###]`, each text
piece tokenized on its own, with MEDIA (-1) at each clip slot. This module only lays out ids and labels; embedding
them and writing the projected clips into the slots is the model's (`DeepResonance.prepare`), so the prompt's
layout can be computed, tested and counted without a model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.io.transfer import to_device
from model.text.tokenizer import PromptTokenizer

PLACEHOLDERS = {"<Audio>": "audio", "<Image>": "image", "<Video>": "video"}
TAGS = {modality: tag for tag, modality in PLACEHOLDERS.items()}  # modality -> its placeholder
SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
HUMAN = "### Human: "
ASSISTANT = "\n### Assistant: "
TARGET_END = "\n###"
MEDIA = -1  # id marking a media-clip slot
IGNORE = -100  # label of positions without loss


def answer_text(generated: str) -> str:
    """The original keeps the text before the first "\\n###"."""
    return generated.split(TARGET_END)[0]


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


@dataclass(frozen=True)
class IdBatch:
    """A batch of rows as tensors: the right-padded ids of whole rows, and the final mask, labels and lengths.

    The model embeds and fuses whole rows (`ids`, `input_lens`) and only then cuts them to `keep` positions, as the
    original does after assembly, so `ids` is not cut. The other fields are already cut and, when left-padded,
    rotated so that each row ends at the last column: `order[b, j]` is the column of the cut row that final position
    j takes (None when right-padded: the first `keep` columns as they are). The host-side counts (`keep`, `sizes`,
    `media_slots`, `longest_input`) let a caller shape its work without reading the device.
    """

    ids: torch.Tensor  # [B, L], pad_id after each row, MEDIA at clip slots
    input_lens: torch.Tensor  # [B]
    keep: int
    order: torch.Tensor | None  # [B, keep]
    attention_mask: torch.Tensor  # [B, keep]
    labels: torch.Tensor  # [B, keep], IGNORE outside targets
    lengths: torch.Tensor  # [B]
    sizes: tuple[int, ...]  # `lengths` on the host
    media_slots: int  # MEDIA ids in `ids`
    longest_input: int  # max of `input_lens`


def batch_ids(
    layouts: Sequence[RowLayout],
    pad_id: int,
    max_length: int,
    left_pad: bool = False,
    device: torch.device | None = None,
) -> IdBatch:
    """Right-padded (training) or left-padded (generation) ids, labels and mask of a batch, cut to `max_length`.
    Built on the host and then copied to `device` (queued copies: the host does not wait for the device)."""
    lengths = torch.tensor([len(lay.ids) for lay in layouts])
    longest = int(lengths.max())
    ids = torch.full((len(layouts), longest), pad_id, dtype=torch.long)
    starts = torch.tensor([lay.target_start for lay in layouts])
    for b, lay in enumerate(layouts):
        ids[b, : len(lay.ids)] = torch.tensor(lay.ids)
    pos = torch.arange(longest).unsqueeze(0)
    valid = pos < lengths.unsqueeze(1)
    labels = torch.where(valid & (pos >= starts.unsqueeze(1)), ids, IGNORE)
    keep = min(longest, max_length)
    valid, labels = valid[:, :keep], labels[:, :keep]
    lengths = lengths.clamp(max=keep)
    order = None
    if left_pad:
        order = (pos[:, :keep] - (keep - lengths).unsqueeze(1)) % keep
        valid, labels = valid.gather(1, order), labels.gather(1, order)
    input_lens = [lay.input_len for lay in layouts]

    def moved(t: torch.Tensor) -> torch.Tensor:
        return to_device(t, device)

    return IdBatch(
        moved(ids),
        moved(torch.tensor(input_lens)),
        keep,
        None if order is None else moved(order),
        moved(valid.long()),
        moved(labels),
        moved(lengths),
        tuple(lengths.tolist()),
        int((ids == MEDIA).sum()),
        max(input_lens),
    )
