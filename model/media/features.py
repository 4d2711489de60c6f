"""On-disk cache of frozen-encoder outputs per media file, and the lookups that find its misses (model/media/encoding.py
encodes them).

The encoder is frozen, so its output for a file depends only on the file's bytes, the encoder weights and the mode
(modality, per-clip or pooled, compute dtype). Entries are keyed by exactly that: sha256 of the file, the encoder's
fingerprint string with a sha256 of every tensor it computes with (remembered per weights file, see
`encoder_digest`), and the mode. Each entry is one safetensors file written under a temporary name and renamed into
place, so a killed job leaves no half-written entry; an entry that fails to load anyway is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from model.io.files import read_memo, write_memo
from model.media.decoders import Decoded, DecodeProcesses
from model.media.feature_files import entry_file, read_entry, write_entry
from model.media.file_hashes import SAVE_EVERY_S, FileHashes
from model.media.preprocess import MODALITIES, MediaError, check_file


class Encoder(Protocol):
    """What the cache and model/media/encoding.py need of an encoder (model/media/encoder.py's MediaEncoder)."""

    fingerprint: str
    device: torch.device
    dtype: torch.dtype

    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """modality, [B, ...] inputs on `device`, in any float dtype (converted to `dtype`) -> [B, k, D] features,
        possibly not finite (the caller checks)."""
        ...

    def state_dict(self) -> Mapping[str, torch.Tensor]: ...

    def weights_file(self) -> Mapping[str, str | int] | None:
        """The identity of the file the weights were loaded from and still are, or None (then they are hashed)."""
        ...


DIGESTS_FILE = "weights-digests.json"  # in the cache root: weights-file key -> weights_digest
DIGESTS_KEPT = 16  # the most recent weights files remembered


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    h = hashlib.sha256(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor (name, dtype, shape and bytes) of a state dict, so any changed weight changes it.

    An encoder's weights file names it only loosely (its size and ends would let two encoders that differ in the
    middle share entries); the tensors it actually computes with, in the dtype it computes in, name it exactly.
    Tensors are hashed in threads (hashlib releases the GIL), each copied to the CPU on its own. Cost, measured on 2
    busy CPU cores: the 4.8 GB of a whole ImageBind-huge in float32 8.9 s, the 2.9 GB the encoder keeps 5.3 s.
    """
    names = sorted(state)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        parts = pool.map(_tensor_digest, names, (state[n] for n in names))
        return hashlib.sha256(b"".join(parts)).hexdigest()


def encoder_digest(root: str | Path, encoder: Encoder) -> str:
    """`weights_digest` of the encoder, remembered in `root/DIGESTS_FILE` by the weights file it was loaded from,
    so that a second start with the same file skips hashing every tensor (about 5 s for ImageBind-huge on CPU).

    The memo's key is the file's identity (path, size, mtime, ctime, inode, device: a replaced or rewritten file
    changes it), the encoder's fingerprint, and the names, dtypes and shapes of the tensors it keeps (the digest is
    of those tensors, in that dtype). An encoder not loaded from a file, or written to since, is hashed every time.
    """
    state = encoder.state_dict()
    source = encoder.weights_file()
    if source is None:
        return weights_digest(state)
    tensors = [[name, str(t.dtype), list(t.shape)] for name, t in sorted(state.items())]
    what = {"file": dict(source), "fingerprint": encoder.fingerprint, "tensors": tensors}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    path = Path(root) / DIGESTS_FILE
    memo = read_memo(path, _is_digest)
    if key in memo:
        return memo[key]
    digest = weights_digest(state)
    memo[key] = digest
    write_memo(path, dict(list(memo.items())[-DIGESTS_KEPT:]))
    return digest


def _is_digest(key: str, value: object) -> bool:
    return isinstance(value, str) and len(value) == 64


class FeatureCache:
    """Per-file encoder features, at `root/<encoder digest>/<modality>-<clips|pooled>-<dtype>/<sha256>.safetensors`,
    the encoder digest being of its fingerprint and `weights` (its `weights_digest`).

    get/put raise MediaError for a file that does not exist (that is not a cache miss). Tensors come back on the CPU
    in the dtype they were stored in (the encoder's).
    """

    def __init__(
        self,
        root: str | Path,
        encoder_fingerprint: str,
        dtype: torch.dtype = torch.float32,
        pooled: bool = False,
        weights: str = "",
    ) -> None:
        self.root = Path(root)
        self.encoder_fingerprint = encoder_fingerprint
        self.weights = weights
        self.dtype = dtype
        self.pooled = pooled
        self.hashes = FileHashes(self.root)

    @classmethod
    def for_encoder(cls, root: str | Path, encoder: Encoder, pooled: bool = False) -> FeatureCache:
        """The cache of this encoder: keyed by its fingerprint and a digest of all its weights (`encoder_digest`)."""
        return cls(root, encoder.fingerprint, encoder.dtype, pooled, encoder_digest(root, encoder))

    def mode(self, modality: str) -> str:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
        return f"{modality}-{'pooled' if self.pooled else 'clips'}-{str(self.dtype).removeprefix('torch.')}"

    def file_hash(self, path: str | Path) -> str:
        """sha256 of the file's bytes, remembered by the file's identity (model/media/file_hashes.py)."""
        return self.hashes.digest(Path(path))

    def entries(self, modality: str) -> Path:
        """The folder of this encoder's entries in this modality's mode (model/media/feature_files.py names them)."""
        return self.root / _digest(f"{self.encoder_fingerprint}\0{self.weights}") / self.mode(modality)

    def entry(self, modality: str, path: str | Path, digest: str | None = None) -> Path:
        """Where the features of this file live (whether or not they exist yet); `digest`: its `file_hash`, where the
        caller has it (a job's lookup hashes each file once, its store reuses it)."""
        return entry_file(self.entries(modality), digest or self.file_hash(path))

    def metadata(self, modality: str, path: str | Path) -> dict[str, str]:
        """What an entry says of itself: the encoder, its mode and the file it was computed from."""
        return {
            "fingerprint": self.encoder_fingerprint,
            "weights": self.weights,
            "mode": self.mode(modality),
            "source": str(path),
        }

    def get(self, modality: str, path: str | Path, digest: str | None = None) -> torch.Tensor | None:
        """Cached [k, D] features, or None on a miss. A corrupt entry (or one holding NaN or Inf) is deleted and
        counts as a miss."""
        return read_entry(self.entry(modality, path, digest))

    def put(self, modality: str, path: str | Path, features: torch.Tensor, digest: str | None = None) -> None:
        """Store [k, D] features for this file, atomically; never NaN or Inf, which would answer every later job that
        reads them. Not fsync'd: an entry a crash left unreadable is dropped and encoded again on the next read."""
        write_entry(self.entry(modality, path, digest), features, self.metadata(modality, path))


@dataclass
class Lookup:
    """One modality's files after the feature cache was asked for them: `results` holds each hit and each file's
    MediaError, None for a miss; `misses` the indices of the missed paths, grouped by content (each content is
    decoded and encoded once, for every path that holds it)."""

    modality: str
    paths: Sequence[str | Path]
    results: list[torch.Tensor | MediaError | None]
    misses: list[list[int]]
    keys: list[str]  # each missed content's key: its file digest where there is a cache

    def first_paths(self, start: int = 0, stop: int | None = None) -> list[Path]:
        """The path decoded for each missed content in misses[start:stop]."""
        return [Path(self.paths[g[0]]) for g in self.misses[start:stop]]


def look_up(cache: FeatureCache | None, modality: str, paths: Sequence[str | Path], workers: int = 2) -> Lookup:
    """Checks each file (a regular file of the modality's types, before anything reads it) and asks the cache for it.
    Without a cache every good file is a miss of its own."""

    def one(i: int) -> tuple[torch.Tensor | MediaError | None, str]:
        """(the cached features, a miss's None or the file's MediaError; the file's content key)."""
        path = paths[i]
        try:
            check_file(Path(path), modality)  # before the cache reads a byte of it
            if cache is None:
                return None, str(i)
            digest = cache.file_hash(path)
            return cache.get(modality, path, digest), digest
        except MediaError as e:
            return e, ""

    results: list[torch.Tensor | MediaError | None] = [None] * len(paths)
    todo: dict[str, list[int]] = {}  # content key -> indices of paths with that content
    # the lookups hash every file: in threads (sha256 and file I/O release the GIL), where one thread spent 3.4 s of
    # a 2,858-file job's 12 s of media loading on them and on the stores (H100 host,
    # benchmarks/results/2026-12-05-h100-engine-phases/phases_warm.json)
    with ThreadPoolExecutor(max(1, workers)) as io:
        for i, (found, key) in enumerate(io.map(one, range(len(paths)))):
            if found is None:
                todo.setdefault(key, []).append(i)
            else:
                results[i] = found
    if cache is not None:
        cache.hashes.save(SAVE_EVERY_S)  # the next job reads none of these files where their features are cached
    return Lookup(modality, paths, results, list(todo.values()), list(todo))


def check_encoder(encoder: Encoder, cache: FeatureCache | None) -> None:
    """A cache holds one encoder's features in one dtype: another's would answer with the wrong features."""
    if cache is not None and (cache.encoder_fingerprint, cache.dtype) != (encoder.fingerprint, encoder.dtype):
        raise ValueError(
            f"feature cache is for {cache.encoder_fingerprint} in {cache.dtype}, "
            f"encoder is {encoder.fingerprint} in {encoder.dtype}"
        )


class LookupInProcesses:
    """`look_up` and decoding the misses, in the decoding processes (`DecodeProcesses.find`), the misses' inputs in
    `dtype`, the encoder's: handed to them at construction, which returns at once; `result()` waits for them and gives
    what `look_up` and decoding its misses give, (Lookup, each missed content's encoder input or MediaError).

    The job's process only stats each file for a remembered digest (`FileHashes.known`) and receives two tensors a
    chunk; the processes check, hash, read the cache and decode. Contents are grouped as `look_up` groups them, but
    two paths of one content in different chunks are both decoded there (the first one's input is used)."""

    def __init__(
        self,
        decoders: DecodeProcesses,
        cache: FeatureCache | None,
        modality: str,
        paths: Sequence[str | Path],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cache, self.modality, self.paths = cache, modality, paths
        files = [Path(p) for p in paths]
        digests = [cache.hashes.known(p) for p in files] if cache is not None else None
        entries = cache.entries(modality) if cache is not None else None
        self.chunks = decoders.find(modality, files, digests, entries, dtype)
        self.found: tuple[Lookup, list[Decoded]] | None = None

    def result(self) -> tuple[Lookup, list[Decoded]]:
        if self.found is None:
            self.found = self._gather()
        return self.found

    def _gather(self) -> tuple[Lookup, list[Decoded]]:
        results: list[torch.Tensor | MediaError | None] = [None] * len(self.paths)
        todo: dict[str, list[int]] = {}  # content key -> indices of paths with that content
        inputs: list[Decoded] = []  # each missed content's, in the order of `todo`
        i = 0
        for chunk in self.chunks:
            found = chunk.result()
            hits = found.features()
            for outcome in found.files:
                if isinstance(outcome, MediaError):
                    results[i] = outcome
                elif outcome[1]:
                    results[i] = hits[outcome[2]]  # type: ignore[index]
                else:
                    key, row = outcome[0] or str(i), outcome[2]
                    if key not in todo:
                        inputs.append(row if isinstance(row, MediaError) else found.inputs[row])  # type: ignore[index]
                    todo.setdefault(key, []).append(i)
                i += 1
            if self.cache is not None:
                for hashed in found.hashed:
                    self.cache.hashes.remember(*hashed)
        if self.cache is not None:
            self.cache.hashes.save(SAVE_EVERY_S)  # as `look_up` does
        return Lookup(self.modality, self.paths, results, list(todo.values()), list(todo)), inputs
