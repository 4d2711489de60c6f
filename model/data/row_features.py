"""Each dataset row's media as encoder features: every distinct file encoded once (through the feature cache), a
row's first media error in place of its features. Shared by `dr infer`, likelihood scoring and training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from model.data.catalog import Row, media_path
from model.media.decoders import Decode
from model.media.features import FeatureCache, encode_files
from model.media.preprocess import MediaError
from model.network.deepresonance import DeepResonance

DECODE_WORKERS = min(8, os.cpu_count() or 1)  # media decoding threads, where no process pool is given


def row_media(
    model: DeepResonance,
    rows: Sequence[Row],
    media_root: Path,
    cache: FeatureCache | None,
    batch_size: int,
    workers: int = DECODE_WORKERS,
    decode: Decode | None = None,
) -> list[list[tuple[str, torch.Tensor]] | MediaError]:
    """Each row's media as clip features (through the cache) or the row's first media error, naming the row's own
    file (files of identical content are decoded once and share their error, which names the first of them)."""
    if model.visual_encoder is None:
        raise ValueError("inference needs the ImageBind encoder: load the model with its imagebind weights")
    wanted: dict[str, list[Path]] = {}
    for row in rows:
        for i, modality in enumerate(row.mm_names):
            wanted.setdefault(modality, []).append(media_path(row, i, media_root))
    features: dict[tuple[str, Path], torch.Tensor | MediaError] = {}
    for modality, paths in wanted.items():
        unique = list(dict.fromkeys(paths))
        encoded = encode_files(model.visual_encoder, cache, modality, unique, batch_size, workers, decode)
        features.update({(modality, p): f for p, f in zip(unique, encoded, strict=True)})
    out: list[list[tuple[str, torch.Tensor]] | MediaError] = []
    for row in rows:
        paths = [media_path(row, i, media_root) for i in range(len(row.mm_names))]
        items = [(m, features[(m, p)]) for m, p in zip(row.mm_names, paths, strict=True)]
        errors = (MediaError(p, f.reason) for (_, f), p in zip(items, paths, strict=True) if isinstance(f, MediaError))
        out.append(next(errors, items))
    return out
