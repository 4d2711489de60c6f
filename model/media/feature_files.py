"""One feature-cache entry on disk: a file's [k, D] encoder features as a safetensors file named by the file's
sha256. The one place of the format, for the cache (model/media/features.py) and for the decoding processes that
read and write entries outside the job's process (model/media/decoders.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.io.files import written_atomically


def entry_file(directory: Path, digest: str) -> Path:
    """Where the features of the file of this sha256 live in a mode's `directory` (whether or not they exist yet):
    fanned out by the digest's first two characters, so no folder holds a whole data set."""
    return directory / digest[:2] / f"{digest}.safetensors"


def read_entry(entry: Path) -> torch.Tensor | None:
    """The entry's [k, D] features, or None on a miss. A corrupt entry (or one holding NaN or Inf) is deleted and
    counts as a miss: it is encoded and written again."""
    if not entry.is_file():
        return None
    try:
        features = load_file(entry)["features"]
    except (SafetensorError, OSError, KeyError, ValueError):
        features = None
    if features is None or features.ndim != 2 or not torch.isfinite(features).all():
        entry.unlink(missing_ok=True)
        return None
    return features


def write_entry(entry: Path, features: torch.Tensor, metadata: dict[str, str]) -> None:
    """Stores [k, D] features atomically; never NaN or Inf, which would answer every later job that reads them. Not
    fsync'd: an entry a crash left unreadable is dropped and encoded again on the next read."""
    if features.ndim != 2:
        raise ValueError(f"expected [k, D] features, got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{metadata.get('source', entry)}: features are not finite (NaN or Inf), not cached")
    with written_atomically(entry, fsync=False) as tmp:
        save_file({"features": features.detach().cpu().contiguous()}, tmp, metadata=metadata)
