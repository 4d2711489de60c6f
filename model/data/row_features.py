"""Each dataset row's media as encoder features: every distinct file encoded once (through the feature cache), a
row's first media error in place of its features. Shared by `dr infer`, likelihood scoring and training.

Two steps, so a job can run them on two threads (model/infer/job.py): `decode_media` asks the cache and decodes the
misses of a group of rows (CPU: checks, hashing, cache reads and decoding, in the decoding processes where a job has
them), `encode_media` runs the encoder on them and stores its features (GPU; the stores in the decoding processes
too, where the caller gives `ProcessStores`); `row_media` is the one after the other."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from model.data.catalog import Row, media_path
from model.media.decoders import Decode, Decoded, DecodeProcesses, in_threads, load_or_error
from model.media.encoding import encode_misses
from model.media.feature_stores import Stores
from model.media.features import FeatureCache, Lookup, LookupInProcesses, check_encoder, look_up
from model.media.preprocess import MediaError
from model.network.deepresonance import DeepResonance

DECODE_WORKERS = min(8, os.cpu_count() or 1)  # media decoding threads, where no process pool is given
RowMedia = list[tuple[str, torch.Tensor]] | MediaError  # a row's (modality, features) items, or its first error


class Given(Protocol):
    """A modality's media between the two steps: `result()` gives (Lookup, each missed content's encoder input or
    MediaError), waiting for the decoding processes where they do the work (model/media/features.py,
    `LookupInProcesses`)."""

    def result(self) -> tuple[Lookup, list[Decoded]]: ...


@dataclass
class DecodedMedia:
    """A group of rows between decoding and the encoder: per modality, the cache's answers and the misses' inputs."""

    rows: Sequence[Row]
    paths: list[list[Path]]  # each row's media files
    decoded: list[Given]


def decode_media(
    model: DeepResonance,
    rows: Sequence[Row],
    media_root: Path,
    cache: FeatureCache | None,
    workers: int = DECODE_WORKERS,
    decoders: DecodeProcesses | None = None,
) -> DecodedMedia:
    """The rows' media looked up in the cache, and the misses decoded: each distinct file once. With `decoders`, all
    of it is handed to the decoding processes and the call returns at once; a small group while they start, or
    every group without them, is done here (on this thread while they start, else in `workers` threads). The inputs
    of every miss are held until `encode_media`, so a caller holds one group of them."""
    if model.visual_encoder is None:
        raise ValueError("inference needs the ImageBind encoder: load the model with its imagebind weights")
    check_encoder(model.visual_encoder, cache)
    paths = [[media_path(row, i, media_root) for i in range(len(row.mm_names))] for row in rows]
    wanted: dict[str, list[Path]] = {}
    for row, files in zip(rows, paths, strict=True):
        for modality, path in zip(row.mm_names, files, strict=True):
            wanted.setdefault(modality, []).append(path)
    decoded: list[Given] = []
    for modality, files in wanted.items():
        files = list(dict.fromkeys(files))
        if decoders is not None and decoders.takes(len(files)):
            decoded.append(LookupInProcesses(decoders, cache, modality, files, model.visual_encoder.dtype))
        else:
            decode = in_threads(workers) if decoders is None else _on_this_thread
            decoded.append(_done(_look_up_and_decode(cache, modality, files, workers, decode)))
    return DecodedMedia(rows, paths, decoded)


def _look_up_and_decode(
    cache: FeatureCache | None, modality: str, files: list[Path], workers: int, decode: Decode
) -> tuple[Lookup, list[Decoded]]:
    lookup = look_up(cache, modality, files, workers)
    return lookup, list(decode(modality, lookup.first_paths())) if lookup.misses else []


def _on_this_thread(modality: str, paths: Sequence[Path]) -> list[Decoded]:
    """While the decoding processes start: their share of the job's cores is idle meanwhile."""
    return [load_or_error(modality, p) for p in paths]


def _done(value: tuple[Lookup, list[Decoded]]) -> Future:
    done: Future = Future()
    done.set_result(value)
    return done


def encode_media(
    model: DeepResonance,
    media: DecodedMedia,
    cache: FeatureCache | None,
    batch_size: int,
    workers: int = DECODE_WORKERS,
    stores: Stores | None = None,
) -> list[RowMedia]:
    """Each row's media as clip features or the row's first media error, naming the row's own file (files of
    identical content are decoded once and share their error, which names the first of them). The encoder runs on
    `batch_size` files at a time, at most CALL_FILES of a kind (model/media/encoder.py); its features go to `stores`
    (the caller waits for them), else to threads waited for here."""
    features: dict[tuple[str, Path], torch.Tensor | MediaError] = {}
    for given in media.decoded:
        lookup, inputs = given.result()
        encoded = encode_misses(
            model.visual_encoder, cache, lookup, lambda a, b, inputs=inputs: inputs[a:b], batch_size, workers, stores
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
    decoders: DecodeProcesses | None = None,
) -> list[RowMedia]:
    """`decode_media` then `encode_media`, on the caller's thread."""
    media = decode_media(model, rows, media_root, cache, workers, decoders)
    return encode_media(model, media, cache, batch_size, workers)
