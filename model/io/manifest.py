"""sha256 manifests: `{file: {size, sha256}}` recorded beside downloaded and merged weights, so a check needs no
re-hash of files already verified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rich.progress import Progress

from model.io.files import write_atomically

MANIFEST_FILE = "dr_manifest.json"  # written beside what download / vicuna produced
CHUNK = 8 << 20


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Streamed sha256 (multi-GB files never sit in memory)."""
    digest = hashlib.sha256()
    task = progress.add_task(f"sha256 {path.name}", total=path.stat().st_size) if progress else None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress is not None and task is not None:
                progress.advance(task, len(chunk))
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The recorded {file name: {"size", "sha256"}} of a folder; empty when none was written."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["files"]


def record_manifest(folder: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge entries into the folder's manifest (download adds one piece at a time)."""
    files = read_manifest(folder) | entries
    text = json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n"
    write_atomically(folder / MANIFEST_FILE, text)
