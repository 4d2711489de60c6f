"""The training rows and their media, ready for steps: every media file goes through the frozen ImageBind once, into
the feature cache (a shard per rank), so a step reads cached features and the encoder can be dropped before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.config import CLIPS_PER_ITEM
from model.data.catalog import DatasetError, DatasetSpec, Row, load_rows, media_path
from model.media.encoding import encode_files
from model.media.features import FeatureCache
from model.network.deepresonance import DeepResonance, Example
from model.text.prompt import layout_row


@dataclass
class TrainSet:
    """Rows of every dataset, concatenated, with each media item's cached features (one file per media file)."""

    names: list[str]
    rows: list[Row]
    media: list[list[tuple[str, Path]]]  # per row: (modality, feature-cache entry)
    lengths: list[list[int]]  # per dataset: token length of each row (capped at max_length)
    skipped: list[str] = field(default_factory=list)  # one line per dropped row

    def examples(self, indices: Sequence[int]) -> list[Example]:
        """The rows at `indices`, their features read back from the cache."""
        out = []
        for i in indices:
            row = self.rows[i]
            media = [(m, load_file(entry)["features"]) for m, entry in self.media[i]]
            out.append(Example(row.input, row.instruction, media, row.output))
        return out


def _encode_all(
    model: DeepResonance, cache: FeatureCache, files: list[tuple[str, Path]], batch_size: int, rank: int, world: int
) -> dict[tuple[str, Path], Path | str]:
    """(modality, file) -> its cache entry, or the reason it cannot be used. Ranks encode a shard each."""
    mine = files[rank::world]
    out: dict[tuple[str, Path], Path | str] = {}
    for modality in sorted({m for m, _ in mine}):
        paths = [p for m, p in mine if m == modality]
        for start in range(0, len(paths), 1024):  # bounded memory: features go to disk, only entries are kept
            chunk = paths[start : start + 1024]
            for path, result in zip(
                chunk, encode_files(model.visual_encoder, cache, modality, chunk, batch_size), strict=True
            ):
                out[(modality, path)] = str(result) if isinstance(result, Exception) else cache.entry(modality, path)
    if world > 1:
        gathered: list[dict | None] = [None] * world
        torch.distributed.all_gather_object(gathered, out)
        out = {k: v for part in gathered for k, v in part.items()}
    return out


def load_train_set(
    model: DeepResonance,
    specs: Sequence[DatasetSpec],
    cache: FeatureCache,
    max_length: int,
    encode_batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
) -> TrainSet:
    """Datasets (`resolve_dataset(..., split="train")`) -> a TrainSet; invalid rows and unreadable media are skipped
    (and listed)."""
    per_dataset, skipped = [], []
    for spec in specs:
        rows, errors = load_rows(spec.json_path)
        skipped += errors
        per_dataset.append(
            [(row, [(m, media_path(row, i, spec.media_root)) for i, m in enumerate(row.mm_names)]) for row in rows]
        )
    files = sorted({f for rows in per_dataset for _, media in rows for f in media})
    entries = _encode_all(model, cache, files, encode_batch_size, rank, world)
    clips = dict(CLIPS_PER_ITEM) if model.config.embs_seq else dict.fromkeys(CLIPS_PER_ITEM, 1)
    out = TrainSet([s.name for s in specs], [], [], [])
    for spec, rows in zip(specs, per_dataset, strict=True):
        lengths = []
        for row, media in rows:
            bad = [entries[f] for f in media if isinstance(entries[f], str)]
            if bad:
                skipped.append(f"{spec.json_path}: row {row.id}: {bad[0]}")
                continue
            ids = layout_row(model.tokenizer, row.input, row.instruction, [clips[m] for m, _ in media], row.output).ids
            out.rows.append(row)
            out.media.append([(m, entries[(m, p)]) for m, p in media])
            lengths.append(min(len(ids), max_length))
        if not lengths:
            raise DatasetError(f"{spec.json_path}: no usable rows")
        out.lengths.append(lengths)
    out.skipped = skipped
    return out
