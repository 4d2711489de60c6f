"""The encoder run on the feature cache's misses (model/media/features.py looks them up): batched, each call queued
on the device before the call before it is read back, each file's features checked, handed to the stores and
returned."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.media.decoders import Decode, Decoded, in_threads
from model.media.encoder import CALL_FILES
from model.media.feature_stores import Stored, Stores, ThreadStores
from model.media.features import Encoder, FeatureCache, Lookup, check_encoder, look_up
from model.media.preprocess import MediaError


@torch.no_grad()
def encode_misses(
    encoder: Encoder,
    cache: FeatureCache | None,
    lookup: Lookup,
    decoded: Callable[[int, int], list[Decoded]],
    batch_size: int = 8,
    workers: int = 2,
    stores: Stores | None = None,
) -> list[torch.Tensor | MediaError]:
    """Fills in `lookup.results` for its misses, `batch_size` contents at a time (at most CALL_FILES of the kind):
    `decoded(start, stop)` gives the encoder inputs (or MediaErrors) of misses[start:stop]. A file whose features are
    not finite (NaN or Inf) after the encoder fails its own entry and is never cached; the others are handed to
    `stores` while the next batch encodes, which the caller waits for; without them, to `workers` threads of this
    process (`ThreadStores`), waited for before the call returns.

    Each batch's encoder call is queued before the batch before it is read back (`Queued`): on a GPU that the
    engine's steps share, a call that waited for its own features left the encoder's stream empty until the host
    had read them, checked them and queued the next (warm catalog-shaped jobs on an H100: 22.26 and 22.29 s against
    22.35 and 22.34 with each call read back at once, benchmarks/results/2026-12-07-h100-next-b/)."""
    if stores is None:
        with ThreadStores(workers) as own:
            results = encode_misses(encoder, cache, lookup, decoded, batch_size, workers, own)
            own.wait()
        return results
    check_encoder(encoder, cache)
    results, paths = lookup.results, lookup.paths
    step = min(batch_size, CALL_FILES[lookup.modality])
    queued: Queued | None = None
    for start in range(0, len(lookup.misses), step):
        batch = lookup.misses[start : start + step]
        keys = lookup.keys[start : start + step]
        loaded = decoded(start, start + len(batch))
        for g, x in zip(batch, loaded, strict=True):
            if isinstance(x, MediaError):
                for i in g:  # each path named in its own error, though they share content
                    results[i] = MediaError(paths[i], x.reason)
        good = [(g, k, x) for g, k, x in zip(batch, keys, loaded, strict=True) if isinstance(x, torch.Tensor)]
        if good:
            following = Queued.call(encoder, lookup.modality, good)
            if queued is not None:
                queued.finish(cache, lookup, stores)
            queued = following
    if queued is not None:
        queued.finish(cache, lookup, stores)
    return results  # type: ignore[return-value]


@dataclass
class Queued:
    """One encoder call queued on the current stream, its features being copied back to pinned host memory; `finish`
    waits for them and hands them out."""

    items: list[tuple[list[int], str]]  # each content's lookup indices and key
    features: torch.Tensor  # [B, k, D] on the host, complete once `done` has passed
    done: torch.cuda.Event | None  # None on the CPU, where the call has run

    @classmethod
    def call(cls, encoder: Encoder, modality: str, good: list[tuple[list[int], str, torch.Tensor]]) -> Queued:
        """The inputs stacked into pinned memory and copied to the device as a queued copy (a pageable one waits for
        the stream; stacking, then pinning, copied a 16-video call's 290 MB twice), the call, the copy back."""
        xs = [x for _, _, x in good]
        on_cuda = encoder.device.type == "cuda"
        stacked = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, pin_memory=on_cuda)
        torch.stack(xs, out=stacked)
        features = encoder.embed(modality, stacked.to(encoder.device, non_blocking=True))  # embed converts the dtype
        items = [(g, k) for g, k, _ in good]
        if not on_cuda:
            return cls(items, features, None)
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(items, host, done)

    def finish(self, cache: FeatureCache | None, lookup: Lookup, stores: Stores) -> None:
        """Each content's features into `lookup.results` (a MediaError where they are not finite), the finite ones
        to `stores`."""
        if self.done is not None:
            self.done.synchronize()
        results, paths = lookup.results, lookup.paths
        stored: list[Stored] = []
        finite = torch.isfinite(self.features).flatten(1).all(1).tolist()  # one check for the call, not one a file
        for (g, key), features, ok in zip(self.items, self.features, finite, strict=True):
            if not ok:
                for i in g:
                    results[i] = MediaError(paths[i], "encoder features are not finite (NaN or Inf)")
                continue
            if cache is not None and cache.pooled:
                features = features.mean(dim=0, keepdim=True)
            stored.append((paths[g[0]], key, features))
            for i in g:
                results[i] = features
        if cache is not None and stored:
            stores.put(cache, lookup.modality, stored)


def encode_files(
    encoder: Encoder,
    cache: FeatureCache | None,
    modality: str,
    paths: Sequence[str | Path],
    batch_size: int = 8,
    workers: int = 2,
    decode: Decode | None = None,
) -> list[torch.Tensor | MediaError]:
    """Per-file [k, D] features (k clips as model/config.py's CLIPS_PER_ITEM says; 1 when the cache is pooled), or
    the file's MediaError.

    Cache hits skip decoding and the encoder; misses are decoded (by `decode`, else in `workers` threads: model/media/
    decoders.py) and encoded `batch_size` files at a time, at most CALL_FILES of the kind (so one batch of inputs is
    decoded at once), then stored.
    Files with identical content are encoded once. A bad file only fails its own entry (`look_up`, `encode_misses`).
    Without a cache, every file is encoded (per-clip).
    """
    check_encoder(encoder, cache)
    lookup = look_up(cache, modality, paths, workers)
    decode = decode or in_threads(workers)
    encoded = encode_misses(
        encoder, cache, lookup, lambda a, b: decode(modality, lookup.first_paths(a, b)), batch_size, workers
    )
    if cache is not None:
        cache.hashes.save()
    return encoded
