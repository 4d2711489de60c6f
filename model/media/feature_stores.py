"""Where a batch's encoder features go to be cached, while the next batch encodes: threads of this process
(`ThreadStores`, a call's own) or a job's decoding processes (`ProcessStores`). Entries are model/media/
feature_files.py's; the cache that names them is model/media/features.py's `FeatureCache`."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from model.media.decoders import DecodeProcesses, write_entries
from model.media.feature_files import entry_file


class Cache(Protocol):
    """What the stores need of a FeatureCache."""

    def put(self, modality: str, path: str | Path, features: torch.Tensor, digest: str | None = None) -> None: ...

    def entries(self, modality: str) -> Path: ...

    def metadata(self, modality: str, path: str | Path) -> dict[str, str]: ...


Stored = tuple[str | Path, str, torch.Tensor]  # a file, its content key (digest) and its [k, D] features


class Stores(Protocol):
    """Where `encode_misses` hands each batch's features for the cache (never NaN or Inf ones)."""

    def put(self, cache: Cache, modality: str, items: list[Stored]) -> None: ...

    def wait(self) -> None:
        """Until every write handed over has ended; the first failed one raised."""
        ...


class ThreadStores:
    """`FeatureCache.put` of each file in `workers` threads of this process, while the next batch encodes: the
    stores of a call without other stores, waited for at its end."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.writes: list[Future] = []

    def put(self, cache: Cache, modality: str, items: list[Stored]) -> None:
        self.writes += [self.pool.submit(cache.put, modality, path, features, key) for path, key, features in items]

    def wait(self) -> None:
        for write in self.writes:
            write.result()  # a failed write fails the call, as it did written in turn

    def __enter__(self) -> ThreadStores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)


class ProcessStores:
    """A job's stores in its decoding processes: a batch's features sent as one tensor (`DecodeProcesses.write`),
    so neither the writes nor their files' system calls take the job's interpreter lock (8.71 s of 3,366 feature
    files' writes were on it in a catalog job on an H100,
    benchmarks/results/2026-12-07-h100-fused-encoder-jobs/phases_catalog.json). A batch handed over while the pool
    starts is written on the caller's thread instead (handing it over would wait for the start).

    A failed write is raised at the next `put` or at `wait`: the job fails with it, never silently."""

    def __init__(self, decoders: DecodeProcesses) -> None:
        self.decoders = decoders
        self.writes: list[Future] = []

    def put(self, cache: Cache, modality: str, items: list[Stored]) -> None:
        self.check()
        entries = [entry_file(cache.entries(modality), key) for _, key, _ in items]
        metadata = [cache.metadata(modality, path) for path, _, _ in items]
        features = torch.stack([f for _, _, f in items])
        if self.decoders.takes(len(items)):
            self.writes.append(self.decoders.write(entries, features, metadata))
        else:
            write_entries(entries, features, metadata)

    def check(self) -> None:
        """Raises the first failure among the writes that ended; forgets the ones that succeeded."""
        for write in self.writes:
            if write.done() and write.exception() is not None:
                raise write.exception()  # type: ignore[misc]
        self.writes = [w for w in self.writes if not w.done()]

    def wait(self) -> None:
        for write in self.writes:
            write.result()
        self.writes = []
