"""Each dataset row's media as encoder features: every distinct file encoded once (through the feature cache), a
row's first media error in place of its features. Shared by `dr infer`, likelihood scoring and training.

Two steps, so a job can run them on two threads (model/infer/job.py): `decode_media` asks the cache and decodes the
misses of a group of rows (CPU: hashing, decoding processes), `encode_media` runs the encoder on them and stores its
features (GPU); `row_media` is the one after the other."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.data.catalog import Row, media_path
from model.media.decoders import Decode, Decoded, in_threads
from model.media.features import FeatureCache, Lookup, check_encoder, encode_misses, look_up
from model.media.preprocess import MediaError
from model.network.deepresonance import DeepResonance

DECODE_WORKERS = min(8, os.cpu_count() or 1)  # media decoding threads, where no process pool is given
RowMedia = list[tuple[str, torch.Tensor]] | MediaError  # a row's (modality, features) items, or its first error


@dataclass
class DecodedMedia:
    """A group of rows between decoding and the encoder: per modality, the cache's answers and the misses' inputs."""

    rows: Sequence[Row]
    paths: list[list[Path]]  # each row's media files
    decoded: list[tuple[Lookup, list[Decoded]]]


def decode_media(
    model: DeepResonance,
    rows: Sequence[Row],
    media_root: Path,
    cache: FeatureCache | None,
    workers: int = DECODE_WORKERS,
    decode: Decode | None = None,
) -> DecodedMedia:
    """The rows' media looked up in the cache, and the misses decoded (by `decode`, else in `workers` threads): each
    distinct file once. The inputs of every miss are held until `encode_media`, so a caller holds one group of them."""
    if model.visual_encoder is None:
        raise ValueError("inference needs the ImageBind encoder: load the model with its imagebind weights")
    check_encoder(model.visual_encoder, cache)
    paths = [[media_path(row, i, media_root) for i in range(len(row.mm_names))] for row in rows]
    wanted: dict[str, list[Path]] = {}
    for row, files in zip(rows, paths, strict=True):
        for modality, path in zip(row.mm_names, files, strict=True):
            wanted.setdefault(modality, []).append(path)
    decode = decode or in_threads(workers)
    decoded = []
    for modality, files in wanted.items():
        lookup = look_up(cache, modality, list(dict.fromkeys(files)), workers)
        decoded.append((lookup, decode(modality, lookup.first_paths()) if lookup.misses else []))
    return DecodedMedia(rows, paths, decoded)


def encode_media(
    model: DeepResonance,
    media: DecodedMedia,
    cache: FeatureCache | None,
    batch_size: int,
    workers: int = DECODE_WORKERS,
) -> list[RowMedia]:
    """Each row's media as clip features or the row's first media error, naming the row's own file (files of
    identical content are decoded once and share their error, which names the first of them). The encoder runs on
    `batch_size` files at a time, at most CALL_FILES of a kind (model/media/encoder.py)."""
    features: dict[tuple[str, Path], torch.Tensor | MediaError] = {}
    for lookup, inputs in media.decoded:
        encoded = encode_misses(
            model.visual_encoder, cache, lookup, lambda a, b, inputs=inputs: inputs[a:b], batch_size, workers
        )
        features.update({(lookup.modality, Path(p)): f for p, f in zip(lookup.paths, encoded, strict=True)})
    out: list[RowMedia] = []
    for row, paths in zip(media.rows, media.paths, strict=True):
        items = [(m, features[(m, p)]) for m, p in zip(row.mm_names, paths, strict=True)]
        errors = (MediaError(p, f.reason) for (_, f), p in zip(items, paths, strict=True) if isinstance(f, MediaError))
        out.append(next(errors, items))
    return out


def row_media(
    model: DeepResonance,
    rows: Sequence[Row],
    media_root: Path,
    cache: FeatureCache | None,
    batch_size: int,
    workers: int = DECODE_WORKERS,
    decode: Decode | None = None,
) -> list[RowMedia]:
    """`decode_media` then `encode_media`, on the caller's thread."""
    media = decode_media(model, rows, media_root, cache, workers, decode)
    return encode_media(model, media, cache, batch_size, workers)
